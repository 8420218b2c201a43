"""kill -9 during chat writes and document ingestion: no acknowledged write lost, no half document searchable.

A writer child process (``python -m tests.chaos.store_faults chat|docs FOLDER``)
writes through the real stores and prints one line per write *after* the
store call returned — that line is the acknowledgement a caller would have
seen. The parent SIGKILLs it at a random moment, reopens the stores and
checks every acknowledged write, plus SQLite's ``integrity_check`` and the
document/chunk consistency of LanceDB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.chaos.harness import Report, summary
from tests.support.processes import REPO, child_env

DIMENSION = 384
EMBEDDING_NAME = "all-MiniLM-L6-v2"


class HashEmbedder:
    """Deterministic unit vectors from a hash: the store's crash safety does not depend on what embeds."""

    model_name = EMBEDDING_NAME
    dimension = DIMENSION
    max_tokens = 256
    loaded = True

    def warm_up(self) -> None:
        return None

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vector = np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
            rows.append(vector / np.linalg.norm(vector))
        return np.stack(rows) if rows else np.zeros((0, DIMENSION), dtype=np.float32)


def make_embedder(real: bool) -> Any:
    if real:
        from app.store.embedding import Embedder

        embedder = Embedder(EMBEDDING_NAME)
        embedder.warm_up()
        return embedder
    return HashEmbedder()


# ---------------------------------------------------------------------------- the writer (child process)


def _say(lock: threading.Lock, line: str) -> None:
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def write_chat(folder: Path, threads: int = 3, limit: int = 100_000) -> None:
    """Sessions and messages from several threads (as the web app writes them) until killed or ``limit``."""
    from app.store import SessionStore

    store = SessionStore(folder / "sessions.sqlite3")
    lock = threading.Lock()
    _say(lock, "READY")

    def worker(number: int) -> None:
        rng = random.Random(number)
        for index in range(limit):
            session = store.create_session(None if index % 2 else f"chat {number}.{index}")
            _say(lock, f"S {session.id}")
            for turn in range(rng.randint(1, 4)):
                size = rng.choice([10, 200, 5_000, 100_000])
                content = f"{number}.{index}.{turn} " + "word " * (size // 5)
                message = store.add_message(session.id, "user" if turn % 2 == 0 else "assistant", content,
                                            agents=["a"], stats={"n": turn})
                _say(lock, f"M {session.id} {message.id} {hashlib.sha256(content.encode()).hexdigest()}")

    workers = [threading.Thread(target=worker, args=(number,), daemon=True) for number in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()


def write_documents(folder: Path, real_embeddings: bool, limit: int = 10_000) -> None:
    """Documents of 20–200 chunks, one after another, each with a unique marker word, until killed."""
    from app.store import RagStore

    store = RagStore(folder, embedding_model=EMBEDDING_NAME, embedder=make_embedder(real_embeddings), batch_size=8)
    lock = threading.Lock()
    _say(lock, "READY")
    rng = random.Random(os.getpid())
    for index in range(limit):
        marker = f"zq{index}x{rng.randrange(10**6)}"
        paragraphs = [f"{marker} paragraph {p} " + " ".join(rng.choice(["heron", "lake", "reed", "wind", "stone"])
                                                               for _ in range(60)) for p in range(rng.randint(8, 80))]
        _say(lock, f"BEGIN {marker}")
        document = store.add_text("\n\n".join(paragraphs), f"doc-{index}.txt")
        _say(lock, f"D {document.id} {marker} {document.chunk_count}")


# ---------------------------------------------------------------------------- the parent


def _spawn(kind: str, folder: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.chaos.store_faults", kind, str(folder), *extra],
                            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run_until(process: subprocess.Popen[str], enough: Callable[[list[str]], bool], timeout: float) -> list[str]:
    """Read acknowledgements until ``enough`` says kill now; then SIGKILL and read what was already written."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if enough(lines):
                break
    finally:
        process.send_signal(signal.SIGKILL)
        rest, errors = process.communicate(timeout=30)
    lines += [line.strip() for line in rest.splitlines() if line.strip()]
    if "READY" not in lines:
        raise RuntimeError(f"the writer never started:\n{errors[-3000:]}")
    return lines


def chat_writes_crash(folder: Path, *, kills: int = 3, seed: int = 10, log: Any = None) -> Report:
    """SIGKILL the chat writer ``kills`` times at random points; every acknowledged message must survive."""
    from app.store import NotFoundError, SessionStore

    report = Report("stores_crash_chat")
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    acknowledged: dict[int, tuple[str, str]] = {}
    sessions: set[str] = set()
    checks = []
    for kill in range(kills):
        target = rng.randint(5, 60)
        lines = _run_until(_spawn("chat", folder),
                           lambda lines, target=target: sum(line.startswith("M ") for line in lines) >= target, 120)
        for line in lines:
            parts = line.split()
            if parts[0] == "S":
                sessions.add(parts[1])
            elif parts[0] == "M":
                acknowledged[int(parts[2])] = (parts[1], parts[3])
        path = folder / "sessions.sqlite3"
        with sqlite3.connect(path) as connection:
            integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
            orphans = connection.execute(
                "SELECT COUNT(*) FROM messages WHERE session_id NOT IN (SELECT id FROM sessions)").fetchone()[0]
        if integrity != "ok":
            report.problem(f"kill {kill}: integrity_check says {integrity}")
        if orphans:
            report.problem(f"kill {kill}: {orphans} messages without their session")
        store = SessionStore(path)
        try:
            started = time.monotonic()
            missing = 0
            for session_id in sessions:
                try:
                    stored = {message.id: hashlib.sha256(message.content.encode()).hexdigest()
                              for message in store.get_history(session_id)}
                except NotFoundError:
                    report.problem(f"kill {kill}: acknowledged session {session_id} is gone")
                    continue
                for message_id, (owner, digest) in acknowledged.items():
                    if owner == session_id and stored.get(message_id) != digest:
                        missing += 1
            checks.append(time.monotonic() - started)
            if missing:
                report.problem(f"kill {kill}: {missing} acknowledged message(s) lost or changed")
        finally:
            store.close()
        if log is not None and (kill + 1) % 10 == 0:
            log(f"chat crash: {kill + 1}/{kills} kills, {len(acknowledged)} acknowledged messages checked")
    report.figures = {"kills": kills, "acknowledged_messages": len(acknowledged), "sessions": len(sessions),
                      "verify_s": summary(checks)}
    return report


def ingestion_crash(folder: Path, *, kills: int = 3, real_embeddings: bool = False, seed: int = 11,
                    log: Any = None) -> Report:
    """SIGKILL the document writer mid-ingestion; acknowledged documents stay whole, unfinished ones vanish."""
    from app.store import RagStore

    report = Report("stores_crash_documents")
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    acknowledged: dict[str, tuple[str, int]] = {}  # doc id → (marker, chunks)
    interrupted: list[str] = []
    reopen_s = []
    extra = ["--real-embeddings"] if real_embeddings else []
    for kill in range(kills):
        documents_before_kill = rng.randint(0, 2)
        delay = rng.uniform(0.0, 1.5)

        def enough(lines: list[str], wanted: int = documents_before_kill, delay: float = delay) -> bool:
            done = sum(line.startswith("D ") for line in lines)
            if done >= wanted and lines and lines[-1].startswith("BEGIN"):
                time.sleep(delay)  # somewhere inside the next ingestion
                return True
            return False

        lines = _run_until(_spawn("docs", folder, *extra), enough, 600 if real_embeddings else 120)
        begun = [line.split()[1] for line in lines if line.startswith("BEGIN ")]
        finished = set()
        for line in lines:
            if line.startswith("D "):
                _, document_id, marker, chunks = line.split()
                acknowledged[document_id] = (marker, int(chunks))
                finished.add(marker)
        interrupted += [marker for marker in begun if marker not in finished]
        started = time.monotonic()
        store = RagStore(folder, embedding_model=EMBEDDING_NAME, embedder=make_embedder(False))
        reopen_s.append(time.monotonic() - started)
        try:
            listed = {document.id: document for document in store.list_documents()}
            rows = store._chunks_table.to_arrow().select(["doc_id"]).column("doc_id").to_pylist() \
                if store._chunks_table is not None else []
            per_document: dict[str, int] = {}
            for document_id in rows:
                per_document[document_id] = per_document.get(document_id, 0) + 1
            for document_id, (marker, chunks) in acknowledged.items():
                document = listed.get(document_id)
                if document is None:
                    report.problem(f"kill {kill}: acknowledged document {marker} is gone")
                elif document.chunk_count != chunks or per_document.get(document_id) != chunks:
                    report.problem(f"kill {kill}: {marker} has {per_document.get(document_id)} of {chunks} chunks")
            strays = set(per_document) - set(listed)
            if strays:
                report.problem(f"kill {kill}: chunks of {len(strays)} unlisted document(s) left after reopening")
            for document_id, document in listed.items():
                if per_document.get(document_id) != document.chunk_count:
                    report.problem(f"kill {kill}: listed {document.name} has {per_document.get(document_id)} of "
                                   f"{document.chunk_count} chunks")
            for marker in interrupted:
                hits = store.search(marker, k=5, mode="fts")
                found = {hit.document_id for hit in hits if marker in hit.text}
                if found - set(listed):
                    report.problem(f"kill {kill}: unfinished document {marker} is searchable")
            for document_id, (marker, _) in list(acknowledged.items())[-3:]:
                hits = store.search(marker, k=5, mode="fts")
                if not any(hit.document_id == document_id for hit in hits):
                    report.problem(f"kill {kill}: acknowledged document {marker} is not found by search")
        finally:
            store.close()
        if log is not None:
            log(f"ingestion crash {kill + 1}/{kills}: {len(acknowledged)} acknowledged, {len(interrupted)} cut short")
    report.figures = {"kills": kills, "acknowledged_documents": len(acknowledged),
                      "ingestions_cut_short": len(interrupted), "real_embeddings": real_embeddings,
                      "reopen_s": summary(reopen_s)}
    if not interrupted:
        report.problem("no ingestion was cut short: the kills all landed between documents")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Store writer for the crash tests (prints acknowledgements).")
    parser.add_argument("kind", choices=["chat", "docs"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--real-embeddings", action="store_true")
    arguments = parser.parse_args(argv)
    if arguments.kind == "chat":
        write_chat(arguments.folder)
    else:
        write_documents(arguments.folder, arguments.real_embeddings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

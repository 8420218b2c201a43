"""Coordinator restart: SIGKILL the web process (coordinator inside) and start it again on the same data.

What must hold: the cluster view is back within one telemetry interval of
the new coordinator connecting (retained status, hardware and model arrive
at once, load with the next telemetry), chat sessions and documents are
intact, a question being answered when the process died keeps its stored
question, and the restarted app answers again.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from broker.mqtt.local_broker import RunningBroker
from tests.app_support import RASPBERRY_PI, RunningApp, start_agent, start_app
from tests.chaos.harness import Report, summary
from tests.chaos.store_faults import EMBEDDING_NAME, HashEmbedder

TELEMETRY_S = 0.5
"""The agents' interval in tests/app_support.start_agent."""
AGENTS = ("restart-pi-1", "restart-pi-2")


def gradio_call(client: httpx.Client, api: str, data: list[Any], timeout: float = 120) -> tuple[str, Any]:
    """Call a Gradio API route over plain HTTP; returns (``complete`` or ``error``, the last payload)."""
    started = client.post(f"/gradio_api/call/{api}", json={"data": data}, timeout=timeout)
    started.raise_for_status()
    event, payload = "", None
    with client.stream("GET", f"/gradio_api/call/{api}/{started.json()['event_id']}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ").strip()
            elif line.startswith("data: ") and event in ("complete", "error", "generating"):
                payload = json.loads(line.removeprefix("data: "))
    if event == "complete" and isinstance(payload, list):
        payload = payload[-1]
    return event, payload


def _view(app: RunningApp) -> dict[str, Any] | None:
    try:
        return httpx.get(f"{app.url}/status", timeout=5).json()
    except (httpx.HTTPError, json.JSONDecodeError):
        return None


def _complete(status: dict[str, Any] | None) -> bool:
    """Every agent online with its model ready and its load (telemetry) known."""
    if status is None or not status.get("connected"):
        return False
    agents = {agent["id"]: agent for agent in status["agents"]}
    return all(agents.get(name, {}).get("online") and agents[name].get("model_state") == "ready"
               and agents[name].get("cpu_percent") is not None for name in AGENTS)


def _wait(predicate: Any, timeout: float, what: str, app: RunningApp | None = None) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{app.logs() if app is not None else ''}")
        time.sleep(0.02)
    return time.monotonic() - started


def seed_documents(data_dir: Path, count: int = 2) -> dict[str, int]:
    """Documents written before the app starts (hash-embedded, so no model load): id → chunk count."""
    from app.store import RagStore

    store = RagStore(data_dir, embedding_model=EMBEDDING_NAME, embedder=HashEmbedder())
    try:
        added = {}
        for index in range(count):
            document = store.add_text(f"# Seeded {index}\n\n" + "The herons nest by the lake. " * 200,
                                      f"seeded-{index}.md")
            added[document.id] = document.chunk_count
        return added
    finally:
        store.close()


def coordinator_restart(broker: RunningBroker, folder: Path, *, restarts: int = 1, real_embeddings: bool = False,
                        log: Any = None) -> Report:
    """Kill -9 the web process ``restarts`` times (once mid-answer) and check what survives each time."""
    report = Report("coordinator_restart")
    prefix = f"chaos/{uuid.uuid4().hex[:8]}/v1"
    data_dir = folder / "app-data"
    documents = {} if real_embeddings else seed_documents(data_dir)
    app_flags = [] if real_embeddings else ["--no-rag-warm-up"]
    app = start_app(folder, broker, topic_prefix=prefix, extra=app_flags)
    view_back: list[float] = []
    sessions: dict[str, int] = {}  # session id → messages acknowledged
    asked: list[str] = []
    try:
        for name in AGENTS:
            start_agent(app, folder, name, backend="simulated", profile=RASPBERRY_PI,
                        extra=["--sim-tokens-per-s", "40", "--sim-ttft-ms", "20", "--sim-pull-s", "0.1"])
        _wait(lambda: _complete(_view(app)), 90, "both agents ready", app)
        with httpx.Client(base_url=app.url, timeout=120) as client:
            for index in range(2):
                event, answer = gradio_call(client, "chat", [f"question {index} before the crash", "", "auto",
                                                            "consensus", False])
                if event != "complete" or not answer.get("done") or answer.get("error"):
                    report.problem(f"chat before the crash failed: {event} {answer}")
                    continue
                sessions[answer["session_id"]] = 2
            if real_embeddings:
                event, added = gradio_call(client, "rag_add", [None, "The night ferry to Velmora leaves from "
                                                               "pier 9 at 23:40.", "ferry.md"])
                if event == "complete":
                    documents.update({item["id"]: item["chunk_count"] for item in added["added"]})
                else:
                    report.problem(f"adding a document failed: {added}")
        for restart in range(restarts):
            mid_answer = restart == 0
            killed = threading.Event()
            if mid_answer:
                pending = _ask_and_kill(app, killed)
                asked.append(pending)
            else:
                app.app.process.send_signal(signal.SIGKILL)
            app.app.process.wait(30)
            app = _restart(app, folder, broker, prefix, app_flags)
            try:
                _wait(lambda app=app: bool((_view(app) or {}).get("connected")), 60, "the coordinator connected", app)
                took = _wait(lambda app=app: _complete(_view(app)), 30, "the cluster view", app)
                view_back.append(took)
                if took > TELEMETRY_S + 1.0:
                    report.problem(f"restart {restart}: the cluster view took {took:.2f} s to come back "
                                   f"(telemetry every {TELEMETRY_S} s)")
            except AssertionError as error:
                report.problem(f"restart {restart}: {error}"[:2000])
                continue
            with httpx.Client(base_url=app.url, timeout=120) as client:
                _check_stores(report, client, restart, sessions, documents, asked, real_embeddings)
                event, answer = gradio_call(client, "chat", [f"after restart {restart}", next(iter(sessions), ""),
                                                            "auto", "consensus", False])
                if event != "complete" or answer.get("error") or not answer.get("text"):
                    report.problem(f"restart {restart}: the restarted app does not answer: {answer}")
                elif answer["session_id"] in sessions:
                    sessions[answer["session_id"]] += 2
            if log is not None:
                log(f"coordinator restart {restart + 1}/{restarts}: view back after {view_back[-1]:.2f} s")
    finally:
        app.stop()
    report.figures = {"restarts": restarts, "telemetry_interval_s": TELEMETRY_S,
                      "view_back_after_connect_s": summary(view_back), "sessions_checked": len(sessions),
                      "documents_checked": len(documents), "real_embeddings": real_embeddings}
    return report


def _ask_and_kill(app: RunningApp, killed: threading.Event) -> str:
    """Start a long answer, SIGKILL the app once text streams; return the session that was asked in."""
    with httpx.Client(base_url=app.url, timeout=120) as client:
        started = client.post("/gradio_api/call/chat", json={"data": [
            "a long answer that will be cut by the crash", "", "auto", "consensus", False]})
        started.raise_for_status()
        session_id = ""
        try:
            with client.stream("GET", f"/gradio_api/call/chat/{started.json()['event_id']}") as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: ") and line != "data: null":
                        payload = json.loads(line.removeprefix("data: "))
                        item = payload[-1] if isinstance(payload, list) and payload else payload
                        if isinstance(item, dict) and item.get("session_id") and item.get("text"):
                            session_id = item["session_id"]
                            app.app.process.send_signal(signal.SIGKILL)
                            killed.set()
                            break
        except httpx.HTTPError:
            pass
    if not killed.is_set():
        app.app.process.send_signal(signal.SIGKILL)
    return session_id


def _restart(app: RunningApp, folder: Path, broker: RunningBroker, prefix: str, flags: list[str]) -> RunningApp:
    """Start the web process again on the same data folder, keeping the agents."""
    agents = app.agents
    restarted = start_app(folder, broker, topic_prefix=prefix, extra=flags)
    if restarted.data_dir != app.data_dir:
        raise AssertionError(f"restarted on {restarted.data_dir}, not {app.data_dir}")
    restarted.agents = agents
    return restarted


def _check_stores(report: Report, client: httpx.Client, restart: int, sessions: dict[str, int],
                  documents: dict[str, int], asked: list[str], real_embeddings: bool) -> None:
    event, listed = gradio_call(client, "sessions_list", [])
    known = {item["id"]: item for item in listed} if event == "complete" else {}
    for session_id, count in sessions.items():
        if session_id not in known:
            report.problem(f"restart {restart}: session {session_id} is gone")
            continue
        event, history = gradio_call(client, "session_history", [session_id])
        if event != "complete" or len(history) < count:
            report.problem(f"restart {restart}: session {session_id} has {len(history or [])} of {count} messages")
    for session_id in asked:
        if not session_id:
            report.problem(f"restart {restart}: the answer never started streaming before the kill")
            continue
        event, history = gradio_call(client, "session_history", [session_id])
        if event != "complete" or not history or history[0]["role"] != "user":
            report.problem(f"restart {restart}: the question asked when the app died was lost: {history}")
    event, listed_documents = gradio_call(client, "rag_list", [])
    stored = {item["id"]: item["chunk_count"] for item in listed_documents} if event == "complete" else {}
    for document_id, chunks in documents.items():
        if stored.get(document_id) != chunks:
            report.problem(f"restart {restart}: document {document_id} has {stored.get(document_id)} of {chunks} "
                           "chunks")
    if real_embeddings and documents:
        event, hits = gradio_call(client, "rag_search", ["when does the ferry leave", 3])
        if event != "complete" or not hits or "pier 9" not in hits[0]["text"]:
            report.problem(f"restart {restart}: search after the restart does not find the document: {hits}")

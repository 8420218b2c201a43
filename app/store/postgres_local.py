"""A PostgreSQL server of the project's own, started from Debian's binaries (issue 16: several front ends).

Several ``python -m app`` instances share chats and documents through one PostgreSQL database
(``SLB_DATABASE_URL``). A user who has no database server gets one from the project's scripts:
``run_all.py --postgres`` (and the tests) start a cluster in a folder of their own (``initdb`` once, then
``postgres -D``) on 127.0.0.1 and a free or given port, with trust authentication for local connections only.
Started as root, PostgreSQL refuses to run, so the server runs as the ``postgres`` system user (the Debian
package creates it) and the folder is handed to that user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
DATABASE = "slb"


def binaries() -> Path | None:
    """Folder of the newest installed PostgreSQL server binaries (Debian's layout), or None."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    versions = sorted((path for path in root.iterdir() if (path / "bin" / "postgres").exists()),
                      key=lambda path: int(path.name) if path.name.isdigit() else 0)
    return versions[-1] / "bin" if versions else None


def available() -> bool:
    """Whether a PostgreSQL server can be started here (``apt-get install postgresql``)."""
    return binaries() is not None


def _run_as() -> tuple[int, int] | None:
    """uid/gid to run the server as: the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as error:
        raise RuntimeError("running as root needs the 'postgres' system user (apt-get install postgresql)") from error
    return entry.pw_uid, entry.pw_gid


def _demote(ids: tuple[int, int] | None):  # type: ignore[no-untyped-def]
    """preexec_fn that drops to the postgres user in the child only."""
    if ids is None:
        return None

    def drop() -> None:
        os.setgid(ids[1])
        os.setuid(ids[0])

    return drop


@dataclass
class LocalPostgres:
    """One running server; ``url`` is what ``SLB_DATABASE_URL`` takes."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT: abort transactions, then exit cleanly)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(2)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _initdb(bin_dir: Path, data_dir: Path, ids: tuple[int, int] | None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    if ids is not None:
        for path in (data_dir, *data_dir.parents):
            if path == Path("/") or path.stat().st_uid == ids[0]:
                break
            # The server user must reach its folder: parents need search permission (tmp folders are 0700).
            with contextlib.suppress(PermissionError):
                os.chmod(path, path.stat().st_mode | 0o011)
        shutil.chown(data_dir, ids[0], ids[1])
    os.chmod(data_dir, 0o700)
    logger.info("creating a PostgreSQL cluster in %s", data_dir)
    done = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--locale=C.UTF-8", "--no-sync"],
        capture_output=True, preexec_fn=_demote(ids), cwd="/",
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"initdb failed with code {done.returncode} in {data_dir}: {said}")


def _ready(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2) as connection:
            connection.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def start(data_dir: Path, port: int, *, log_file: Path | None = None) -> LocalPostgres:
    """Start (creating on first use) a server in ``data_dir`` on 127.0.0.1:``port`` and make the ``slb`` database."""
    import psycopg

    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    ids = _run_as()
    data_dir = data_dir.resolve()
    if not (data_dir / "PG_VERSION").exists():
        _initdb(bin_dir, data_dir, ids)
    log_path = log_file or data_dir.parent / f"{data_dir.name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with this process
    if ids is not None:
        with contextlib.suppress(OSError):
            os.chown(log_path, ids[0], ids[1])
    process = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
         "-c", f"unix_socket_directories={data_dir}", "-c", "fsync=on", "-c", "max_connections=200"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=_demote(ids), cwd="/",
    )
    log.close()
    server = LocalPostgres(data_dir, port, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _ready(port):
        if process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"PostgreSQL did not accept connections within {START_TIMEOUT_S:.0f} s; see {log_path}")
        time.sleep(0.1)
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
        if not exists:
            connection.execute(f"CREATE DATABASE {DATABASE}")
    logger.info("PostgreSQL ready on 127.0.0.1:%d (data in %s)", port, data_dir)
    return server

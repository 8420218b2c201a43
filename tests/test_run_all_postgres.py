"""``run_all.py --postgres`` (issue 16): it starts the project's own PostgreSQL, the app keeps its chats there,
a PostgreSQL that dies is started again (and the app reconnects), and SIGTERM stops it with the rest.

Real processes: run_all.py, its broker, the web app (no agent: chats need none) and PostgreSQL from Debian's
binaries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.processes import REPO, child_env, free_port, stop_in_time, wait_until

pytestmark = pytest.mark.slow


def _call(url: str, api: str, *data: Any) -> Any:
    """A Gradio API route called with plain HTTP (no client left holding an event stream open at shutdown)."""
    started = httpx.post(f"{url}/gradio_api/call/{api}", json={"data": list(data)}, timeout=30)
    started.raise_for_status()
    stream = httpx.get(f"{url}/gradio_api/call/{api}/{started.json()['event_id']}", timeout=60)
    event = ""
    for line in stream.text.splitlines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ").strip()
        elif line.startswith("data: ") and event == "complete":
            return json.loads(line.removeprefix("data: "))[0]
    raise AssertionError(f"{api} did not complete: {stream.text[:500]}")


def _listening(port: int) -> bool:
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/slb", connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False


def test_run_all_postgres_keeps_chats_in_its_own_database_restarts_it_and_stops_it(tmp_path: Path) -> None:
    port, mqtt_port, postgres_port = free_port(), free_port(), free_port()
    data_dir = tmp_path / "data"
    log_path = tmp_path / "run_all.log"
    database = f"postgresql://postgres@127.0.0.1:{postgres_port}/slb"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "run_all.py", "--no-browser", "--no-agent", "--postgres", "--postgres-port",
             str(postgres_port), "--port", str(port), "--mqtt-port", str(mqtt_port), "--data-dir", str(data_dir),
             "--log-level", "INFO"],
            cwd=REPO, env=child_env(SLB_RAG_WARM_UP="false"), stdout=log, stderr=subprocess.STDOUT,
        )

    def logs() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 150, "the app is up", logs,
                   interval=0.5, ignore=(httpx.HTTPError,))
        assert f"store: this cluster's own PostgreSQL at {database}" in logs()
        session_id = _call(url, "session_create", "kept in PostgreSQL")["id"]
        with psycopg.connect(database) as raw:
            assert raw.execute("SELECT title FROM sessions WHERE id = %s", (session_id,)).fetchone() == (
                "kept in PostgreSQL",)
        assert not (data_dir / "sessions.sqlite3").exists()

        # PostgreSQL dies: run_all starts it again on its folder and port, and the app's next call reconnects.
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        wait_until(lambda: "PostgreSQL stopped" in logs(), 30, "run_all notices", logs, interval=0.3)
        wait_until(lambda: _listening(postgres_port), 90, "PostgreSQL is back", logs, interval=0.5)
        listed = wait_until(lambda: _call(url, "sessions_list"), 30, "the app reads chats again", logs,
                            interval=0.5, ignore=(httpx.HTTPError, AssertionError))
        assert [info["id"] for info in listed] == [session_id]
    finally:
        code = stop_in_time(process, 60, logs)
    assert code == 0, logs()
    assert not _listening(postgres_port), "PostgreSQL still runs after run_all stopped"
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-6000:]

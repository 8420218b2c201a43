"""run_all.py supervises what it starts (issue 14): a dead part comes back with back-off, and ``--demo`` without
Ollama runs only the simulated machines, ready within seconds.

Real processes throughout: run_all.py with its real broker, web app and simulated agents; the back-off test
runs a real child that exits at once.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import run_all
from broker.mqtt.local_broker import RunningBroker
from tests.support.processes import REPO, child_env, free_port, stop_in_time, wait_until

DEMO_IDS = {agent_id for agent_id, *_ in run_all.DEMO_AGENTS}


def test_a_child_that_dies_at_once_is_restarted_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    child = run_all.Child("quitter", [sys.executable, "-c", "import sys; sys.exit(3)"])
    env = child_env()
    starts: list[float] = []
    caplog.set_level(logging.INFO, logger="run_all")
    child.start(env)
    starts.append(time.monotonic())
    deadline = time.monotonic() + 20
    while len(starts) < 4 and time.monotonic() < deadline:
        before = child.process
        child.supervise(env, time.monotonic())
        if child.process is not None and child.process is not before:
            starts.append(time.monotonic())
        time.sleep(0.05)
    if child.process is not None:
        child.process.wait(5)
    assert len(starts) == 4, caplog.text
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    for gap, delay in zip(gaps, (1, 2, 4), strict=True):
        assert delay <= gap < delay + 1.0, gaps
    for number, delay in ((1, 1), (2, 2), (3, 4)):
        assert f"quitter exited with code 3; restarting it in {delay} s (restart {number})" in caplog.text


def test_restart_delay_is_capped_and_resets_after_a_stable_run() -> None:
    assert [run_all.restart_delay(deaths) for deaths in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    child = run_all.Child("steady", [sys.executable, "-c", "import sys; sys.exit(0)"])
    child.quick_deaths = 5
    child.start(child_env())
    assert child.process is not None
    child.process.wait(5)
    child.supervise(child_env(), time.monotonic(), stable_after_s=0.0)  # it "ran long enough": back to 1 s
    assert child.quick_deaths == 1
    assert child.restart_at is not None and child.restart_at - time.monotonic() <= 1.0


def agents_by_id(url: str) -> dict[str, dict[str, Any]]:
    try:
        body = httpx.get(f"{url}/status", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {agent["id"]: agent for agent in body.get("agents", [])}


def demo_ready(agents: dict[str, dict[str, Any]]) -> bool:
    return all(agents.get(agent_id, {}).get("online") and agents[agent_id].get("model_state") == "ready"
               for agent_id in DEMO_IDS)


@pytest.mark.slow
def test_demo_without_ollama_runs_only_simulated_machines_and_a_killed_one_comes_back(tmp_path: Path) -> None:
    port, mqtt_port, no_ollama = free_port(), free_port(), free_port()
    log_path = tmp_path / "run_all.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "run_all.py", "--demo", "--no-browser", "--port", str(port), "--mqtt-port",
             str(mqtt_port), "--data-dir", str(tmp_path / "data"), "--backend-url", f"http://127.0.0.1:{no_ollama}"],
            cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        )

        def text() -> str:
            return log_path.read_text(errors="replace")

        try:
            while time.monotonic() - started < 40 and process.poll() is None:
                if demo_ready(agents_by_id(url)):
                    break
                time.sleep(0.5)
            agents = agents_by_id(url)
            assert demo_ready(agents), f"{agents}\n{text()[-5000:]}"
            ready_after = time.monotonic() - started
            assert set(agents) == DEMO_IDS, agents  # no local Ollama agent
            assert "started local agent" not in text()
            assert "--demo: Ollama is not answering" in text()

            victim = "demo-laptop"
            first_pid = int(re.findall(rf"started demo agent {victim} \(simulated\) \(pid (\d+)\)", text())[0])
            os.kill(first_pid, signal.SIGKILL)
            killed = time.monotonic()
            seen_offline = False
            while time.monotonic() - killed < 30:
                agent = agents_by_id(url).get(victim, {})
                seen_offline = seen_offline or not agent.get("online")
                pids = re.findall(rf"started demo agent {victim} \(simulated\) \(pid (\d+)\)", text())
                if len(pids) > 1 and agent.get("online") and agent.get("model_state") == "ready":
                    break
                time.sleep(0.5)
            back_after = time.monotonic() - killed
            assert back_after < 30, f"{agents_by_id(url).get(victim)}\n{text()[-5000:]}"
            assert f"demo agent {victim} (simulated) exited with code -9; restarting it in 1 s (restart 1)" in text()
            print(f"demo ready after {ready_after:.1f} s; killed agent back after {back_after:.1f} s "
                  f"(offline seen: {seen_offline})")
        finally:
            code = stop_in_time(process, 40, lambda: text()[-5000:])
    assert code == 0, text()[-5000:]
    assert "Traceback" not in text(), text()[-5000:]


def run_all_for_a_moment(tmp_path: Path, *flags: str, until: str) -> str:
    """run_all.py with only its broker (no app, no agent) until its log shows ``until``; then SIGTERM."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / "run_all.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "run_all.py", "--no-app", "--no-agent", "--data-dir", str(tmp_path / "data"), *flags],
            cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: until in log_path.read_text(errors="replace") or process.poll() is not None, 30,
                       f"run_all.py to log {until!r}", lambda: log_path.read_text(errors="replace")[-5000:])
            output = log_path.read_text(errors="replace")
            assert until in output, output
            for port in re.findall(r"this cluster's own \w+ at mqtt://127\.0\.0\.1:(\d+)", output):
                assert port_listens(int(port)), output  # the broker it says it started is there while it runs
        finally:
            code = stop_in_time(process, 30, lambda: log_path.read_text(errors="replace")[-5000:])
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    return output


def port_listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_taken_mqtt_port_gets_our_own_broker_on_a_free_port_said_in_one_line(
    tmp_path: Path, own_mosquitto: RunningBroker
) -> None:
    """A Mosquitto run_all.py did not start holds the port (as Debian's system service holds :1883)."""
    taken = own_mosquitto.port
    output = run_all_for_a_moment(tmp_path, "--mqtt-port", str(taken), until="broker: this cluster's own")
    moved = [line for line in output.splitlines() if f"127.0.0.1:{taken} is taken" in line]
    assert len(moved) == 1, output
    assert "did not start" in moved[0] and f"--broker-url mqtt://127.0.0.1:{taken}" in moved[0]
    ours = int(re.findall(r"runs its own broker on 127\.0\.0\.1:(\d+) instead", moved[0])[0])
    assert ours != taken
    assert f"this cluster's own mosquitto at mqtt://127.0.0.1:{ours}" in output
    assert not port_listens(ours), "run_all.py left its broker running"
    assert own_mosquitto.alive() and port_listens(taken), "run_all.py disturbed the broker it did not start"


def test_a_free_port_gets_our_own_broker_and_a_given_url_starts_none(tmp_path: Path, mosquitto: RunningBroker) -> None:
    port = free_port()
    output = run_all_for_a_moment(tmp_path / "own", "--mqtt-port", str(port), until="broker: this cluster's own")
    assert f"this cluster's own mosquitto at mqtt://127.0.0.1:{port} (started by run_all.py" in output
    assert "is taken" not in output

    output = run_all_for_a_moment(tmp_path / "given", "--broker-url", mosquitto.url, until="run_all.py starts none")
    assert f"broker: the one at {mosquitto.url}, given by --broker-url" in output
    assert "this cluster's own" not in output and mosquitto.alive()

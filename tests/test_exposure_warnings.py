"""The development broker says loudly when it is reachable from the network (issue 13.10).

``mosquitto/mosquitto.conf`` (and the embedded broker) let anyone in: no
password, no ACL. On 127.0.0.1 that is fine; on ``--mqtt-host 0.0.0.0`` it
hands every prompt and answer to the LAN, so ``start_broker`` and
``run_all.py`` warn and point to docs/security.md.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.mqtt.local_broker import free_port, start_broker
from tests.support.processes import REPO, child_env


def test_the_dev_broker_on_a_lan_address_warns_and_on_loopback_does_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.mqtt.local_broker")
    quiet = start_broker(tmp_path / "loopback", port=free_port(), host="127.0.0.1", prefer="mosquitto")
    quiet.stop()
    assert "no authentication" not in caplog.text.lower()
    open_broker = start_broker(tmp_path / "lan", port=free_port(), host="0.0.0.0", prefer="mosquitto")
    open_broker.stop()
    warnings = [record for record in caplog.records if "authentication" in record.getMessage().lower()]
    assert warnings and warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "0.0.0.0" in message and "docs/security.md" in message and "mosquitto.secure.conf" in message


@pytest.mark.slow
def test_run_all_warns_when_its_broker_listens_on_the_lan(tmp_path: Path) -> None:
    log_path = tmp_path / "run_all.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "run_all.py", "--mqtt-host", "0.0.0.0", "--mqtt-port", str(free_port()), "--no-app",
             "--no-agent", "--no-browser", "--data-dir", str(tmp_path / "data")],
            cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "only the broker runs" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.2)
        text = log_path.read_text(errors="replace")
        assert "only the broker runs" in text, text
        lines = [line for line in text.splitlines() if "no authentication" in line.lower()]
        assert len(lines) >= 2 and all("WARNING" in line and "docs/security.md" in line for line in lines), text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

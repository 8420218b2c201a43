"""A real Mosquitto with the shipped secure config (passwords, ACL, the coordinator's own listener) for tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from broker.mqtt.local_broker import SECURE_CONFIG, RunningBroker, free_port, start_broker

COORDINATOR_LISTENER = 1884
"""The coordinator's loopback listener, as written in mosquitto/mosquitto.secure.conf."""


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file with ``users`` (name → password), readable by its owner only."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise RuntimeError("mosquitto_passwd is needed (apt-get install mosquitto); scripts/test.sh installs it")
    path.touch(mode=0o600)
    for name, password in users.items():
        subprocess.run([tool, "-b", str(path), name, password], check=True, capture_output=True)
    return path


def start_secure_broker(folder: Path, users: Mapping[str, str],
                        coordinator_users: Mapping[str, str] | None = None) -> RunningBroker:
    """mosquitto.secure.conf as shipped on a free port; ``coordinator_users`` also fills the coordinator
    listener's own password file (otherwise the config's default file is used)."""
    overrides = {"password_file": str(write_password_file(folder / "passwd", users))}
    if coordinator_users is not None:
        coordinators = write_password_file(folder / "coordinator.passwd", coordinator_users)
        overrides[f"password_file@{COORDINATOR_LISTENER}"] = str(coordinators)
    return start_broker(folder, port=free_port(), prefer="mosquitto", config=SECURE_CONFIG, overrides=overrides)

"""Start an MQTT broker for run_all.py and the tests.

Mosquitto from ``mosquitto/`` when the binary is on PATH; otherwise the
embedded Python broker (amqtt), so a plain ``pip install`` still gives a
working single-machine cluster. The log says which one runs and what the
embedded one cannot do.
"""

from __future__ import annotations

import getpass
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_DIR = PROJECT_ROOT / "mosquitto"
DEFAULT_CONFIG = MOSQUITTO_DIR / "mosquitto.conf"
SECURE_CONFIG = MOSQUITTO_DIR / "mosquitto.secure.conf"

EMBEDDED_LIMITS = (
    "embedded broker (amqtt) in use: MQTT 3.1.1 only (no v5 reason codes, so refused publishes are silent), "
    "no ACL or password file from mosquitto/, no TLS, less throughput. Install Mosquitto for real use "
    "(apt-get install mosquitto / brew install mosquitto)."
)

_PATH_DIRECTIVES = ("password_file", "acl_file", "cafile", "certfile", "keyfile", "capath", "include_dir")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def open_broker_warning(host: str, port: int) -> str | None:
    """The warning for a development broker (no password, no ACL) that listens beyond this machine.

    ``None`` on loopback, where only this machine's users can reach it.
    """
    if host in LOOPBACK_HOSTS:
        return None
    return (
        f"!!! the development broker on {host}:{port} has NO authentication and NO access control: anyone who "
        "can reach this port reads every prompt and answer and can pose as an agent or as the coordinator. "
        "Keep it on 127.0.0.1 (the default --mqtt-host); for a LAN run Mosquitto with "
        "mosquitto/mosquitto.secure.conf (passwords, ACL, optional TLS) as docs/security.md shows !!!"
    )


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, below the kernel's ephemeral range when there is room.

    Why not the port ``bind(0)`` gives: it comes from the ephemeral range, so between this call and the
    server's own bind (seconds, for a Python app importing its libraries) any outgoing connection on the
    machine may take it as its source port, and the server fails with "address already in use" (seen once
    in the test suite, two files running side by side).
    """
    low, _ = _ephemeral_range()
    if low > 11_000:
        rng = random.SystemRandom()
        for _ in range(50):
            port = rng.randrange(10_000, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def template_listeners(template: Path) -> list[tuple[int, str]]:
    """``(port, host)`` of every ``listener`` line of a Mosquitto config, in order."""
    found: list[tuple[int, str]] = []
    for raw in template.read_text().splitlines():
        parts = raw.split()
        if len(parts) >= 2 and parts[0] == "listener" and parts[1].isdigit():
            found.append((int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return found


def render_mosquitto_config(
    template: Path,
    *,
    port: int,
    host: str,
    data_dir: Path,
    overrides: dict[str, str] | None = None,
    extra: str = "",
    listener_ports: dict[int, int] | None = None,
) -> str:
    """Copy of ``template`` with our listeners, persistence folder, absolute paths and the current user.

    The first listener gets ``port`` and ``host``; a further listener (the secure config's coordinator
    listener) keeps its host and gets the port ``listener_ports`` maps its written port to. ``overrides``:
    ``key`` replaces that setting everywhere, ``key@PORT`` only in the block of the listener written with
    PORT (the secure config has one password file per listener). ``extra`` (a TLS listener) is appended with
    the same treatment of paths and overrides.
    """
    lines: list[str] = []
    listener_done = False
    block_port: int | None = None  # written port of the listener whose block we are in

    def rendered(raw: str, *, from_template: bool) -> str | None:
        nonlocal listener_done, block_port
        line = raw.strip()
        words = line.split(None, 2) if line and not line.startswith("#") else []
        key = words[0] if words else ""
        if key == "listener":
            written = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
            block_port = written
            if from_template and not listener_done:
                listener_done = True
                return f"listener {port} {host}"
            if from_template and written is not None and listener_ports and written in listener_ports:
                return f"listener {listener_ports[written]} {words[2] if len(words) > 2 else ''}".rstrip()
            return raw
        if key == "persistence_location":
            return f"persistence_location {data_dir}/"
        if key in ("user", "pid_file"):
            return None
        if overrides and block_port is not None and f"{key}@{block_port}" in overrides:
            return f"{key} {overrides[f'{key}@{block_port}']}"
        if overrides and key in overrides:
            return f"{key} {overrides[key]}"
        if key in _PATH_DIRECTIVES:
            value = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
            path = Path(value)
            if not path.is_absolute():
                path = (PROJECT_ROOT / path).resolve()
            return f"{key} {path}"
        return raw

    for raw in template.read_text().splitlines():
        line = rendered(raw, from_template=True)
        if line is not None:
            lines.append(line)
    if not listener_done:
        lines.insert(0, f"listener {port} {host}")
    # Started as root, mosquitto drops to its own user and then cannot read our files.
    lines.append(f"user {getpass.getuser()}")
    for raw in extra.splitlines():
        line = rendered(raw, from_template=False)
        if line is not None:
            lines.append(line)
    return "\n".join(lines) + "\n"


def stop_process(process: subprocess.Popen[bytes], timeout: float, signum: int = signal.SIGTERM) -> int | None:
    """Ask a child to stop (``signum``), wait up to ``timeout``, then SIGKILL it; return its exit code.

    The one shutdown sequence for every child we start (broker, app, agents, bench and test processes).
    """
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"broker exited with code {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")


@dataclass
class RunningBroker:
    """A broker process we started."""

    kind: Literal["mosquitto", "embedded"]
    host: str
    port: int
    command: list[str]
    log_path: Path
    config_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    listeners: dict[int, int] = field(default_factory=dict)
    """Further listeners of the config: written port -> the free port they got (the secure coordinator one)."""

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def listener_url(self, written_port: int) -> str:
        """URL of the config's listener written with ``written_port`` (e.g. 1884, the coordinator listener)."""
        return f"mqtt://127.0.0.1:{self.listeners[written_port]}"

    def start(self, timeout: float = 10.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, timeout, self.process)
        except (RuntimeError, TimeoutError, OSError):
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.kind} broker failed to start on {self.host}:{self.port}:\n{tail}") from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM), then force."""
        if self.process is not None:
            stop_process(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)


def start_broker(
    data_dir: Path,
    *,
    port: int = 1883,
    host: str = "127.0.0.1",
    prefer: Literal["auto", "mosquitto", "embedded"] = "auto",
    config: Path = DEFAULT_CONFIG,
    overrides: dict[str, str] | None = None,
    extra_config: str = "",
    timeout: float = 10.0,
) -> RunningBroker:
    """Start Mosquitto (rendered from ``config``) or the embedded broker, and wait until it listens."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = mosquitto_binary() if prefer != "embedded" else None
    if prefer == "mosquitto" and binary is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    exposed = open_broker_warning(host, port) if config == DEFAULT_CONFIG or binary is None else None
    if exposed:
        logger.warning("%s", exposed)
    if binary is not None:
        state_dir = data_dir / "mosquitto"
        state_dir.mkdir(parents=True, exist_ok=True)
        config_path = state_dir / f"mosquitto-{port}.conf"
        listener_ports = {written: free_port() for written, _ in template_listeners(config)[1:]}
        config_path.write_text(
            render_mosquitto_config(config, port=port, host=host, data_dir=state_dir, overrides=overrides,
                                    extra=extra_config, listener_ports=listener_ports)
        )
        broker = RunningBroker(
            kind="mosquitto",
            host=host,
            port=port,
            command=[binary, "-c", str(config_path)],
            log_path=state_dir / f"mosquitto-{port}.log",
            config_path=config_path,
            listeners=listener_ports,
        )
        broker.start(timeout)
        logger.info("broker: Mosquitto (%s) on %s:%d, config %s, log %s", binary, host, port, config_path,
                    broker.log_path)
        return broker
    broker = RunningBroker(
        kind="embedded",
        host=host,
        port=port,
        command=[sys.executable, "-m", "broker.mqtt.embedded", "--host", host, "--port", str(port)],
        log_path=data_dir / f"embedded-broker-{port}.log",
    )
    env_note = "" if prefer == "embedded" else " (mosquitto not found on PATH)"
    broker.start(timeout)
    logger.warning("broker: embedded amqtt on %s:%d%s. %s", host, port, env_note, EMBEDDED_LIMITS)
    return broker

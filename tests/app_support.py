"""Helpers to run the real web app and real agents as child processes (used by tests/app_fixtures.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from broker.mqtt.local_broker import RunningBroker, free_port
from tests.ollama_double import OllamaDouble
from tests.support.processes import REPO, AgentProcess, ChildProcess, spawn, wait_until

T = TypeVar("T")
ARTIFACTS = REPO / "tests" / "artifacts"
API_KEY = "test-key-" + uuid.uuid4().hex[:8]
UI_USER = ("admin", "pass-" + uuid.uuid4().hex[:6])
OLLAMA_AGENT = "gpu-box"
SIMULATED_AGENT = "pi-sim"


APP_NOT_YET = (httpx.HTTPError, json.JSONDecodeError, KeyError)
"""What polling a starting or busy app may raise before the awaited state is there."""


@dataclass
class RunningApp:
    url: str
    port: int
    data_dir: Path
    topic_prefix: str
    broker_url: str
    app: ChildProcess
    double: OllamaDouble | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    api_key: str | None = None
    auth: tuple[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def logs(self) -> str:
        parts = [f"--- {self.app.name}\n{self.app.log(6000)}"]
        parts += [f"--- {proc.name}\n{proc.log(3000)}" for proc in self.agents.values()]
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        self.app.stop()


def start_app(
    folder: Path, broker: RunningBroker, *, topic_prefix: str, extra: list[str] | None = None
) -> RunningApp:
    port = free_port()
    data_dir = folder / "app-data"
    args = [
        "-m", "app",
        "--port", str(port),
        "--broker-url", broker.url,
        "--topic-prefix", topic_prefix,
        "--data-dir", str(data_dir),
        "--replan-debounce-s", "0.3",
        "--log-level", "INFO",
        *(extra or []),
    ]
    proc = spawn("app", args, folder)
    running = RunningApp(
        url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, topic_prefix=topic_prefix,
        broker_url=broker.url, app=proc,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"python -m app exited with {proc.process.returncode}:\n{proc.log(4000)}")
        try:
            if httpx.get(f"{running.url}/health", timeout=2).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"python -m app did not answer /health within 90 s:\n{proc.log(4000)}")


# Declared hardware for the agents (``--hardware-profile``): a GPU desktop and a Raspberry Pi.
GPU_DESKTOP = {
    "description": "gaming PC", "cpu_brand": "AMD Ryzen 9 7950X", "cpu_physical_cores": 16, "cpu_logical_cores": 32,
    "cpu_max_ghz": 5.7, "ram_total_gb": 64, "os": "Linux", "arch": "x86_64",
    "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vendor": "nvidia", "vram_total_gb": 24}],
}
RASPBERRY_PI = {
    "description": "Raspberry Pi 5", "cpu_brand": "Cortex-A76", "cpu_physical_cores": 4, "cpu_logical_cores": 4,
    "cpu_max_ghz": 2.4, "ram_total_gb": 8, "os": "Linux", "arch": "aarch64", "gpus": [],
}


def write_profile(folder: Path, agent_id: str, profile: dict[str, Any]) -> Path:
    path = folder / f"{agent_id}-hardware.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile))
    return path


def start_agent(
    running: RunningApp, folder: Path, agent_id: str, *, backend: str, backend_url: str | None = None,
    profile: dict[str, Any], extra: list[str] | None = None,
) -> AgentProcess:
    args = [
        "-m", "agent",
        "--broker-url", running.broker_url,
        "--topic-prefix", running.topic_prefix,
        "--agent-id", agent_id,
        "--backend", backend,
        "--data-dir", str(folder / agent_id),
        "--hardware-profile", str(write_profile(folder, agent_id, profile)),
        "--telemetry-interval-s", "0.5",
        *(["--backend-url", backend_url] if backend_url else []),
        *(extra or []),
    ]
    proc = spawn(agent_id, args, folder, kind=AgentProcess)
    running.agents[agent_id] = proc
    return proc


def wait_for_app(predicate: Callable[[], T], timeout: float, what: str, running: RunningApp | None = None) -> T:
    """:func:`tests.support.processes.wait_until` for app state: HTTP errors mean "not yet"; logs on timeout."""
    return wait_until(predicate, timeout, what, running.logs if running is not None else None, interval=0.2,
                      ignore=APP_NOT_YET)



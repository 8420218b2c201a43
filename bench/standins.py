"""A cluster of Ollama-like stand-ins behind the real path: doubles → agents → MQTT → ``python -m app`` → ``/v1``.

Each machine is one ``bench.double`` process (the Ollama test double with Nagle off) at a fixed speed, time to
first token, prefill speed and number of parallel generations, with a real ``python -m agent --backend ollama``
in front of it that announces ``--max-parallel`` (two by default, as agents did before measuring: the runtime
profile must find the one real slot). Used by the routing stand-in run (bench/bench_routing.py) and the
conversation bench (bench/bench_affinity.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import agent_args, mosquitto
from broker.mqtt.local_broker import free_port
from tests.support.processes import ChildProcess, child_env, spawn, wait_until

MODELS = "llama3.1:8b,llama3.2:3b,llama3.2:1b"


@dataclass(frozen=True)
class Standin:
    """One Ollama-like machine."""

    agent_id: str
    tokens_per_s: float
    ttft_s: float
    profile: str = "gpu-desktop"
    prefill_tokens_per_s: float = 0.0
    num_parallel: int = 1
    announced_parallel: int = 2


@dataclass(frozen=True)
class Cluster:
    app_url: str
    broker_url: str
    prefix: str
    doubles: dict[str, str]


@dataclass(frozen=True)
class Answer:
    """One streamed /v1 answer, timed by the client."""

    ttft_s: float
    total_s: float
    agent: str
    text: str
    error: str | None = None


def _start_double(spec: Standin, folder: Path) -> tuple[ChildProcess, str]:
    port = free_port()
    double = spawn(f"double-{spec.agent_id}", [
        "-m", "bench.double", "--port", str(port), "--models", MODELS, "--tokens-per-s", str(spec.tokens_per_s),
        "--ttft-ms", str(spec.ttft_s * 1000), "--num-parallel", str(spec.num_parallel),
        "--prefill-tokens-per-s", str(spec.prefill_tokens_per_s), "--pull-mb-per-s", "500"], folder)
    return double, f"http://127.0.0.1:{port}"


def _up(url: str, path: str) -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def standin_cluster(specs: Sequence[Standin], folder: Path, *, settings: dict[str, str] | None = None,
                    ready_timeout_s: float = 240, with_app: bool = True) -> Iterator[Cluster]:
    """Start everything, wait until every agent is online with a ready model and a measured runtime profile;
    stop everything on the way out (also on Ctrl-C). ``settings``: ``SLB_`` variables for the app.
    ``with_app=False``: no app (the caller runs its own Coordinator and waits for the agents itself)."""
    prefix = f"slbbench/{uuid.uuid4().hex[:8]}/v1"
    procs: list[ChildProcess] = []
    with mosquitto() as broker:
        try:
            doubles: dict[str, str] = {}
            for spec in specs:
                double, url = _start_double(spec, folder)
                procs.append(double)
                doubles[spec.agent_id] = url
            for spec in specs:
                wait_until(lambda url=doubles[spec.agent_id]: _up(url, "/api/version"), 30, "a double")
            if not with_app:
                for spec in specs:
                    procs.append(spawn(spec.agent_id, agent_args(
                        broker.url, prefix, spec.agent_id, folder, backend="ollama", profile=spec.profile,
                        max_parallel=spec.announced_parallel,
                        extra=["--backend-url", doubles[spec.agent_id]]), folder))
                yield Cluster("", broker.url, prefix, doubles)
                return
            port = free_port()
            app = spawn("app", ["-m", "app", "--port", str(port), "--broker-url", broker.url, "--topic-prefix",
                                prefix, "--data-dir", str(folder / "app-data"), "--no-rag-warm-up",
                                "--replan-debounce-s", "0.3", "--log-level", "WARNING"], folder,
                        env=child_env(**(settings or {})))
            procs.append(app)
            app_url = f"http://127.0.0.1:{port}"
            for spec in specs:
                procs.append(spawn(spec.agent_id, agent_args(
                    broker.url, prefix, spec.agent_id, folder, backend="ollama", profile=spec.profile,
                    max_parallel=spec.announced_parallel,
                    extra=["--backend-url", doubles[spec.agent_id]]), folder))

            def ready() -> bool:
                if not app.alive():
                    raise RuntimeError(f"python -m app exited:\n{app.log()}")
                try:
                    agents = httpx.get(f"{app_url}/status", timeout=2).json().get("agents", [])
                except (httpx.HTTPError, ValueError):
                    return False
                good = [a for a in agents if a.get("online") and a.get("model_state") == "ready"
                        and (a.get("runtime") or {}).get("slots_source") in ("measured", "reported")]
                return len(good) == len(specs)

            wait_until(ready, ready_timeout_s, "every stand-in agent ready with a measured runtime profile",
                       interval=0.5)
            yield Cluster(app_url, broker.url, prefix, doubles)
        finally:
            for child in reversed(procs):
                child.stop()


def cluster_slots(app_url: str) -> dict[str, Any]:
    """Each agent's announced and measured slots, as the coordinator sees them."""
    agents = httpx.get(f"{app_url}/status", timeout=5).json().get("agents", [])
    return {a["id"]: {"max_parallel": a.get("max_parallel"), "slots": a.get("slots"),
                      "slots_source": (a.get("runtime") or {}).get("slots_source"), "model": a.get("model")}
            for a in agents}


async def ask_v1(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
                 max_tokens: int | None = None, model: str = "auto") -> Answer:
    """Stream one answer from ``/v1/chat/completions``; the agent comes from the ``slb`` provenance."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    started = time.monotonic()
    first = None
    agent = ""
    pieces: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Answer(0.0, time.monotonic() - started, "", "", f"HTTP {response.status_code}: "
                                                                       f"{response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                part = json.loads(line[6:])
                if "error" in part:
                    return Answer(0.0, time.monotonic() - started, agent, "".join(pieces), str(part["error"])[:200])
                agents = (part.get("slb") or {}).get("agents")
                if agents:
                    agent = agents[-1]
                choices = part.get("choices") or []
                content = (choices[0].get("delta") or {}).get("content") if choices else None
                if content:
                    first = first or time.monotonic()
                    pieces.append(content)
    except httpx.HTTPError as error:
        return Answer(0.0, time.monotonic() - started, agent, "".join(pieces), f"{type(error).__name__}: {error}")
    ended = time.monotonic()
    return Answer((first or ended) - started, ended - started, agent, "".join(pieces))

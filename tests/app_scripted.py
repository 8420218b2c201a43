"""A scripted coordinator and an in-process web app, for HTTP tests of what no real cluster shows on demand.

A failover that restarts the answer, a runtime's ``length`` finish reason, a pull on three machines, an agent
whose runtime cannot unload: :class:`ScriptedCoordinator` implements :class:`app.ports.CoordinatorPort` and
plays back the events a test scripts, and records what the app asked of it. :func:`serve` runs the real
``create_app`` under uvicorn on a free port in a thread, so the ``openai`` and ``ollama`` SDKs talk to it
over real HTTP. The real coordinator over MQTT is covered by tests/test_http_api.py and
tests/test_app_models_live.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from app.server import create_app
from app.settings import AppSettings
from broker.coordinator.contract import (
    AgentView,
    ClusterSnapshot,
    LoadedModel,
    ManageEvent,
    ManageFinished,
    ManageProgress,
    ManageStarted,
    ModelAvailability,
    ModelHolder,
    PlanView,
    QueryEvent,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.mqtt.local_broker import free_port
from broker.protocol.messages import Operation

Script = Callable[[QueryRequest], list[QueryEvent]]


def agent(agent_id: str, **fields: object) -> AgentView:
    defaults: dict[str, object] = {"online": True, "score": 50.0, "model": None, "model_state": None}
    defaults.update(fields)
    return AgentView(id=agent_id, **defaults)  # type: ignore[arg-type]


def answer(request: QueryRequest, agent_id: str, model: str, pieces: list[str], **finished: object) -> list[QueryEvent]:
    """Events of a plain answer: started, one delta per piece, finished with the pieces' text."""
    events: list[QueryEvent] = [QueryStarted(request.request_id, [agent_id], [model], request.mode)]
    events += [TextDelta(request.request_id, piece, agent_id, model) for piece in pieces]
    events.append(QueryFinished(request.request_id, "".join(pieces), [agent_id], [model], request.mode,
                                **finished))  # type: ignore[arg-type]
    return events


@dataclass
class ScriptedCoordinator:
    """Plays back scripted query and model-operation events; remembers every request."""

    agents: list[AgentView] = field(default_factory=list)
    available: list[ModelAvailability] = field(default_factory=list)
    loaded: list[LoadedModel] = field(default_factory=list)
    script: Script | None = None
    manage_script: Callable[[str, str, list[str] | None], list[ManageEvent]] | None = None
    queries: list[QueryRequest] = field(default_factory=list)
    operations: list[tuple[str, str, list[str] | None]] = field(default_factory=list)
    event_gap_s: float = 0.0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            agents=list(self.agents), ready_models=[a.model for a in self.agents if a.model and
                                                    a.model_state == "ready"],
            connected=True, generated_at=time.time(), servable_models=[m.name for m in self.available],
            models=list(self.available),
        )

    def model_names(self) -> list[str]:
        return [model.name for model in self.available]

    def models(self) -> list[ModelAvailability]:
        return list(self.available)

    def loaded_models(self) -> list[LoadedModel]:
        return list(self.loaded)

    def plan(self) -> PlanView:
        return PlanView(entries=[], excluded={}, applied=False, created_at=time.time())

    async def reassign(self) -> PlanView:
        return PlanView(entries=[], excluded={}, applied=True, created_at=time.time())

    async def query(self, request: QueryRequest) -> AsyncIterator[QueryEvent]:
        self.queries.append(request)
        assert self.script is not None, "the test set no script"
        for event in self.script(request):
            if self.event_gap_s:
                await asyncio.sleep(self.event_gap_s)
            yield event

    async def cancel(self, request_id: str) -> bool:
        return False

    def manage_targets(self, action: str, model: str, agents: list[str] | None = None) -> tuple[list[str], str]:
        if agents:
            return list(agents), "the agents named in the request"
        if action == "unload":
            holders = [item.agent_id for item in self.loaded if item.display_name == model or item.name == model]
            return holders, "where it is loaded" if holders else f"no online agent has {model} loaded"
        return [a.id for a in self.agents if a.online], "every agent"

    async def manage(self, action: str, model: str, *, agents: list[str] | None = None,
                     timeout_s: float | None = None, request_id: str | None = None) -> AsyncIterator[ManageEvent]:
        self.operations.append((action, model, agents))
        assert self.manage_script is not None, "the test set no manage script"
        for event in self.manage_script(action, model, agents):
            if self.event_gap_s:
                await asyncio.sleep(self.event_gap_s)
            yield event


def holders(*pairs: tuple[str, str], state: str = "ready") -> list[ModelHolder]:
    return [ModelHolder(agent_id, name, state) for agent_id, name in pairs]  # type: ignore[arg-type]


def pull_events(model: str, agents: list[str], *, fail: dict[str, str] | None = None,
                steps: int = 3, total: int = 1000) -> list[ManageEvent]:
    """What the coordinator streams for a pull on ``agents``: started, byte progress per agent, one done each."""
    fail = fail or {}
    events: list[ManageEvent] = [ManageStarted("op1", "pull", model, agents, "the agents named in the request")]
    for agent_id in agents:
        events.append(ManageProgress("op1", agent_id, Operation(request_id="w1", action="pull", model=model,
                                                                status="pulling manifest")))
        for step in range(1, steps + 1):
            events.append(ManageProgress("op1", agent_id, Operation(
                request_id="w1", action="pull", model=model, status="pulling 8eeb52dfb3bb",
                completed_bytes=total * step // steps, total_bytes=total)))
        events.append(ManageProgress("op1", agent_id, Operation(request_id="w1", action="pull", model=model,
                                                                status="success")))
        events.append(ManageProgress("op1", agent_id, Operation(
            request_id="w1", action="pull", model=model, status="failed" if agent_id in fail else "success",
            done=True, error=fail.get(agent_id))))
    events.append(ManageFinished("op1", "pull", model, {agent_id: fail.get(agent_id) for agent_id in agents}))
    return events


@dataclass
class ServedApp:
    url: str
    coordinator: ScriptedCoordinator
    server: uvicorn.Server


@contextmanager
def serve(coordinator: ScriptedCoordinator, folder: Path, **settings: object) -> Iterator[ServedApp]:
    """The real web app around ``coordinator``, on a free port, until the block ends."""
    port = free_port()
    app = create_app(AppSettings(port=port, data_dir=folder, rag_warm_up=False, **settings),  # type: ignore[arg-type]
                     coordinator=coordinator)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="scripted-app", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise RuntimeError("the scripted app did not start within 60 s")
    try:
        yield ServedApp(url, coordinator, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)

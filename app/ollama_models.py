"""Ollama's model routes over the whole cluster: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/pull``,
``/api/delete``, and the load / unload that ``keep_alive`` asks for — so Open WebUI's model manager works unchanged.

A model operation goes to agents through the coordinator (``manage``: one
``Manage`` per agent, their ``Operation`` replies back) and comes back here in
Ollama's own shapes: pull progress as NDJSON (``{"status": "pulling manifest"}``,
``{"status": "downloading …", "digest", "total", "completed"}``, ``{"status":
"success"}``, or a last ``{"error": "…"}``), a delete as an empty 200. What is
loaded where is what the agents' runtimes report (``loaded_models``), never a
guess. docs/api.md has the wire shapes and the choice of target machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api_common import OWNER, VIRTUAL_MODELS, ApiContext, ApiError, json_body, now_iso, validation_message
from app.errors import BadRequest
from app.model_list import ListedModel, find_listed
from broker.coordinator.contract import (
    LoadedModel,
    ManageEvent,
    ManageFinished,
    ManageProgress,
    ManageStarted,
)

logger = logging.getLogger(__name__)

KEEP_ALIVE_ZERO = re.compile(r"^\s*[+-]?0+(\.0*)?\s*(ns|us|µs|ms|s|m|h)?\s*$")
PULL_ELSEWHERE = (
    "runtimes other than Ollama cannot pull: put the model on that machine with the runtime's own tool "
    "(llama.cpp / llama-cpp-python: download the GGUF and restart the server; LM Studio: `lms get`; vLLM: start "
    "it with the model) — its agent then lists the model and the cluster serves it"
)
NO_EXPIRY = "0001-01-01T00:00:00Z"
"""``expires_at`` of a loaded model: the agents do not report when their runtime will unload it."""


class ModelRequest(BaseModel):
    """The body of ``/api/pull``, ``/api/delete`` and ``/api/show``; ``slb_agents`` is this cluster's extension."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=200)
    name: str | None = Field(default=None, max_length=200)
    stream: bool = True
    slb_agents: list[str] | None = Field(default=None, max_length=256)
    """The agents to act on (default: the coordinator's choice, docs/api.md)."""

    def model_name(self) -> str:
        name = (self.model or self.name or "").strip()
        if not name:
            raise BadRequest("model is required", param="model")
        return name


def keep_alive_is_zero(value: Any) -> bool:
    """Ollama's ``keep_alive: 0`` (``0``, ``"0"``, ``"0s"``, ``"0m"``…): unload the model now."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        return value == 0
    return isinstance(value, str) and bool(KEEP_ALIVE_ZERO.match(value))


def digest_of(name: str) -> str:
    """A stable digest for a model name (the agents do not report their runtimes' digests)."""
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def parameter_size(parameters_b: float | None) -> str:
    if not parameters_b:
        return ""
    return f"{parameters_b * 1000:.0f}M" if parameters_b < 1 else f"{parameters_b:.3g}B"


def tags_entry(name: str, model: ListedModel | None = None) -> dict[str, Any]:
    """One ``/api/tags`` entry, Ollama-shaped; ``slb_agents`` / ``slb_coming_to`` name the machines."""
    info = model.info if model is not None else None
    family = "cluster" if name in VIRTUAL_MODELS else ((info.family if info else None) or name.split(":")[0])
    entry: dict[str, Any] = {
        "name": name,
        "model": name,
        "modified_at": now_iso(),
        "size": int(info.memory_gb * 1e9) if info and info.memory_gb else 0,
        "digest": digest_of(name)[len("sha256:"):],
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": parameter_size(info.parameters_b if info else None),
            "quantization_level": "",
        },
    }
    if model is not None:
        entry["slb_agents"] = model.agents
        if model.coming_to:
            entry["slb_coming_to"] = model.coming_to
    return entry


def ps_entries(loaded: list[LoadedModel]) -> list[dict[str, Any]]:
    """``/api/ps``: one entry per model in some runtime's memory, with the agents that hold it."""
    grouped: dict[str, list[LoadedModel]] = {}
    for item in loaded:
        grouped.setdefault(item.display_name, []).append(item)
    entries = []
    for name, items in sorted(grouped.items()):
        first = items[0]
        size = int(first.memory_gb * 1e9) if first.memory_gb else 0
        entries.append({
            "name": name,
            "model": name,
            "size": size,
            "digest": digest_of(name)[len("sha256:"):],
            "details": {"parent_model": "", "format": "gguf", "family": name.split(":")[0],
                        "families": [name.split(":")[0]], "parameter_size": parameter_size(first.parameters_b),
                        "quantization_level": ""},
            "expires_at": NO_EXPIRY,
            "size_vram": size,
            "context_length": first.context_length or 0,
            "slb_agents": [item.agent_id for item in items],
        })
    return entries


@dataclass
class PullProgress:
    """Folds the agents' pull reports into Ollama's progress lines (one download bar over every target)."""

    model: str
    agents: list[str] = field(default_factory=list)
    bytes_by_agent: dict[str, tuple[int, int]] = field(default_factory=dict)

    def started(self, event: ManageStarted) -> dict[str, Any]:
        self.agents = list(event.agents)
        return {"status": "pulling manifest", "slb": {"event": "started", "agents": self.agents,
                                                      "reason": event.reason}}

    def progress(self, event: ManageProgress) -> dict[str, Any] | None:
        """The line for one agent's report (None for none). ``success`` stays the cluster's last word: one agent's
        end is said as ``pulled on X``."""
        operation, agent = event.operation, event.agent_id
        slb = {"agent": agent, "status": operation.status}
        if operation.done:
            if operation.error:
                return {"status": f"failed on {agent}: {operation.error}", "slb": {**slb, "error": operation.error}}
            return {"status": f"pulled on {agent}", "slb": slb}
        if operation.total_bytes:
            self.bytes_by_agent[agent] = (operation.completed_bytes or 0, operation.total_bytes)
            machines = f" on {len(self.agents)} machines" if len(self.agents) > 1 else ""
            return {
                "status": f"downloading {self.model}{machines}",
                "digest": digest_of(self.model),
                "total": sum(total for _, total in self.bytes_by_agent.values()),
                "completed": sum(completed for completed, _ in self.bytes_by_agent.values()),
                "slb": slb,
            }
        if operation.status == "success":
            return None  # the runtime's own last word; "pulled on X" follows with the agent's done message
        return {"status": operation.status or "pulling", "slb": slb}

    def finished(self, event: ManageFinished) -> dict[str, Any]:
        if event.ok:
            return {"status": "success", "slb": {"agents": list(event.results)}}
        return {"error": outcome_error(event)}


def outcome_error(event: ManageFinished) -> str:
    """What went wrong with a model operation, per agent, and where it worked."""
    if event.error:
        return event.error
    failed = {agent: error for agent, error in event.results.items() if error is not None}
    worked = [agent for agent, error in event.results.items() if error is None]
    text = "; ".join(f"{agent}: {error}" for agent, error in failed.items())
    message = f"{event.action} {event.model} failed on {text}"
    return message + (f" (it worked on {', '.join(worked)})" if worked else "")


def ndjson(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


def build_ollama_model_routes(ollama: APIRouter, context: ApiContext) -> ModelActions:
    """Add the model routes to the ``/api`` router; returns the load / unload helpers chat and generate use."""
    service = context.service
    coordinator = service.coordinator
    actions = ModelActions(context)

    @ollama.get("/tags")
    async def tags() -> dict[str, Any]:
        """The routing modes and every model the cluster serves, as Ollama lists local models."""
        models = [tags_entry(name) for name in VIRTUAL_MODELS]
        models += [tags_entry(model.name, model) for model in service.models()]
        return {"models": models}

    @ollama.get("/ps")
    async def running() -> dict[str, Any]:
        """Models in some agent's runtime memory now (what the agents' runtimes report)."""
        return {"models": ps_entries(coordinator.loaded_models())}

    @ollama.post("/show")
    async def show(request: Request) -> dict[str, Any]:
        """Model details from the catalog, with the machines that have it."""
        payload = await read_model_request(request)
        mode = context.resolve_mode(payload.model_name())
        listed = find_listed(mode, service.models())
        entry = tags_entry(mode, listed)
        info = listed.info if listed is not None else None
        model_info: dict[str, Any] = {}
        if info is not None and info.context_length:
            model_info["general.context_length"] = info.context_length
        if info is not None and info.parameters_b:
            model_info["general.parameter_count"] = int(info.parameters_b * 1e9)
        where = f"on {', '.join(listed.agents)}" if listed is not None and listed.agents else "routed to an agent"
        return {
            "license": "",
            "modelfile": f"# served by {OWNER}: {VIRTUAL_MODELS.get(mode, where)}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": entry["details"],
            "model_info": model_info,
            "capabilities": ["embedding"] if info is not None and info.embedding else ["completion"],
            "modified_at": entry["modified_at"],
            **({"slb_agents": entry["slb_agents"]} if "slb_agents" in entry else {}),
        }

    @ollama.post("/pull")
    async def pull(request: Request) -> Response:
        """Pull a model on the cluster's machines, with Ollama's NDJSON progress (one object with stream false)."""
        payload = await read_model_request(request)
        name = payload.model_name()
        agents = actions.check_agents(payload.slb_agents)
        events = coordinator.manage("pull", name, agents=agents)
        first = await anext(events)
        if isinstance(first, ManageFinished):  # nothing started: a proper HTTP error instead of a stream
            await events.aclose()
            raise ApiError(400, f"cannot pull {name}: {outcome_error(first)}. {PULL_ELSEWHERE}", "no_target")
        progress = PullProgress(name)
        if not payload.stream:
            finished = await actions.run_to_end(events)
            if finished.ok:
                return JSONResponse(progress.finished(finished))
            raise ApiError(502, outcome_error(finished), "pull_failed")

        async def lines() -> AsyncIterator[str]:
            try:
                if isinstance(first, ManageStarted):
                    yield ndjson(progress.started(first))
                async for event in events:
                    if isinstance(event, ManageProgress):
                        line = progress.progress(event)
                        if line is not None:
                            yield ndjson(line)
                    elif isinstance(event, ManageFinished):
                        yield ndjson(progress.finished(event))
            finally:
                await events.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @ollama.delete("/delete")
    async def delete(request: Request) -> Response:
        """Delete a model from the machines that have it (or the ``slb_agents`` named): 200 with an empty body."""
        payload = await read_model_request(request)
        name = payload.model_name()
        finished = await actions.run_to_end(
            coordinator.manage("delete", name, agents=actions.check_agents(payload.slb_agents)))
        if finished.error and not finished.results:
            raise ApiError(404, f"model '{name}' not found on any online agent", "model_not_found")
        if not finished.ok:
            raise ApiError(502, outcome_error(finished), "delete_failed")
        return Response(status_code=200)

    return actions


async def read_model_request(request: Request) -> ModelRequest:
    body = await json_body(request)
    try:
        return ModelRequest.model_validate(body)
    except ValidationError as error:
        raise BadRequest(validation_message(error)[0]) from None


class ModelActions:
    """Load and unload for chat and generate (Ollama's empty prompt with or without ``keep_alive: 0``)."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self.coordinator = context.service.coordinator

    def check_agents(self, agents: list[str] | None) -> list[str] | None:
        """The ``slb_agents`` of a request, each an agent the cluster knows (a clear 400 otherwise)."""
        if not agents:
            return None
        known = {agent.id for agent in self.coordinator.snapshot().agents}
        unknown = [agent for agent in agents if agent not in known]
        if unknown:
            raise BadRequest(f"unknown agent(s) in slb_agents: {', '.join(unknown)}; the cluster has "
                             f"{', '.join(sorted(known)) or 'no agents'}", param="slb_agents")
        return list(agents)

    @staticmethod
    async def run_to_end(events: AsyncIterator[ManageEvent]) -> ManageFinished:
        """Follow a model operation to its end (closing the stream if the caller goes away meanwhile)."""
        finished: ManageFinished | None = None
        try:
            async for event in events:
                if isinstance(event, ManageFinished):
                    finished = event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        if finished is None:
            raise ApiError(502, "the model operation ended without a result", "failed")
        return finished

    async def unload(self, model: str, agents: list[str] | None = None) -> None:
        """Free ``model``'s memory on the agents that hold it (or on ``agents``); nothing to do when none does.

        Agents report what their runtime holds only now and then (while idle), so a model answered a moment ago
        may not be listed as loaded yet: every agent that has the model and whose runtime can unload on request
        (the ones that can pull: Ollama) is asked too — unloading a model that is not loaded does no harm there.
        """
        targets, _ = self.coordinator.manage_targets("unload", model, agents)
        if agents is None:
            listed = find_listed(model, self.context.service.models())
            unloaders = {agent.id for agent in self.coordinator.snapshot().agents if agent.online and agent.can_pull}
            extra = [holder.agent_id for holder in (listed.holders if listed is not None else [])
                     if holder.agent_id in unloaders]
            targets = list(dict.fromkeys([*targets, *extra]))
        if not targets:
            return
        finished = await self.run_to_end(self.coordinator.manage("unload", model, agents=targets))
        if not finished.ok:
            raise ApiError(502, outcome_error(finished), "unload_failed")

    async def load(self, model: str) -> None:
        """Load ``model`` where it answers soonest, unless some runtime holds it in memory already.

        One agent, not all that have it: loading everywhere would push the models placement put there out of
        memory. The best holder is the coordinator's first (ready, then loaded, then on disk).
        """
        listed = find_listed(model, self.context.service.models())
        if listed is None or not listed.holders:
            return  # on its way to an agent (pulling or loading): it will be loaded there
        if any(holder.state in ("ready", "loaded") for holder in listed.holders):
            return
        finished = await self.run_to_end(self.coordinator.manage("load", model, agents=[listed.holders[0].agent_id]))
        if not finished.ok:
            raise ApiError(502, outcome_error(finished), "load_failed")

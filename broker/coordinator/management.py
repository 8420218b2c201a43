"""Model management through the cluster: ``Manage`` to agents, their ``Operation`` replies back per request.

Ollama's ``/api/pull``, ``/api/delete``, a load and ``keep_alive: 0`` become one
:class:`~broker.protocol.Manage` per target agent; each agent answers on
``agent/{id}/operation`` with progress and a final ``done`` message.
:class:`ModelOperations` picks the targets (explicit agents, or where the plan
and the agents' models say), sends the messages, and turns the replies for
one request into one async stream of :data:`~broker.coordinator.contract.ManageEvent`.
An agent that goes away, or stays silent for the timeout, ends with an error in
the final event — never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import get_args

from broker.coordinator.contract import ManageEvent, ManageFinished, ManageProgress, ManageStarted
from broker.coordinator.metrics import CoordinatorMetrics
from broker.protocol import Manage, Message, Operation, Topics, is_valid_agent_id
from broker.protocol.messages import ManageAction
from broker.scheduling.catalog import Catalog
from broker.scheduling.estimates import agent_score
from broker.scheduling.names import find_model, same_model
from broker.scheduling.placement import Plan, fits_memory
from broker.scheduling.registry import AgentRecord, ClusterState

logger = logging.getLogger(__name__)

MANAGE_ACTIONS: tuple[str, ...] = get_args(ManageAction)
"""pull, delete, load, unload: the one list (from the wire protocol)."""
PULL_HEADROOM_GB = 1.0
"""Memory kept free beyond a model's need when choosing where to pull it (as placement does by default)."""

Publish = Callable[[str, bytes | Message], None]


@dataclass(frozen=True)
class _Gone:
    agent_id: str
    reason: str


class ModelOperations:
    """Targets, sending and reply routing for model operations; the coordinator feeds it inbound messages."""

    def __init__(self, topics: Topics, metrics: CoordinatorMetrics, *, publish: Publish,
                 state: Callable[[], ClusterState], catalog: Catalog, plan: Callable[[], Plan | None],
                 quarantined: Callable[[], Collection[str]] = frozenset, epoch: Callable[[], int] = lambda: 0) -> None:
        self.topics = topics
        self.metrics = metrics
        self._publish = publish
        self._state = state
        self._catalog = catalog
        self._plan = plan
        self._quarantined = quarantined
        self._epoch = epoch  # the leadership epoch we know: agents refuse operations from a deposed leader
        self._pending: dict[str, tuple[str, asyncio.Queue[Operation | _Gone]]] = {}  # wire id → (agent, inbox)

    # ------------------------------------------------------------------ inbound (event loop)

    def deliver(self, agent_id: str, operation: Operation) -> None:
        """An agent's reply; only the agent the request went to may answer it."""
        entry = self._pending.get(operation.request_id)
        if entry is None:
            logger.debug("operation %s from %s: nobody is waiting for it", operation.request_id, agent_id)
            return
        target, inbox = entry
        if target != agent_id:
            logger.warning("ignored operation %s from %s: it went to %s", operation.request_id, agent_id, target)
            return
        inbox.put_nowait(operation)

    def agent_gone(self, agent_id: str, reason: str) -> None:
        for target, inbox in list(self._pending.values()):
            if target == agent_id:
                inbox.put_nowait(_Gone(agent_id, reason))

    def stop(self, reason: str) -> None:
        for target, inbox in list(self._pending.values()):
            inbox.put_nowait(_Gone(target, reason))

    # ------------------------------------------------------------------ targets

    def targets(self, action: str, model: str, agents: list[str] | None = None) -> tuple[list[str], str]:
        """The agents an operation goes to and why; an empty list comes with the reason nobody qualifies."""
        state = self._state()
        if agents:
            return list(dict.fromkeys(agents)), "the agents named in the request"
        held = self._quarantined()  # an agent in quarantine is not asked unless the request names it
        online = sorted((r for r in state.online_agents() if r.agent_id not in held), key=lambda r: r.agent_id)
        if action == "pull":
            return self._pull_targets(online, model)
        if action == "unload":
            holders = [r.agent_id for r in online if find_model(model, r.loaded_models) is not None]
            return holders, ("where it is loaded" if holders else f"no online agent has {model} loaded")
        holders = [r.agent_id for r in online if find_model(model, [o.name for o in r.offers()] +
                                                           list(r.local_models)) is not None]
        return holders, ("the agents that have it" if holders else f"no online agent has {model}")

    def _pull_targets(self, online: list[AgentRecord], model: str) -> tuple[list[str], str]:
        pullers = [record for record in online if record.can_pull]
        if not pullers:
            return [], "no online agent's runtime can pull models (only Ollama can)"
        assigned = [r.agent_id for r in pullers if same_model(r.current_model, model)]
        if assigned:
            return assigned, "the agents it is assigned to"
        plan = self._plan()
        planned = [entry.agent_id for entry in plan.entries if same_model(entry.target_model, model)] \
            if plan is not None else []
        planned = [agent_id for agent_id in planned if any(r.agent_id == agent_id for r in pullers)]
        if planned:
            return planned, "where the placement plan wants it"
        entry = self._catalog.estimate(model)
        fitting = [r for r in pullers if fits_memory(r, entry, self._catalog, PULL_HEADROOM_GB)]
        if not fitting:
            return [], (f"{model} (about {entry.memory_gb:g} GB) does not fit the free memory of any online agent "
                        "that can pull; name an agent to pull it anyway")
        best = max(fitting, key=lambda record: (agent_score(record, self._catalog).total, record.agent_id))
        return [best.agent_id], f"the strongest agent where it fits ({entry.memory_gb:g} GB)"

    # ------------------------------------------------------------------ one operation

    async def run(self, action: str, model: str, *, agents: list[str] | None, request_id: str,
                  timeout_s: float) -> AsyncIterator[ManageEvent]:
        """Send the operation and stream the replies; always ends with one :class:`ManageFinished`."""
        problem = self._validate(action, model, request_id, agents)
        if problem is not None:
            yield ManageFinished(request_id, action, model, {}, error=problem)  # type: ignore[arg-type]
            return
        targets, reason = self.targets(action, model, agents)
        if not targets:
            yield ManageFinished(request_id, action, model, {}, error=reason)  # type: ignore[arg-type]
            return
        if any(wire_id.startswith(f"{request_id[:48]}.") for wire_id in self._pending):
            yield ManageFinished(request_id, action, model, {},  # type: ignore[arg-type]
                                 error=f"request {request_id} is already running")
            return
        state = self._state()
        results: dict[str, str | None] = {}
        inbox: asyncio.Queue[Operation | _Gone] = asyncio.Queue()
        wire_ids: dict[str, str] = {}
        try:
            for index, agent_id in enumerate(targets):
                record = state.agents.get(agent_id)
                if record is None or not record.online:
                    results[agent_id] = f"agent {agent_id} is {'unknown' if record is None else 'offline'}"
                    continue
                wire_id = f"{request_id[:48]}.{index}"
                wire_ids[agent_id] = wire_id
                self._pending[wire_id] = (agent_id, inbox)
                self._publish(self.topics.manage(agent_id), Manage(request_id=wire_id, action=action,  # type: ignore[arg-type]
                                                                   model=self._spelling(record, action, model),
                                                                   epoch=self._epoch()))
                logger.info("%s %s → %s (%s)", action, model, agent_id, wire_id)
            yield ManageStarted(request_id, action, model, targets, reason)  # type: ignore[arg-type]
            last_heard = {agent_id: time.monotonic() for agent_id in wire_ids}
            while len(results) < len(targets):
                waiting = [agent_id for agent_id in wire_ids if agent_id not in results]
                now = time.monotonic()
                for agent_id in waiting:
                    if now - last_heard[agent_id] >= timeout_s:
                        results[agent_id] = f"no reply from {agent_id} for {timeout_s:g} s"
                waiting = [agent_id for agent_id in waiting if agent_id not in results]
                if not waiting:
                    break
                until = min(last_heard[agent_id] for agent_id in waiting) + timeout_s
                try:
                    message = await asyncio.wait_for(inbox.get(), max(0.01, until - now))
                except asyncio.TimeoutError:
                    continue
                if isinstance(message, _Gone):
                    if message.agent_id not in results:
                        results[message.agent_id] = message.reason
                    continue
                agent_id = next((a for a, w in wire_ids.items() if w == message.request_id), None)
                if agent_id is None or agent_id in results:
                    continue
                last_heard[agent_id] = time.monotonic()
                yield ManageProgress(request_id, agent_id, message)
                if message.done:
                    results[agent_id] = message.error
        finally:
            for wire_id in wire_ids.values():
                self._pending.pop(wire_id, None)
        for value in results.values():
            self.metrics.manage.labels(action, "ok" if value is None else "error").inc()
        yield ManageFinished(request_id, action, model, {agent_id: results.get(agent_id) for agent_id in targets})  # type: ignore[arg-type]

    def _validate(self, action: str, model: str, request_id: str, agents: list[str] | None) -> str | None:
        if action not in MANAGE_ACTIONS:
            return f"unknown action {action!r} (choose {', '.join(MANAGE_ACTIONS)})"
        if not model or len(model) > 200:
            return "a model name of 1–200 characters is needed"
        if not is_valid_agent_id(request_id):
            return "request_id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
        bad = [agent_id for agent_id in agents or [] if not is_valid_agent_id(agent_id)]
        if bad:
            return f"not an agent id: {', '.join(repr(agent_id) for agent_id in bad)}"
        return None

    @staticmethod
    def _spelling(record: AgentRecord, action: str, model: str) -> str:
        """The agent's own name for a model it has (delete, load, unload act on what it has); pulls go as asked."""
        if action == "pull":
            return model
        names = [offer.name for offer in record.offers()] + list(record.local_models) + list(record.loaded_models)
        return find_model(model, names) or model

"""The coordinator's picture of the cluster, built only from MQTT messages.

State changes go through one pure function, :func:`apply` (exo-style): it
takes the current immutable :class:`ClusterState`, an event and the time, and
returns the next state, through one small ``apply_<event>`` function per event
type. Nothing here touches the network, so the whole
registry is tested without a broker, and a restarted coordinator rebuilds the
same picture from the retained topics (status, hardware, model, assign) plus
one round of telemetry.

Agent expiry is an explicit event: the reconciler :func:`find_expired` (state
and time in, events out) lists the agents whose telemetry stopped, and the
caller applies (and logs) each :class:`AgentExpired`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from broker.protocol.messages import Assign, Hardware, ModelState, ResultStats, RuntimeProfile, Status, Telemetry
from broker.scheduling.names import model_key
from broker.scheduling.scoring import MachineFacts, machine_facts

DEFAULT_TELEMETRY_INTERVAL_S = 2.0
"""Assumed interval until an agent's first telemetry says otherwise."""

SPEED_SMOOTHING = 0.3
"""Weight of the newest measurement in the per-model moving averages."""

_EMPTY: Mapping[str, object] = MappingProxyType({})
_UNKNOWN_MACHINE = machine_facts(None)

PULLING_RUNTIMES = frozenset({"ollama", "simulated"})
"""Runtimes that can fetch a model they do not have; any other only serves what it already has."""
SERVES_WHAT_IT_LISTS = frozenset({"llama.cpp", "llama-cpp-python", "vllm"})
"""Runtimes that list only the models they have loaded (a server started with its model)."""

MAX_MODEL_NAME = 200
"""Longest model name a job or an assignment can carry; an agent's longer claims are ignored."""

SLOTS_PER_CORE = 2
"""Parallel streams a CPU-only machine can plausibly serve per physical core (llama.cpp's ``-np`` rarely
exceeds the core count; beyond it every stream only gets slower)."""
MIN_SLOT_CEILING = 4
SLOTS_PER_GPU_GB = 2
"""Parallel streams per GB of GPU memory: each needs its own KV cache (a 24 GB card: 48, an 8 GB card: 16)."""
MIN_GPU_SLOT_CEILING = 8
UNKNOWN_MACHINE_SLOT_CEILING = 8


def slot_ceiling(facts: MachineFacts) -> int:
    """The most parallel slots the machine an agent describes can plausibly have (issue 13.1: a runtime
    claiming 1000 slots on 8 cores gets 16). A lie about the hardware itself is caught by what the answers
    show (:mod:`broker.scheduling.trust`), not here."""
    if facts.accelerator in ("discrete", "unified") and facts.vram_gb:
        return max(MIN_GPU_SLOT_CEILING, int(facts.vram_gb * SLOTS_PER_GPU_GB))
    if facts.cores:
        return max(MIN_SLOT_CEILING, SLOTS_PER_CORE * facts.cores)
    return UNKNOWN_MACHINE_SLOT_CEILING


OfferState = Literal["ready", "loaded", "local"]
"""How soon an agent can answer with a model: ready (its assignment, warm), loaded (in memory), local (on disk)."""
OFFER_ORDER: Mapping[str, int] = MappingProxyType({"ready": 0, "loaded": 1, "local": 2})


@dataclass(frozen=True)
class ModelOffer:
    """A model an agent can answer with now, under the agent's own name for it."""

    name: str
    state: OfferState


@dataclass(frozen=True)
class SpeedEstimate:
    """Exponentially weighted averages of what the coordinator observed on one agent and model."""

    tokens_per_s: float | None = None
    ttft_s: float | None = None
    samples: int = 0
    updated_at: float = 0.0

    def update(self, stats: ResultStats, now: float) -> SpeedEstimate:
        def blend(old: float | None, new: float | None) -> float | None:
            if new is None:
                return old
            return new if old is None else old + SPEED_SMOOTHING * (new - old)

        # Learn the backend's time to first token: routing adds the queue wait itself, so the agent's own
        # queue (inside ttft_s) must not be counted twice.
        ttft = None if stats.ttft_s is None else max(0.0, stats.ttft_s - (stats.queue_s or 0.0))
        return SpeedEstimate(blend(self.tokens_per_s, stats.tokens_per_s), blend(self.ttft_s, ttft),
                             self.samples + 1, now)


@dataclass(frozen=True)
class FailedModel:
    error: str
    at: float


@dataclass(frozen=True)
class AgentRecord:
    """Everything known about one agent; ``now`` values are the caller's clock (monotonic seconds)."""

    agent_id: str
    status: Status | None = None
    hardware: Hardware | None = None
    facts: MachineFacts = _UNKNOWN_MACHINE
    """Derived from ``hardware`` once, when it arrives (scoring and placement read it often)."""
    telemetry: Telemetry | None = None
    model_state: ModelState | None = None
    assignment: Assign | None = None
    first_seen: float = 0.0
    alive_at: float = 0.0
    telemetry_at: float | None = None
    expired: bool = False
    observed: Mapping[str, SpeedEstimate] = field(default_factory=lambda: _EMPTY)  # type: ignore[arg-type]
    failed_models: Mapping[str, FailedModel] = field(default_factory=lambda: _EMPTY)  # type: ignore[arg-type]

    @property
    def online(self) -> bool:
        return self.status is not None and self.status.state == "online" and not self.expired

    @property
    def simulated(self) -> bool:
        return bool((self.status and self.status.simulated) or (self.telemetry and self.telemetry.simulated))

    @property
    def ready_model(self) -> str | None:
        """The model this agent can answer with right now, if any."""
        state = self.model_state
        if not self.online or state is None or state.state != "ready" or not state.model \
                or len(state.model) > MAX_MODEL_NAME:
            return None
        if self.status is not None and self.status.backend_reachable is False:
            return None
        if self.telemetry is not None and self.telemetry.backend_reachable is False:
            return None
        return state.model

    @property
    def current_model(self) -> str | None:
        """What this agent is assigned (the coordinator's retained assign), else what it reports serving."""
        if self.assignment is not None:
            return self.assignment.model
        return self.model_state.model if self.model_state is not None else None

    @property
    def max_parallel(self) -> int:
        for value in (self.telemetry and self.telemetry.max_parallel, self.status and self.status.max_parallel):
            if value:
                return int(value)
        return 1

    @property
    def runtime(self) -> RuntimeProfile | None:
        """What the agent learned about its runtime (kind, slots, prefill continuation), once it has."""
        return self.status.runtime if self.status is not None else None

    @property
    def claimed_slots(self) -> int:
        """Jobs the agent says its runtime runs at once: the measured profile when known, else what it declares."""
        runtime = self.runtime
        return runtime.slots if runtime is not None else self.max_parallel

    @property
    def slots(self) -> int:
        """Jobs the runtime really runs at once, as far as the coordinator believes it: the claim, capped by what
        the machine it describes can plausibly run (:func:`slot_ceiling`)."""
        return min(self.claimed_slots, slot_ceiling(self.facts))

    @property
    def runtime_kind(self) -> str | None:
        """The runtime's kind from its profile, else the backend the agent names (``ollama``, ``openai``…)."""
        if self.runtime is not None:
            return self.runtime.kind
        if self.simulated:
            return "simulated"
        return self.status.backend if self.status is not None else None

    @property
    def can_pull(self) -> bool:
        """Whether the agent can fetch a model its runtime lacks: only through Ollama's own API (or the simulated
        backend). An agent on the OpenAI-compatible API cannot, even when the server behind it is Ollama; an agent
        that says nothing is assumed to (older agents)."""
        backend = self.status.backend if self.status is not None else None
        if self.simulated:
            return True
        if backend is not None:
            return backend in PULLING_RUNTIMES
        kind = self.runtime_kind
        return kind is None or kind in PULLING_RUNTIMES

    @property
    def continues_prefill(self) -> bool:
        """A failover may continue a partial answer here only if the runtime continues a trailing assistant message.

        Only a profile that says so counts; without a profile only the simulated backend (which continues by
        construction) does. Anything else restarts the answer rather than risk splicing two answers.
        """
        runtime = self.runtime
        if runtime is not None:
            return runtime.continues_prefill is True
        return self.simulated

    @property
    def reachable(self) -> bool:
        """Online, and neither the status nor the latest telemetry says the runtime is unreachable."""
        if not self.online:
            return False
        if self.status is not None and self.status.backend_reachable is False:
            return False
        return not (self.telemetry is not None and self.telemetry.backend_reachable is False)

    @property
    def local_models(self) -> tuple[str, ...]:
        """What the runtime has (on disk), as the agent spells it; names no job could carry are left out."""
        if self.model_state is None:
            return ()
        return tuple(name for name in self.model_state.local_models if 0 < len(name.strip()) <= MAX_MODEL_NAME)

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """In the runtime's memory: what it reports, else (a single-model server) everything it lists, and the
        ready model."""
        state = self.model_state
        if state is None:
            return ()
        loaded = [name for name in state.loaded_models if 0 < len(name.strip()) <= MAX_MODEL_NAME]
        if self.runtime_kind in SERVES_WHAT_IT_LISTS:
            loaded += self.local_models
        if state.state == "ready" and state.model:
            loaded.append(state.model)
        return tuple(_unique(loaded))

    def offers(self) -> tuple[ModelOffer, ...]:
        """Every model this agent can answer with now, best state first.

        None while it is unreachable, and none while it is loading its assignment: the agent then holds its
        runtime alone to warm and probe it, and a job would wait behind that.
        """
        if not self.reachable or (self.model_state is not None and self.model_state.state == "loading"):
            return ()
        found: dict[str, ModelOffer] = {}
        ready = self.ready_model
        if ready is not None:
            found[model_key(ready)] = ModelOffer(ready, "ready")
        for state, names in (("loaded", self.loaded_models), ("local", self.local_models)):
            for name in names:
                found.setdefault(model_key(name), ModelOffer(name, state))  # type: ignore[arg-type]
        return tuple(found.values())

    @property
    def telemetry_interval_s(self) -> float:
        return self.telemetry.interval_s if self.telemetry is not None else DEFAULT_TELEMETRY_INTERVAL_S

    def silent_for(self, now: float) -> float:
        return now - self.alive_at


SHARDS = 64
"""Shards of :class:`AgentMap`: one event copies about 1/64 of the agents instead of all of them."""


_SHARD_OF: dict[str, int] = {}
SHARD_MEMO_SIZE = 100_000


def _shard(agent_id: str) -> int:
    """The shard of an agent id, memoised: every telemetry message looks it up a few times."""
    found = _SHARD_OF.get(agent_id)
    if found is None:
        if len(_SHARD_OF) >= SHARD_MEMO_SIZE:
            _SHARD_OF.clear()
        # not hash(): the same order in every process
        found = _SHARD_OF[agent_id] = zlib.crc32(agent_id.encode()) & (SHARDS - 1)
    return found


class AgentMap(Mapping[str, AgentRecord]):
    """The agents by id, immutable, in shards: a new map after one event shares every shard but one.

    A plain dict copied on every event cost O(agents) per telemetry message — at 5,000 agents at 1 Hz that is
    5,000 copies of 5,000 entries a second (~26 µs each). Iteration is shard by shard (deterministic, not the
    order agents joined); ``values()``/``items()``/``keys()`` return lists (a snapshot).
    """

    __slots__ = ("_shards", "_size")

    def __init__(self, shards: tuple[dict[str, AgentRecord], ...] | None = None, size: int = 0) -> None:
        self._shards = shards if shards is not None else _EMPTY_SHARDS
        self._size = size

    def __getitem__(self, agent_id: str) -> AgentRecord:
        return self._shards[_shard(agent_id)][agent_id]

    def get(self, agent_id: str, default: AgentRecord | None = None) -> AgentRecord | None:  # type: ignore[override]
        return self._shards[_shard(agent_id)].get(agent_id, default) if isinstance(agent_id, str) else default

    def __contains__(self, agent_id: object) -> bool:
        return isinstance(agent_id, str) and agent_id in self._shards[_shard(agent_id)]

    def __iter__(self) -> Iterator[str]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._size

    def keys(self) -> list[str]:  # type: ignore[override]
        return [agent_id for shard in self._shards for agent_id in shard]

    def values(self) -> list[AgentRecord]:  # type: ignore[override]
        return [record for shard in self._shards for record in shard.values()]

    def items(self) -> list[tuple[str, AgentRecord]]:  # type: ignore[override]
        return [item for shard in self._shards for item in shard.items()]

    def with_record(self, record: AgentRecord) -> AgentMap:
        index = _shard(record.agent_id)
        shard = self._shards[index].copy()
        size = self._size + (record.agent_id not in shard)
        shard[record.agent_id] = record
        shards = list(self._shards)
        shards[index] = shard
        return AgentMap(tuple(shards), size)

    def without(self, agent_id: str) -> AgentMap:
        index = _shard(agent_id)
        if agent_id not in self._shards[index]:
            return self
        shard = self._shards[index].copy()
        del shard[agent_id]
        return AgentMap((*self._shards[:index], shard, *self._shards[index + 1:]), self._size - 1)

    def __repr__(self) -> str:
        return f"AgentMap({dict(self.items())!r})"


_EMPTY_SHARDS: tuple[dict[str, AgentRecord], ...] = tuple({} for _ in range(SHARDS))  # never written to


def agent_map(agents: Mapping[str, AgentRecord]) -> AgentMap:
    """An :class:`AgentMap` holding ``agents``."""
    found = AgentMap()
    for record in agents.values():
        found = found.with_record(record)
    return found


@dataclass(frozen=True)
class ClusterState:
    """Immutable: readers on any thread may hold a reference while the event loop moves on."""

    agents: Mapping[str, AgentRecord] = field(default_factory=AgentMap)
    version: int = 0

    def online_agents(self) -> list[AgentRecord]:
        return [record for record in self.agents.values() if record.online]

    def ready_models(self) -> list[str]:
        """Assigned models that are ready somewhere (placement's view)."""
        return sorted({model for record in self.agents.values() if (model := record.ready_model)})


def _unique(names: list[str]) -> list[str]:
    """``names`` without repeats of one model (compared by :func:`model_key`), first spelling kept."""
    seen: set[str] = set()
    kept = []
    for name in names:
        key = model_key(name)
        if key not in seen:
            seen.add(key)
            kept.append(name)
    return kept


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class StatusReceived:
    agent_id: str
    message: Status | None  # None: the retained status was cleared (agent removed)


@dataclass(frozen=True)
class HardwareReceived:
    agent_id: str
    message: Hardware | None


@dataclass(frozen=True)
class TelemetryReceived:
    agent_id: str
    message: Telemetry


@dataclass(frozen=True)
class ModelStateReceived:
    agent_id: str
    message: ModelState | None


@dataclass(frozen=True)
class AssignmentSeen:
    """Our own retained assignment for an agent (read back, so a restart knows what it assigned)."""

    agent_id: str
    message: Assign | None


@dataclass(frozen=True)
class AnswerMeasured:
    """The stats of a finished answer, fed back into the agent's speed estimate for that model."""

    agent_id: str
    model: str
    stats: ResultStats


@dataclass(frozen=True)
class AgentExpired:
    """No telemetry for too long: the agent counts as gone until it speaks again."""

    agent_id: str
    silent_s: float
    limit_s: float


Event = (
    StatusReceived | HardwareReceived | TelemetryReceived | ModelStateReceived | AssignmentSeen | AnswerMeasured
    | AgentExpired
)


def _agents(state: ClusterState) -> AgentMap:
    agents = state.agents
    return agents if isinstance(agents, AgentMap) else agent_map(agents)


def _with(state: ClusterState, record: AgentRecord) -> ClusterState:
    """The state with ``record`` (built without the frozen dataclass's ``__init__``: once per telemetry message)."""
    made = object.__new__(ClusterState)
    made.__dict__.update(agents=_agents(state).with_record(record), version=state.version + 1)
    return made


def _without(state: ClusterState, agent_id: str) -> ClusterState:
    if agent_id not in state.agents:
        return state
    return ClusterState(_agents(state).without(agent_id), state.version + 1)


def _updated(record: AgentRecord, **changes: Any) -> AgentRecord:
    """``dataclasses.replace`` for :class:`AgentRecord` (no ``__post_init__``) at a tenth of its cost: telemetry
    replaces a record per agent per second."""
    made = object.__new__(AgentRecord)
    fields = made.__dict__
    fields.update(record.__dict__)
    fields.update(changes)
    return made


def _record(state: ClusterState, agent_id: str, now: float) -> AgentRecord:
    existing = state.agents.get(agent_id)
    return existing if existing is not None else AgentRecord(agent_id, first_seen=now, alive_at=now)


def apply_status(state: ClusterState, event: StatusReceived, now: float) -> ClusterState:
    """A status (online/offline) proves the agent alive; a cleared one removes the agent."""
    if event.message is None:
        return _without(state, event.agent_id)
    record = _record(state, event.agent_id, now)
    return _with(state, _updated(record, status=event.message, alive_at=now, expired=False))


def apply_hardware(state: ClusterState, event: HardwareReceived, now: float) -> ClusterState:
    """Hardware arrives once (retained); its facts are derived here so scoring need not redo it."""
    if event.message is None and event.agent_id not in state.agents:
        return state
    record = _record(state, event.agent_id, now)
    return _with(state, _updated(record, hardware=event.message, facts=machine_facts(event.message), alive_at=now))


def apply_telemetry(state: ClusterState, event: TelemetryReceived, now: float) -> ClusterState:
    """Telemetry is the heartbeat: it also revives an expired agent."""
    record = _record(state, event.agent_id, now)
    return _with(state, _updated(record, telemetry=event.message, telemetry_at=now, alive_at=now, expired=False))


def apply_model_state(state: ClusterState, event: ModelStateReceived, now: float) -> ClusterState:
    """The agent's model state; a failed model is remembered (placement skips it for a while)."""
    if event.message is None and event.agent_id not in state.agents:
        return state
    record = _record(state, event.agent_id, now)
    failed = record.failed_models
    message = event.message
    if message is not None and message.model:
        failed = dict(failed)
        if message.state == "failed":
            failed[message.model] = FailedModel(message.error or "failed without a reason", now)
        else:
            failed.pop(message.model, None)
        failed = MappingProxyType(failed)
    return _with(state, _updated(record, model_state=message, alive_at=now, failed_models=failed))


def apply_assignment(state: ClusterState, event: AssignmentSeen, now: float) -> ClusterState:
    """Our own retained assignment; it says nothing about the agent being alive."""
    record = state.agents.get(event.agent_id)
    if record is None:
        if event.message is None:
            return state
        record = AgentRecord(event.agent_id, first_seen=now, alive_at=now)
    return _with(state, _updated(record, assignment=event.message))


def apply_answer_measured(state: ClusterState, event: AnswerMeasured, now: float) -> ClusterState:
    """Fold a finished answer's stats into the agent's speed estimate for that model."""
    record = state.agents.get(event.agent_id)
    if record is None:
        return state
    observed = dict(record.observed)
    observed[event.model] = observed.get(event.model, SpeedEstimate()).update(event.stats, now)
    return _with(state, _updated(record, observed=MappingProxyType(observed)))


def apply_expired(state: ClusterState, event: AgentExpired, now: float) -> ClusterState:
    """The agent counts as gone until it speaks again (status or telemetry clear the flag)."""
    record = state.agents.get(event.agent_id)
    if record is None or record.expired:
        return state
    return _with(state, _updated(record, expired=True))


_APPLIERS: Mapping[type, Callable[[ClusterState, Any, float], ClusterState]] = MappingProxyType({
    StatusReceived: apply_status,
    HardwareReceived: apply_hardware,
    TelemetryReceived: apply_telemetry,
    ModelStateReceived: apply_model_state,
    AssignmentSeen: apply_assignment,
    AnswerMeasured: apply_answer_measured,
    AgentExpired: apply_expired,
})


def apply(state: ClusterState, event: Event, now: float) -> ClusterState:
    """The next state after ``event`` at time ``now``; the only way the registry changes."""
    applier = _APPLIERS.get(type(event))
    if applier is None:
        raise TypeError(f"unknown event {event!r}")
    return applier(state, event, now)


# ---------------------------------------------------------------- reconcilers: state → events


def find_expired(state: ClusterState, now: float, factor: float,
                 listening_since: float | None = -math.inf,
                 heard: Mapping[str, float] | None = None) -> list[AgentExpired]:
    """The expiry reconciler: online agents silent for more than ``factor`` × their telemetry interval.

    Only silence while the coordinator was listening counts: ``listening_since`` is when it last
    (re)connected, ``None`` while it is offline (then nobody expires). During the coordinator's own broker
    outage every agent is silent; after a reconnect each agent gets a full expiry period to speak again.
    ``heard``: when each agent last delivered anything else (result chunks): an agent streaming an answer is
    alive even if its telemetry (QoS 0, which a loaded broker may drop) is late.
    """
    if listening_since is None:
        return []
    expired = []
    for record in state.agents.values():
        if not record.online:
            continue
        limit = factor * record.telemetry_interval_s
        silent = record.silent_for(now)
        if heard is not None and record.agent_id in heard:
            silent = min(silent, now - heard[record.agent_id])
        if silent > limit and now - listening_since >= limit:
            expired.append(AgentExpired(record.agent_id, silent, limit))
    return expired

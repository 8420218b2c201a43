"""What the web app (and the console) hand to the coordinator, and what they get back.

A query is submitted with :class:`QueryRequest`; the coordinator answers with an
async stream of the events below, ending with exactly one
:class:`QueryFinished` or :class:`QueryFailed`. These types are the contract
between ``broker/`` and ``app/``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from broker.protocol.messages import ChatMessage, ManageAction, Operation, ResultStats, ToolCall
from broker.scheduling.availability import LoadedModel as LoadedModel  # re-exported: part of the contract
from broker.scheduling.availability import ModelAvailability as ModelAvailability
from broker.scheduling.availability import ModelHolder as ModelHolder
from broker.scheduling.placement import PlanEntry as PlanEntry
from broker.scheduling.placement import PlanView as PlanView


class Aggregation(str, Enum):
    """How a fan-out (mode ``all``) is combined into one answer; the only list of these names."""

    CONSENSUS = "consensus"
    SYNTHESIZE = "synthesize"
    FIRST = "first"

    def __str__(self) -> str:
        return self.value


class RoutingMode(str, Enum):
    """How a query picks its agent; any other ``mode`` string names a model. The only list of these names."""

    AUTO = "auto"
    QUALITY = "quality"
    ALL = "all"

    def __str__(self) -> str:
        return self.value


ROUTING_MODES: tuple[str, ...] = tuple(mode.value for mode in RoutingMode)
"""The routing modes' names, for choices lists and membership tests."""
AGGREGATIONS: tuple[str, ...] = tuple(method.value for method in Aggregation)
"""The aggregation names, for choices lists and membership tests."""


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class QueryRequest:
    """One question for the cluster. ``mode``: a :class:`RoutingMode` value, or a model name."""

    messages: list[ChatMessage]
    mode: str = RoutingMode.AUTO.value
    aggregation: Aggregation = Aggregation.CONSENSUS
    options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    request_id: str = field(default_factory=new_request_id)
    agent: str | None = None
    """Only this agent may answer (the UI's machine picker); ``None``: routing chooses."""
    conversation: str | None = None
    """Which conversation this turn continues (a chat session id), for routing follow-ups to the machine that
    holds the conversation's prompt cache; ``None``: the coordinator matches on the messages' prefix."""
    tools: list[dict[str, Any]] | None = None
    """Function definitions (OpenAI's shape) the model may call; routing prefers models with tools."""
    tool_choice: str | dict[str, Any] | None = None
    """OpenAI's ``tool_choice`` (none, auto, required, or a named function)."""
    format: str | dict[str, Any] | None = None
    """Structured output: ``"json"`` or a JSON schema, passed to the runtime (``Job.format``)."""
    think: bool | None = None
    """Ollama's ``think`` for the runtime (``Job.think``); ``None``: the runtime's default."""
    keep_alive: str | float | None = None
    """Ollama's ``keep_alive`` for the runtime (``Job.keep_alive``); ``None``: the agent's setting."""
    check_answer: Callable[[str], str | None] | None = None
    """The caller's test of a finished answer (e.g. "parses as JSON and fits the schema"): ``None`` when it passes,
    else why not. An answer that fails it is a failure of that agent: another answers from the start."""


@dataclass(frozen=True)
class QueryStarted:
    """Routing decided: which agent(s) and model(s) got the job, and why."""

    request_id: str
    agents: list[str]
    models: list[str]
    mode: str
    reason: str = ""
    affinity: bool = False
    """The agent was chosen because it holds this conversation's previous turn in its prompt cache."""
    pinned: bool = False
    """The caller named the agent (``QueryRequest.agent``); routing did not choose."""


@dataclass(frozen=True)
class TextDelta:
    """Answer text for a single-route query: continues across an :class:`AgentSwitched`, starts the answer over
    after an :class:`AnswerRestarted`."""

    request_id: str
    text: str
    agent_id: str
    model: str


@dataclass(frozen=True)
class AgentSwitched:
    """The answering agent failed; another continues from the partial answer (its runtime continues a prefill,
    or there was no text yet)."""

    request_id: str
    from_agent: str
    to_agent: str
    model: str
    reason: str


@dataclass(frozen=True)
class AnswerRestarted:
    """The answering agent failed and the next one cannot continue its partial answer: the answer starts over.

    Every piece of text streamed before this event is void (``discarded_chars`` of it); the :class:`TextDelta`
    events after it are the whole new answer, and :class:`QueryFinished` carries only the new answer. Continuing
    on a runtime that ignores a trailing assistant message would splice two different answers into one.
    """

    request_id: str
    from_agent: str
    to_agent: str
    model: str
    reason: str
    discarded_chars: int


@dataclass(frozen=True)
class AgentDelta:
    """Fan-out: text from one agent."""

    request_id: str
    agent_id: str
    model: str
    text: str


@dataclass(frozen=True)
class AgentAnswer:
    """Fan-out: one agent's complete answer (or its error)."""

    agent_id: str
    model: str
    text: str
    stats: ResultStats | None = None
    error: str | None = None
    simulated: bool = False


@dataclass(frozen=True)
class AgentFinished:
    """Fan-out: one agent is done."""

    request_id: str
    answer: AgentAnswer


@dataclass(frozen=True)
class QueryFinished:
    """The final answer. For fan-out, ``answers`` holds every agent's answer and ``agreement`` is 0–1."""

    request_id: str
    text: str
    agents: list[str]
    models: list[str]
    mode: str
    stats: ResultStats | None = None
    answers: list[AgentAnswer] = field(default_factory=list)
    aggregation: Aggregation | None = None
    agreement: float | None = None
    failovers: int = 0
    latency_s: float | None = None
    combined_by: str | None = None  # fan-out: "agent / model (consensus|first|synthesis)" behind the combined text
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The function calls the answer makes (complete, in the runtime's order); ``text`` may be empty then."""


@dataclass(frozen=True)
class QueryFailed:
    """The query could not be answered; ``code`` is machine-readable, ``error`` is for people."""

    request_id: str
    error: str
    code: Literal["no_agent", "busy", "timeout", "failed", "truncated", "cancelled", "bad_request",
                  "invalid_output"] = "failed"
    partial_text: str = ""


QueryEvent = (
    QueryStarted | TextDelta | AgentSwitched | AnswerRestarted | AgentDelta | AgentFinished | QueryFinished
    | QueryFailed
)


# ---------------------------------------------------------------- model management (pull, delete, load, unload)


@dataclass(frozen=True)
class ManageStarted:
    """A model operation went out: to which agents, and why those."""

    request_id: str
    action: ManageAction
    model: str
    agents: list[str]
    reason: str = ""


@dataclass(frozen=True)
class ManageProgress:
    """One agent's progress report (the runtime's own words in ``operation.status``, bytes for pulls)."""

    request_id: str
    agent_id: str
    operation: Operation


@dataclass(frozen=True)
class ManageFinished:
    """The end of a model operation: per agent ``None`` (it worked) or its error; ``error`` when nothing could
    start (no agent to ask)."""

    request_id: str
    action: ManageAction
    model: str
    results: dict[str, str | None]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.results) and all(value is None for value in self.results.values())


ManageEvent = ManageStarted | ManageProgress | ManageFinished


# ---------------------------------------------------------------- views for the UI and the HTTP API


@dataclass(frozen=True)
class AgentView:
    """One agent as the cluster view shows it.

    Everything an agent says about itself is bounded here (issue 13.6): lists of models keep their first
    :data:`~broker.coordinator.views.MAX_VIEW_MODELS` entries (``*_total`` counts them all), names and texts are
    cut, so one agent's view has a bounded size whatever it publishes.
    """

    id: str
    online: bool
    simulated: bool = False
    score: float | None = None
    score_breakdown: dict[str, float] = field(default_factory=dict)
    hardware_summary: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    model_state: str | None = None
    model_progress: float | None = None
    model_error: str | None = None
    local_models: list[str] = field(default_factory=list)
    jobs_running: int = 0
    jobs_queued: int = 0
    max_parallel: int | None = None
    tokens_per_s: float | None = None
    ttft_s: float | None = None
    cpu_percent: float | None = None
    ram_free_gb: float | None = None
    vram_free_gb: float | None = None
    backend: str | None = None
    backend_reachable: bool | None = None
    backend_error: str | None = None
    backend_url: str | None = None
    last_seen_s: float | None = None
    placement_reason: str = ""
    cooling_down: bool = False
    runtime: dict[str, Any] = field(default_factory=dict)
    """The runtime profile (kind, detected_by, version, slots, slots_source, continues_prefill,
    interrupts_running, health_check); empty until the agent has learned it."""
    slots: int | None = None
    """Jobs the runtime really runs at once (the profile's measured slots, else max_parallel)."""
    loaded_models: list[str] = field(default_factory=list)
    available_models: dict[str, str] = field(default_factory=dict)
    """Every model this agent can answer with now (its own name → ready, loaded or local)."""
    can_pull: bool = True
    continues_prefill: bool = False
    local_models_total: int = 0
    loaded_models_total: int = 0
    available_models_total: int = 0
    """How many entries the agent's lists really have (the lists above keep the first few)."""
    claimed_slots: int | None = None
    """The slots the agent claims, when more than its machine can plausibly run (``slots`` is then the cap)."""
    speed_source: str | None = None
    """Where ``tokens_per_s`` comes from: ``measured`` (the coordinator's own clock on delivered tokens) or
    ``claimed`` (the agent's telemetry, until an answer has been measured)."""
    strikes: int = 0
    """Answers that showed this agent lying: empty (where another agent then answered), or claiming a speed far
    above the delivered one."""
    last_strike: str | None = None
    quarantined: bool = False
    """No jobs go to this agent until the quarantine ends (``quarantine_left_s``)."""
    quarantine_reason: str | None = None
    """Why it is (or was last) in quarantine, e.g. "3 strike(s) in 600 s; last: empty answer: …"."""
    quarantine_left_s: float | None = None
    quarantines: int = 0
    """Quarantines so far; each lasts twice as long as the one before."""


@dataclass(frozen=True)
class ClusterSnapshot:
    """The whole cluster at one moment.

    ``ready_models``: assigned models ready somewhere; ``servable_models``: every model some agent can answer
    with (ready, loaded or on disk), and ``models`` the same with their holders.
    """

    agents: list[AgentView]
    ready_models: list[str]
    connected: bool
    generated_at: float
    servable_models: list[str] = field(default_factory=list)
    models: list[ModelAvailability] = field(default_factory=list)
    models_total: int = 0
    """How many servable models there are; ``servable_models`` and ``models`` keep the first
    :data:`~broker.coordinator.views.MAX_SNAPSHOT_MODELS` (``Coordinator.models()`` has them all)."""
    leadership: LeadershipView | None = None
    """Which instance leads placement, as this one sees it (None for a snapshot built without a coordinator)."""


@dataclass(frozen=True)
class LeadershipView:
    """Placement leadership as one instance sees it: several instances on one broker, one leads (docs/scale-out.md).

    ``leader_id`` is None while the seat is vacant (the leader died and the claim window is running)."""

    instance_id: str
    leader_id: str | None
    leading: bool
    epoch: int


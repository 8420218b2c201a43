"""What the web app (and the console) hand to the coordinator, and what they get back.

A query is submitted with :class:`QueryRequest`; the coordinator answers with an
async stream of the events below, ending with exactly one
:class:`QueryFinished` or :class:`QueryFailed`. These types are the contract
between ``broker/`` and ``app/``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from broker.protocol.messages import ChatMessage, ResultStats

Aggregation = Literal["consensus", "synthesize", "first"]
"""How a fan-out (mode ``all``) is combined into one answer."""

ROUTING_MODES = ("auto", "quality", "all")
"""Modes besides a model name (any other mode string names a model)."""


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class QueryRequest:
    """One question for the cluster. ``mode``: auto, quality, all, or a model name."""

    messages: list[ChatMessage]
    mode: str = "auto"
    aggregation: Aggregation = "consensus"
    options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    request_id: str = field(default_factory=new_request_id)


@dataclass(frozen=True)
class QueryStarted:
    """Routing decided: which agent(s) and model(s) got the job, and why."""

    request_id: str
    agents: list[str]
    models: list[str]
    mode: str
    reason: str = ""


@dataclass(frozen=True)
class TextDelta:
    """Answer text for a single-route query (continues seamlessly across failovers)."""

    request_id: str
    text: str
    agent_id: str
    model: str


@dataclass(frozen=True)
class AgentSwitched:
    """The answering agent failed; another continues from the partial answer."""

    request_id: str
    from_agent: str
    to_agent: str
    model: str
    reason: str


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


@dataclass(frozen=True)
class QueryFailed:
    """The query could not be answered; ``code`` is machine-readable, ``error`` is for people."""

    request_id: str
    error: str
    code: Literal["no_agent", "busy", "timeout", "failed", "cancelled", "bad_request"] = "failed"
    partial_text: str = ""


QueryEvent = QueryStarted | TextDelta | AgentSwitched | AgentDelta | AgentFinished | QueryFinished | QueryFailed


# ---------------------------------------------------------------- views for the UI and the HTTP API


@dataclass(frozen=True)
class AgentView:
    """One agent as the cluster view shows it."""

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
    last_seen_s: float | None = None
    placement_reason: str = ""
    cooling_down: bool = False


@dataclass(frozen=True)
class ClusterSnapshot:
    """The whole cluster at one moment."""

    agents: list[AgentView]
    ready_models: list[str]
    connected: bool
    generated_at: float


@dataclass(frozen=True)
class PlanEntry:
    """What placement wants for one agent, and why."""

    agent_id: str
    current_model: str | None
    target_model: str | None
    change: bool
    reason: str
    score: float | None = None
    tier: str | None = None
    deferred: bool = False  # a change held back so that the cluster keeps answering while models move


@dataclass(frozen=True)
class PlanView:
    """A placement plan; ``applied`` is false for a dry run (what-if)."""

    entries: list[PlanEntry]
    excluded: dict[str, str]
    applied: bool
    created_at: float

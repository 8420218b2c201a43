"""Settings of the coordinator (``python -m broker`` and the web process, whose settings subclass these).

Every field has an environment twin ``SLB_<NAME>`` and, through :mod:`broker.mqtt.cli`,
a flag ``--<name>``; the flag wins.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from broker.coordinator.attempts import MAX_ANSWER_CHARS
from broker.mqtt.settings import MqttSettings
from broker.protocol.messages import MAX_PROMPT_CHARS
from broker.scheduling.catalog import DEFAULT_CATALOG
from broker.scheduling.routing import POLICY_ALIASES, RoutingPolicy


class CoordinatorSettings(MqttSettings):
    """How the coordinator scores, places, routes and recovers."""

    coordinator_id: str = Field(
        default="coordinator", description="Name of this coordinator (MQTT client id stem, shown in logs)."
    )
    catalog_path: Path = Field(
        default=DEFAULT_CATALOG,
        description="Model catalog JSON that REPLACES the shipped one (name, parameters, memory, tiers); "
                    "see docs/scheduling.md.",
    )
    catalog: Path | None = Field(
        default=None,
        description="A user catalog JSON that EXTENDS or overrides the base catalog (--catalog-path): your own "
                    "models, corrected figures, more tiers; see docs/scheduling.md.",
    )
    # ---- placement
    replan_interval_s: float = Field(default=300.0, gt=0, description="Seconds between scheduled re-plans.")
    replan_debounce_s: float = Field(
        default=2.0, ge=0, description="Re-plan this long after an agent joins or leaves (several changes, one plan)."
    )
    leader_claim_window_s: float = Field(
        default=0.5, gt=0, le=30,
        description="How long a coordinator listens for a leader record, and then for rival bids, before it leads "
                    "placement; takeover after a leader dies takes about this long (docs/protocol.md).",
    )
    placement_hysteresis: float = Field(
        default=5.0, ge=0,
        description="Score points an agent must cross beyond a tier boundary before its model changes.",
    )
    placement_headroom_gb: float = Field(
        default=1.0, ge=0, description="Memory (GB) kept free beyond a model's need when checking that it fits."
    )
    placement_move_fraction: float = Field(
        default=0.25, gt=0, le=1,
        description="Largest share of ready agents that may switch models at once (at least one; one stays).",
    )
    placement_mix: bool = Field(
        default=True, description="Keep every tier that some machine qualifies for served by at least one agent."
    )
    placement_extra_models: int = Field(
        default=1, ge=0, le=8,
        description="Smaller models a machine keeps beside its main one where memory allows (0: one model each).",
    )
    failed_model_retry_s: float = Field(
        default=600.0, ge=0, description="Seconds before a model that failed on an agent is offered to it again."
    )
    placement_embedding_model: str = Field(
        default="", max_length=200,
        description="An embedding model (e.g. nomic-embed-text) every agent that can pull keeps beside its chat "
                    "model where memory allows, so /v1/embeddings and /api/embed have agents (empty: none placed; "
                    "agents that already have one still serve it). See docs/api.md \"Embeddings\".",
    )
    embed_batch_inputs: int = Field(
        default=32, ge=1, le=256, description="Texts per embed job: a larger request is split into batches."
    )
    embed_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest wait for the vectors of one embeddings request."
    )
    # ---- routing and admission
    routing_policy: RoutingPolicy = Field(
        default="expected_completion",
        description="expected_completion (lowest expected completion time; 'auto' is an alias) or a baseline: "
                    "round_robin, random, least_outstanding.",
    )
    expected_output_tokens: int = Field(
        default=256, ge=1, description="Answer length assumed before any answer has been measured."
    )
    conversation_affinity: bool = Field(
        default=True,
        description="Send a conversation's next turn to the machine that holds its prompt cache, unless that "
                    "machine's queue costs more than the prompt reading it saves (docs/scheduling.md).",
    )
    agent_queue_limit: int = Field(
        default=4, ge=0, description="Jobs an agent may have waiting beyond its parallel slots before admission waits."
    )
    admission_wait_s: float = Field(
        default=30.0, ge=0,
        description="How long a query waits for a free agent (or a model still loading) before 'busy'.",
    )
    state_wait_s: float = Field(
        default=3.0, ge=0, le=60,
        description="For this long after connecting to the broker, a query that finds no agent waits for the agents' "
                    "retained (or re-published) state instead of failing: a front end that has just started "
                    "does not refuse what it can route a moment later (docs/scale-out.md).",
    )
    # ---- failure handling
    stall_first_token_s: float = Field(
        default=20.0, gt=0,
        description="A job with no first token after this many seconds is re-sent elsewhere; a job queued behind "
                    "others on its agent (or waiting for a model to load) gets more, by the expected wait.",
    )
    stall_between_chunks_s: float = Field(
        default=10.0, gt=0,
        description="A job with no new in-order tokens for this many seconds is re-sent elsewhere (a job that keeps "
                    "producing tokens is never cut; only the query's deadline ends it).",
    )
    max_failovers: int = Field(default=2, ge=0, description="Re-sends per query before the caller gets an error.")
    default_deadline_s: float = Field(
        default=300.0, gt=0, description="Whole-query deadline when the caller sets none."
    )
    attempt_deadline_s: float = Field(
        default=120.0, gt=0,
        description="No longer used (kept so that old flags and SLB_ variables still parse): an attempt that keeps "
                    "producing tokens runs until the query's deadline; stalls are judged by the two stall settings.",
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="Consecutive failures after which an agent cools down (gets no new jobs)."
    )
    cooldown_s: float = Field(default=60.0, ge=0, description="How long a failing agent cools down.")
    max_answer_chars: int = Field(
        default=MAX_ANSWER_CHARS, ge=1000, le=MAX_PROMPT_CHARS,
        description="Longest answer text one agent may stream for a query (with the text it continues); past it "
                    "the query ends with a clear error. Also bounds what waits in the reorder buffer.",
    )
    strike_limit: int = Field(
        default=3, ge=1,
        description="Strikes (an empty answer where another agent then answered, a claimed speed far above the "
                    "delivered one) within strike_window_s that put an agent in quarantine: no jobs at all.",
    )
    strike_window_s: float = Field(default=600.0, gt=0, description="Strikes older than this no longer count.")
    quarantine_s: float = Field(
        default=300.0, ge=0, description="First quarantine of an agent; each further one lasts twice as long."
    )
    quarantine_max_s: float = Field(default=3600.0, ge=0, description="Longest quarantine.")
    manage_timeout_s: float = Field(
        default=600.0, gt=0,
        description="A model operation (pull, delete, load, unload) fails on an agent silent about it this long "
                    "(a pull reports progress several times a second).",
    )
    expiry_factor: float = Field(
        default=3.0, gt=1, description="An agent is gone after this many of its telemetry intervals without telemetry."
    )

    @field_validator("routing_policy", mode="before")
    @classmethod
    def _resolve_policy_alias(cls, value: object) -> object:
        """``--routing-policy auto`` still works: it was the policy's name before it clashed with mode ``auto``."""
        return POLICY_ALIASES.get(value, value) if isinstance(value, str) else value

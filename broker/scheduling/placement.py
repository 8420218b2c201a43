"""Model placement: a pure function from a registry snapshot and the catalog to a plan with reasons.

GPUStack-style: agent filters return the agents they kept and the reasons for
the ones they dropped; model filters say why a model cannot go to an agent.
The rules (docs/scheduling.md has them with examples):

1. **Tier by score**: an agent gets the first model of the highest tier its
   score qualifies for; with **hysteresis**, an agent keeps its current tier
   while its score stays within ``hysteresis`` points of that tier's range.
2. **Fit and speed**: a model goes only where it fits — free VRAM on a
   machine with a discrete GPU, else RAM (unified memory on Apple Silicon) —
   plus headroom, and where the machine is expected (or measured) to run it
   at the tier's ``min_tokens_per_s``; otherwise the next smaller model, with
   the reason. Within a tier the agent's current model comes first, then
   models it already has on disk, then the tier's primary, then the largest.
   **Runtimes that cannot pull** (anything but Ollama and the simulated
   backend) are only given a model they already have: the largest that fits.
3. **Mix**: every tier that some agent qualifies for is served. An unserved
   tier takes the lowest-scoring agent of the most crowded tier above it
   (one with at least two agents), preferring an agent already serving it.
4. **Stagger**: agents that are ready switch models a few at a time (a share
   of the ready agents, at least one, minus those still pulling or loading)
   and one ready agent always stays; the rest are deferred until the movers
   are ready again.
5. **No churn**: an agent whose target equals its current model is left alone,
   and a plan without changes publishes nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from broker.scheduling.catalog import REASONING_TAG, Catalog, CatalogModel
from broker.scheduling.estimates import agent_score, measured_speed
from broker.scheduling.names import model_key
from broker.scheduling.registry import AgentRecord, ClusterState
from broker.scheduling.scoring import MachineFacts, Score, estimate_tokens_per_s, normalise_speed

LOCAL_TIER = "local"
"""Tier shown for an agent whose runtime cannot pull: it serves the largest model it has."""
FAILED_HERE = "failed here"
"""How a model filter's note says the model failed on this agent (pull or load); reasons put those first."""
NOTES_PER_TIER = 2
MAX_ALSO = 8
"""Extra models one assignment may name (``Assign.also``)."""
"""Reasons kept per tier when its models do not fit (the rest are counted), so a reason stays readable."""


@dataclass(frozen=True)
class PlacementSettings:
    hysteresis: float = 5.0
    headroom_gb: float = 1.0
    move_fraction: float = 0.25
    mix: bool = True
    failed_retry_s: float = 600.0
    extra_models: int = 1
    embedding_model: str | None = None  # kept beside the chat model where it fits (docs/api.md "Embeddings")


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
    local_only: bool = False  # the runtime cannot pull: the target is one of the agent's own models


@dataclass(frozen=True)
class PlanView:
    """A placement plan; ``applied`` is false for a dry run (what-if)."""

    entries: list[PlanEntry]
    excluded: dict[str, str]
    applied: bool
    created_at: float


@dataclass(frozen=True)
class Placement:
    """The plan for one agent."""

    agent_id: str
    current_model: str | None
    target_model: str
    score: float
    tier: str
    reason: str
    deferred: bool = False
    local_only: bool = False  # the runtime cannot pull: the target is one of its own models
    also: tuple[str, ...] = ()  # further models to keep on the machine where memory allows
    current_also: tuple[str, ...] = ()

    @property
    def change(self) -> bool:
        return self.target_model != self.current_model

    @property
    def extras_change(self) -> bool:
        """Only the extra models differ: the agent pulls them beside its model, nothing is re-warmed."""
        return not self.change and self.also != self.current_also


@dataclass(frozen=True)
class Plan:
    entries: tuple[Placement, ...]
    excluded: Mapping[str, str]
    created_at: float

    @property
    def changes(self) -> list[Placement]:
        """What applying the plan publishes now (deferred moves wait for the next plan)."""
        return [entry for entry in self.entries if (entry.change or entry.extras_change) and not entry.deferred]

    @property
    def deferred(self) -> list[Placement]:
        return [entry for entry in self.entries if entry.change and entry.deferred]

    def view(self, applied: bool) -> PlanView:
        return PlanView(
            entries=[
                PlanEntry(entry.agent_id, entry.current_model, entry.target_model, entry.change, entry.reason,
                          score=entry.score, tier=entry.tier, deferred=entry.deferred, local_only=entry.local_only)
                for entry in self.entries
            ],
            excluded=dict(self.excluded),
            applied=applied,
            created_at=self.created_at,
        )


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryPool:
    """Where a model would live on a machine and how much room there is."""

    kind: str  # VRAM, unified memory, RAM
    total_gb: float | None
    available_gb: float | None  # None: unknown, assume it fits


def memory_pool(record: AgentRecord, facts: MachineFacts, catalog: Catalog, ready: str | None | bool = False
                ) -> MemoryPool:
    """Free memory for a model: the current model's share counts as free (switching unloads it).

    Simulated agents are judged on their declared totals: their telemetry
    describes the host they run on, not the machine they pretend to be. ``ready``: the record's
    ``ready_model`` when the caller has it already (``False``: look it up).
    """
    telemetry = None if record.simulated else record.telemetry
    if facts.has_gpu_pool:
        kind, total = "VRAM", facts.vram_gb
        free = telemetry.vram_free_gb if telemetry is not None else None
        if free is None and record.hardware is not None and not record.simulated:
            reported = [gpu.vram_free_gb for gpu in record.hardware.gpus if gpu.vram_free_gb is not None]
            free = sum(reported) if reported else None
    elif facts.accelerator == "unified":
        kind, total = "unified memory", facts.vram_gb
        free = telemetry.ram_free_gb if telemetry is not None else None
    else:
        kind, total = "RAM", facts.ram_gb
        free = telemetry.ram_free_gb if telemetry is not None else None
    if total is None:
        return MemoryPool(kind, None, None)
    if free is None:
        return MemoryPool(kind, total, total)
    if ready is False:
        ready = record.ready_model
    loaded = catalog.estimate(ready) if ready else None
    return MemoryPool(kind, total, min(total, free + (loaded.memory_gb if loaded else 0.0)))


def fits_memory(record: AgentRecord, model: CatalogModel, catalog: Catalog, headroom_gb: float = 0.0) -> bool:
    """Whether ``model`` fits the agent's memory pool now (unknown memory: assume it does)."""
    pool = memory_pool(record, record.facts, catalog)
    return pool.available_gb is None or model.memory_gb + headroom_gb <= pool.available_gb


# ---------------------------------------------------------------- filters


@dataclass(slots=True)
class Candidate:
    """An agent that passed the agent filters, with what model filters need (looked up once per plan: a plan
    of 5,000 agents asks for these tens of thousands of times)."""

    record: AgentRecord
    score: Score
    facts: MachineFacts
    pool: MemoryPool
    ready: str | None = None
    """The record's ``ready_model``."""
    speed_basis: tuple[float, str] | None = None
    """The measured speed on the reference model and its source, for :func:`candidate_speed`."""
    order_key: tuple[str, frozenset[str]] = ("", frozenset())
    """The current model's key and the keys of the models on disk: what a tier's order depends on."""


_NOT_GIVEN = object()


def make_candidate(record: AgentRecord, score: Score, catalog: Catalog, measured: object = _NOT_GIVEN) -> Candidate:
    """A :class:`Candidate` with everything the model filters and the tier order read, computed once
    (``measured``: the record's :func:`measured_speed` when the caller has it)."""
    ready = record.ready_model
    if measured is _NOT_GIVEN:
        measured = measured_speed(record)
    basis = None if measured is None else (
        normalise_speed(measured.tokens_per_s, measured.model, catalog),  # type: ignore[attr-defined]
        f"{measured.source}, scaled")  # type: ignore[attr-defined]
    current = record.current_model
    local = record.local_models
    order_key = (model_key(current or ""), frozenset(model_key(name) for name in local) if local else frozenset())
    return Candidate(record, score, record.facts, memory_pool(record, record.facts, catalog, ready), ready, basis,
                     order_key)


def candidate_speed(candidate: Candidate, model: CatalogModel, catalog: Catalog) -> tuple[float, str]:
    """:func:`broker.scheduling.estimates.placement_speed` with the measured part looked up once per candidate."""
    observed = candidate.record.observed
    if observed:
        found = observed.get(model.name)
        if found is not None and found.tokens_per_s:
            return found.tokens_per_s, "observed"
    basis = candidate.speed_basis
    if basis is not None:
        return basis[0] * catalog.reference.read_gb / model.read_gb, basis[1]
    return estimate_tokens_per_s(candidate.facts, model), "estimated"


@dataclass(frozen=True)
class FilterResult:
    kept: list[AgentRecord]
    dropped: dict[str, str]


class AgentFilter(Protocol):
    def filter(self, agents: Sequence[AgentRecord], now: float) -> FilterResult: ...


class OnlineFilter:
    """Only agents that are online (status online, telemetry on time) get models."""

    def filter(self, agents: Sequence[AgentRecord], now: float) -> FilterResult:
        kept, dropped = [], {}
        for record in agents:
            if record.online:
                kept.append(record)
            elif record.expired:
                dropped[record.agent_id] = f"gone: no telemetry for {record.silent_for(now):.0f} s"
            else:
                dropped[record.agent_id] = "offline"
        return FilterResult(kept, dropped)


class HardwareReportedFilter:
    """Placement needs the hardware message (retained; it follows the status within moments)."""

    def filter(self, agents: Sequence[AgentRecord], now: float) -> FilterResult:
        kept, dropped = [], {}
        for record in agents:
            if record.hardware is not None:
                kept.append(record)
            else:
                dropped[record.agent_id] = "has not reported its hardware yet"
        return FilterResult(kept, dropped)


@dataclass(frozen=True)
class QuarantineFilter:
    """An agent in quarantine (its answers showed it lying: broker/scheduling/trust.py) gets no model; the others
    share the tiers without it."""

    quarantined: Mapping[str, str]

    def filter(self, agents: Sequence[AgentRecord], now: float) -> FilterResult:
        kept, dropped = [], {}
        for record in agents:
            reason = self.quarantined.get(record.agent_id)
            if reason is None:
                kept.append(record)
            else:
                dropped[record.agent_id] = f"in quarantine: {reason}"
        return FilterResult(kept, dropped)


class ModelFilter(Protocol):
    def check(self, candidate: Candidate, model: CatalogModel, now: float) -> str | None:
        """``None`` when ``model`` may go to the candidate, else why not."""


class FitFilter:
    """Never assign a model that does not fit the machine's memory (with headroom)."""

    def __init__(self, headroom_gb: float) -> None:
        self.headroom_gb = headroom_gb

    def check(self, candidate: Candidate, model: CatalogModel, now: float) -> str | None:
        pool = candidate.pool
        if pool.available_gb is None:
            return None
        needed = model.memory_gb + self.headroom_gb
        if needed <= pool.available_gb:
            return None
        return (f"needs {model.memory_gb:g} + {self.headroom_gb:g} GB headroom, "
                f"{pool.available_gb:.1f} GB {pool.kind} free")


class SpeedFilter:
    """A machine expected (or measured) slower than a tier's ``min_tokens_per_s`` on a model gets a smaller one."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._floors = _floors(catalog)

    def check(self, candidate: Candidate, model: CatalogModel, now: float) -> str | None:
        known = self._floors.get(model.name)  # an exact catalog name: its tier (tier_of without the name lookup)
        if known is not None:
            tier, floor = known
        else:
            tier = self.catalog.tier_of(model.name)
            floor = self.catalog.tier(tier).min_tokens_per_s if tier is not None else None
        if not floor:
            return None
        speed, source = candidate_speed(candidate, model, self.catalog)
        if speed >= floor:
            return None
        return f"would run at {speed:.1f} tok/s ({source}), below the {tier} tier's {floor:g}"


def _floors(catalog: Catalog) -> dict[str, tuple[str | None, float | None]]:
    """Each catalog model's tier and that tier's ``min_tokens_per_s``, by model name (memoised in the catalog)."""
    found = catalog.derived.get("tier_floors")
    if found is None:
        floors: dict[str, tuple[str | None, float | None]] = {}
        for model in catalog.models:
            tier = catalog.tier_of(model.name)
            floors[model.name] = (tier, catalog.tier(tier).min_tokens_per_s if tier is not None else None)
        found = catalog.derived["tier_floors"] = floors
    return found  # type: ignore[return-value]


class FailedModelFilter:
    """A model that failed on an agent (pull or load) is not offered to it again for a while."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s

    def check(self, candidate: Candidate, model: CatalogModel, now: float) -> str | None:
        failed = candidate.record.failed_models
        if not failed:
            return None
        failure = failed.get(model.name)
        if failure is None or now - failure.at >= self.retry_s:
            return None
        return f"{FAILED_HERE} {now - failure.at:.0f} s ago ({failure.error})"


# ---------------------------------------------------------------- planning


def _tier_order(candidate: Candidate, catalog: Catalog, tier: str) -> tuple[CatalogModel, ...]:
    """A tier's models in the order placement tries them: the current model (no churn), models already on the
    machine (no download; reasoning models, which think aloud first, excepted), the tier's primary (the default
    preference), then the largest, reasoning models last.

    Memoised in the catalog on (tier, current model, local models): thousands of agents share a handful of
    those, so a plan sorts each tier a few times instead of once per agent."""
    current, local = candidate.order_key
    memo = catalog.derived
    key = ("tier_order", tier, current, local)
    found = memo.get(key)
    if found is None:
        if len(memo) >= _ORDER_MEMO_SIZE:
            memo.clear()
        found = memo[key] = _sorted_tier(catalog, tier, current, local)
    return found  # type: ignore[return-value]


_ORDER_MEMO_SIZE = 20_000


def _sorted_tier(catalog: Catalog, tier: str, current: str, local: frozenset[str]) -> tuple[CatalogModel, ...]:
    models = catalog.models_of(tier)
    primary = models[0].name

    def order(indexed: tuple[int, CatalogModel]) -> tuple[bool, bool, bool, bool, float, int]:
        index, model = indexed
        reasoning = REASONING_TAG in model.tags
        return (model_key(model.name) != current, reasoning or model_key(model.name) not in local,
                model.name != primary, reasoning, -model.parameters_b, index)

    return tuple(model for _, model in sorted(enumerate(models), key=order))


def _problem(candidate: Candidate, model: CatalogModel, model_filters: Sequence[ModelFilter], now: float) -> str | None:
    for model_filter in model_filters:
        problem = model_filter.check(candidate, model, now)
        if problem:
            return problem
    return None


def _choose(
    candidate: Candidate, catalog: Catalog, start_tier: str, model_filters: Sequence[ModelFilter], now: float
) -> tuple[CatalogModel | None, list[str]]:
    """First model from ``start_tier`` down that passes every model filter, and why the ones before did not."""
    notes: list[str] = []
    for tier in catalog.ordered_tiers[catalog.tier_rank(start_tier):]:
        skipped: list[str] = []
        for model in _tier_order(candidate, catalog, tier.name):
            problem = _problem(candidate, model, model_filters, now)
            if problem is None:
                notes.extend(_compact(skipped, tier.name))
                return model, notes
            skipped.append(f"{model.name} {problem}")
        notes.extend(_compact(skipped, tier.name))
    return None, notes


def _compact(skipped: list[str], tier: str) -> list[str]:
    """The first few reasons of a tier, and how many more models of it were skipped."""
    if len(skipped) <= NOTES_PER_TIER:
        return skipped
    return [*skipped[:NOTES_PER_TIER], f"{len(skipped) - NOTES_PER_TIER} more {tier} model(s) skipped"]


def _choose_local(
    candidate: Candidate, catalog: Catalog, model_filters: Sequence[ModelFilter], now: float
) -> tuple[CatalogModel | None, list[str]]:
    """For a runtime that cannot pull: its current model if it still has it, else the largest of its own chat
    models that fits (the agent's own spelling, sized from the catalog or the name)."""
    record = candidate.record
    current = model_key(record.current_model or "")
    own = [catalog.estimate(name).model_copy(update={"name": name}) for name in record.local_models]
    chat = [model for model in own if not model.embedding]
    chat.sort(key=lambda model: (model_key(model.name) != current, -catalog.size_rank(model.name), model.name))
    notes = []
    for model in chat:
        problem = _problem(candidate, model, model_filters, now)
        if problem is None:
            return model, notes
        notes.append(f"{model.name} {problem}")
    return None, notes


def nothing_placed(notes: Sequence[str]) -> str:
    """Why an agent got no model, in the order things happened: the models that failed there first, then why no
    other model would do (never "no model fits" about a model that fitted and then failed)."""
    failed = [note for note in notes if FAILED_HERE in note]
    others = [note for note in notes if FAILED_HERE not in note]
    if not failed:
        return "no catalog model fits: " + "; ".join(others)
    return "; ".join(failed) + ("; no other catalog model fits: " + "; ".join(others) if others
                                else "; no other catalog model to try")


def _start_tier(candidate: Candidate, catalog: Catalog, hysteresis: float) -> tuple[str, str]:
    score = candidate.score.total
    natural = catalog.tier_for_score(score).name
    low, high = catalog.tier_bounds(natural)
    span = f"{low:g}+" if high == float("inf") else f"{low:g}–{high:g}"
    reason = f"score {score:.1f} → {natural} ({span})"
    current = catalog.tier_of(candidate.record.current_model)
    if current is not None and current != natural:
        low, high = catalog.tier_bounds(current)
        if low - hysteresis <= score < high + hysteresis:
            return current, f"score {score:.1f} is within {hysteresis:g} of {current} (hysteresis)"
    return natural, reason


def plan_placement(
    state: ClusterState,
    catalog: Catalog,
    settings: PlacementSettings,
    now: float,
    created_at: float = 0.0,
    scores: Mapping[str, Score] | None = None,
    quarantined: Mapping[str, str] | None = None,
) -> Plan:
    """Decide which model each agent should serve, and why; nothing is applied here. Agents in ``quarantined``
    get nothing (the reason is the value)."""
    agents: Sequence[AgentRecord] = sorted(state.agents.values(), key=lambda record: record.agent_id)
    excluded: dict[str, str] = {}
    agent_filters: list[AgentFilter] = [OnlineFilter(), HardwareReportedFilter()]
    if quarantined:
        agent_filters.append(QuarantineFilter(quarantined))
    for agent_filter in agent_filters:
        result = agent_filter.filter(agents, now)
        agents = result.kept
        excluded.update(result.dropped)
    model_filters: list[ModelFilter] = [FitFilter(settings.headroom_gb), FailedModelFilter(settings.failed_retry_s),
                                        SpeedFilter(catalog)]
    local_filters: list[ModelFilter] = [FitFilter(settings.headroom_gb), FailedModelFilter(settings.failed_retry_s)]

    candidates: dict[str, Candidate] = {}
    natural_rank: dict[str, int] = {}
    entries: dict[str, Placement] = {}
    memo = catalog.derived
    starts: dict[tuple[float, str | None], tuple[str, str]] = {}  # scores repeat: a tier decision per (score, tier)
    for record in agents:
        measured = measured_speed(record)
        if scores and record.agent_id in scores:
            score = scores[record.agent_id]
        else:  # agent_score's memo, looked up with the measured speed already at hand (else: agent_score fills it)
            score = memo.get(("score", record.facts, measured)) or agent_score(record, catalog)  # type: ignore[assignment]
        candidate = make_candidate(record, score, catalog, measured)
        if not record.can_pull:
            placement = _place_local(candidate, catalog, local_filters, now)
            if isinstance(placement, str):
                excluded[record.agent_id] = placement
            else:
                candidates[record.agent_id] = candidate
                entries[record.agent_id] = placement
            continue
        current_tier = catalog.tier_of(record.current_model)
        decided = starts.get((score.total, current_tier))
        if decided is None:
            decided = starts[(score.total, current_tier)] = _start_tier(candidate, catalog, settings.hysteresis)
        start, reason = decided
        model, notes = _choose(candidate, catalog, start, model_filters, now)
        if model is None:
            excluded[record.agent_id] = nothing_placed(notes)
            continue
        if notes:
            reason += "; " + "; ".join(notes) + f"; falls back to {model.name}"
        else:
            reason += f": {model.name}"
        candidates[record.agent_id] = candidate
        natural_rank[record.agent_id] = catalog.tier_rank(catalog.tier_for_score(score.total).name)
        entries[record.agent_id] = Placement(
            record.agent_id, record.current_model, model.name, score.total, catalog.tier_of(model.name) or start,
            reason, current_also=tuple(record.assignment.also) if record.assignment is not None else ())

    if settings.mix and len(entries) >= 2:
        _keep_mix(entries, candidates, natural_rank, catalog, model_filters, now)
    _stagger(entries, candidates, settings.move_fraction)
    extra_filters = model_filters[1:]
    for agent_id, entry in entries.items():
        entries[agent_id] = _with_extras(entry, candidates[agent_id], catalog, settings, extra_filters, now)
    ordered = sorted(entries.values(), key=lambda entry: (-entry.score, entry.agent_id))
    return Plan(tuple(ordered), excluded, created_at)


def _place_local(candidate: Candidate, catalog: Catalog, model_filters: Sequence[ModelFilter],
                 now: float) -> Placement | str:
    """The placement of an agent whose runtime cannot pull, or why it gets none."""
    record = candidate.record
    kind = record.runtime_kind or "this runtime"
    if record.status is not None and record.status.backend_url:
        kind += f" at {record.status.backend_url}"
    if record.model_state is None:
        return f"{kind} cannot pull models, and the agent has not reported the ones it has yet"
    model, notes = _choose_local(candidate, catalog, model_filters, now)
    if model is None:
        if not record.local_models:
            return f"{kind} cannot pull models and lists none of its own: load a model there"
        return f"{kind} cannot pull models, and none of its own fits or works (has: " \
               f"{', '.join(record.local_models)})" + (f": {'; '.join(notes)}" if notes else "")
    reason = f"{kind} cannot pull models: serves the largest of its own ({', '.join(record.local_models)}) that fits"
    if notes:
        reason += "; " + "; ".join(notes)
    reason += f": {model.name}"
    target = model.name
    if record.current_model and model_key(record.current_model) == model_key(target):
        target = record.current_model  # the same model in the spelling already assigned: no churn
    return Placement(record.agent_id, record.current_model, target, candidate.score.total,
                     catalog.tier_of(model.name) or LOCAL_TIER, reason, local_only=True)


def _keep_mix(
    entries: dict[str, Placement],
    candidates: Mapping[str, Candidate],
    natural_rank: Mapping[str, int],
    catalog: Catalog,
    model_filters: Sequence[ModelFilter],
    now: float,
) -> None:
    """Serve every tier some agent qualifies for, taking donors from crowded higher tiers."""
    served = Counter(entry.tier for entry in entries.values())
    for tier in catalog.ordered_tiers:
        if served[tier.name]:
            continue
        rank = catalog.tier_rank(tier.name)
        options: list[tuple[str, CatalogModel]] = []
        for agent_id, entry in entries.items():
            if entry.local_only or natural_rank[agent_id] > rank or served[entry.tier] < 2 \
                    or catalog.tier_rank(entry.tier) >= rank:
                continue
            model, _ = _choose(candidates[agent_id], catalog, tier.name, model_filters, now)
            if model is not None and catalog.tier_of(model.name) == tier.name:
                options.append((agent_id, model))
        if not options:
            continue

        def preference(option: tuple[str, CatalogModel], wanted: str = tier.name) -> tuple[bool, int, float, str]:
            """Already serving this tier first (no churn), then the most crowded tier, then the lowest score."""
            entry = entries[option[0]]
            return (catalog.tier_of(entry.current_model) != wanted, -served[entry.tier], entry.score,
                    entry.agent_id)

        agent_id, model = min(options, key=preference)
        entry = entries[agent_id]
        served[entry.tier] -= 1
        served[tier.name] += 1
        entries[agent_id] = replace(
            entry, target_model=model.name, tier=tier.name,
            reason=f"score {entry.score:.1f}; mix: no agent served {tier.name}, so this one serves {model.name} "
                   f"({served[entry.tier]} left on {entry.tier})",
        )


def _with_extras(entry: Placement, candidate: Candidate, catalog: Catalog, settings: PlacementSettings,
                 extra_filters: Sequence[ModelFilter], now: float) -> Placement:
    """More than one model where memory allows: the default models of the tiers below the main one, as long as
    they fit *beside* it (main + extras + headroom within the machine's memory), so a big machine also answers
    the quick questions a small model serves best. Never for a runtime that cannot pull, never while the main
    model is still to be moved in (deferred), and the same list again changes nothing."""
    record = candidate.record
    current = tuple(record.assignment.also) if record.assignment is not None else ()
    if entry.local_only or entry.deferred or (settings.extra_models <= 0 and not settings.embedding_model) \
            or candidate.pool.total_gb is None:
        return _placed(entry, current if entry.deferred else (), current)
    main = catalog.model(entry.target_model) or catalog.estimate(entry.target_model)
    room = candidate.pool.total_gb - settings.headroom_gb - main.memory_gb
    main_rank = catalog.tier_rank(entry.tier) if entry.tier in _tier_names(catalog) else -1
    target_key = model_key(entry.target_model)
    extras: list[str] = []
    for tier in catalog.ordered_tiers[main_rank + 1:]:
        if len(extras) >= settings.extra_models:
            break
        model = catalog.primary(tier.name)
        if "embedding" in model.tags or model_key(model.name) == target_key:
            continue
        if model.memory_gb <= room and _problem(candidate, model, extra_filters, now) is None:
            extras.append(model.name)
            room -= model.memory_gb
    if settings.embedding_model and len(extras) < MAX_ALSO \
            and model_key(settings.embedding_model) != target_key:
        embedding = catalog.estimate(settings.embedding_model)
        if embedding.memory_gb <= room and _problem(candidate, embedding, extra_filters, now) is None:
            extras.append(settings.embedding_model)  # the setting's spelling: it is what the runtime pulls
    return _placed(entry, tuple(extras), current)


def _placed(entry: Placement, also: tuple[str, ...], current_also: tuple[str, ...]) -> Placement:
    """``replace(entry, also=…, current_also=…)`` without ``replace``'s field-by-field introspection (and the
    entry itself when nothing changes)."""
    if entry.also == also and entry.current_also == current_also:
        return entry
    return Placement(entry.agent_id, entry.current_model, entry.target_model, entry.score, entry.tier, entry.reason,
                     entry.deferred, entry.local_only, also, current_also)


def _tier_names(catalog: Catalog) -> frozenset[str]:
    found = catalog.derived.get("tier_names")
    if found is None:
        found = catalog.derived["tier_names"] = frozenset(tier.name for tier in catalog.tiers)
    return found  # type: ignore[return-value]


def _stagger(entries: dict[str, Placement], candidates: Mapping[str, Candidate], move_fraction: float) -> None:
    """Ready agents switch a few at a time and one always stays ready; the rest wait for the next plan."""
    if len(entries) < 2:
        return
    ready = {agent_id for agent_id, candidate in candidates.items()
             if candidate.ready is not None and agent_id in entries}
    if not ready:
        return
    movers = [entries[agent_id] for agent_id in ready if entries[agent_id].change]
    if not movers:
        return
    # Agents still pulling or loading from an earlier plan use up the budget too.
    in_transit = sum(1 for candidate in candidates.values() if candidate.record.model_state is not None
                     and candidate.record.model_state.state in ("pulling", "loading"))
    budget = max(1, math.floor((len(ready) + in_transit) * move_fraction)) - in_transit
    allowed = max(0, min(budget, len(ready) - 1))
    movers.sort(key=lambda entry: (-entry.score, entry.agent_id))
    for index, entry in enumerate(movers):
        if index >= allowed:
            entries[entry.agent_id] = replace(
                entry, deferred=True,
                reason=entry.reason + f"; deferred: {allowed} of {len(ready)} ready agents may switch at once",
            )

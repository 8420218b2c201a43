"""Model placement: a pure function from a registry snapshot and the catalog to a plan with reasons.

GPUStack-style: agent filters say why an agent gets no model, model filters
why a model cannot go to an agent (broker/scheduling/placement_filters.py).
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

Each agent's decision (rules 1–2) is kept between plans and taken again only
when its inputs changed materially (:func:`_still_holds`): at 5,000 agents
telemetry replaces every record each second, but rarely changes a decision.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from broker.scheduling.catalog import REASONING_TAG, Catalog, CatalogModel
from broker.scheduling.estimates import agent_score, measured_speed
from broker.scheduling.names import model_key
from broker.scheduling.placement_filters import (
    FAILED_HERE,
    Candidate,
    FailedModelFilter,
    FitFilter,
    MemoryPool,
    ModelFilter,
    SpeedFilter,
    agent_excluded,
    free_memory,
    make_candidate,
)
from broker.scheduling.placement_filters import fits_memory as fits_memory
from broker.scheduling.placement_filters import memory_pool as memory_pool
from broker.scheduling.registry import AgentRecord, ClusterState
from broker.scheduling.scoring import Score

LOCAL_TIER = "local"
"""Tier shown for an agent whose runtime cannot pull: it serves the largest model it has."""
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
    get nothing (the reason is the value).

    Each agent's decision is kept in the catalog's memo for the next plan. One plan at a time uses them: a plan
    that overlaps another (a what-if from a UI thread during a re-plan on the loop) decides everyone afresh,
    so no kept decision is read while another plan updates it."""
    if not _KEPT_DECISIONS.acquire(blocking=False):
        return _plan(state, catalog, settings, now, created_at, scores, quarantined, {})
    try:
        return _plan(state, catalog, settings, now, created_at, scores, quarantined, catalog.derived)
    finally:
        _KEPT_DECISIONS.release()


_KEPT_DECISIONS = threading.Lock()


def _plan(state: ClusterState, catalog: Catalog, settings: PlacementSettings, now: float, created_at: float,
          scores: Mapping[str, Score] | None, quarantined: Mapping[str, str] | None,
          memo: dict[object, object]) -> Plan:
    """:func:`plan_placement` with the decisions kept in ``memo`` (``{}``: none kept)."""
    model_filters: list[ModelFilter] = [FitFilter(settings.headroom_gb), FailedModelFilter(settings.failed_retry_s),
                                        SpeedFilter(catalog)]
    local_filters: list[ModelFilter] = [FitFilter(settings.headroom_gb), FailedModelFilter(settings.failed_retry_s)]

    dropped: tuple[dict[str, str], ...] = ({}, {}, {}, {})  # by agent filter, then those no model fits
    candidates: dict[str, Candidate] = {}
    natural_rank: dict[str, int] = {}
    entries: dict[str, Placement] = {}
    starts: dict[tuple[float, str | None], tuple[str, str]] = {}  # scores repeat: a tier decision per (score, tier)
    cache_key = ("placement_decisions", settings)
    previous: dict[str, _Decided] = memo.get(cache_key) or {}  # type: ignore[assignment]
    kept: dict[str, _Decided] = {}
    decisions: dict[str, _Decided] = {}
    all_kept = True
    for record in state.agents.values():  # in the map's order: every order below is by agent id
        agent_id = record.agent_id
        if (why := agent_excluded(record, now, quarantined)) is not None:
            dropped[why[0]][agent_id] = why[1]
            continue
        inputs = _inputs(record, scores.get(agent_id) if scores else None)
        decided = previous.get(agent_id)
        if decided is None or not _still_holds(decided, inputs, record):
            decided = _decide(record, inputs, scores, catalog, settings, model_filters, local_filters, starts, now)
            all_kept = False
        else:
            decided.candidate.record = record  # same decision; the record differs only in what it does not read
        if decided.placement is not None and not decided.rank[1]:
            decided.rank = (-decided.placement.score, agent_id)
        if inputs[-1] is None:  # a failure remembered: its filter reads the clock, so the decision is not kept
            kept[agent_id] = decided
        if decided.placement is None:
            dropped[3][agent_id] = decided.excluded
            continue
        candidates[agent_id] = decided.candidate
        entries[agent_id] = decided.placement
        decisions[agent_id] = decided
        if decided.natural_rank is not None:
            natural_rank[agent_id] = decided.natural_rank
    memo[cache_key] = kept

    # The plan's order (score, then agent id): the last plan's when every decision was kept for the same agents.
    order_key = ("placement_order", settings)
    last_order: tuple[int, list[str]] | None = memo.get(order_key)  # type: ignore[assignment]
    if all_kept and last_order is not None and last_order[0] == len(entries) and len(previous) == len(kept):
        order = last_order[1]
    else:
        order = sorted(entries, key=lambda agent_id: decisions[agent_id].rank)
        memo[order_key] = (len(entries), order)
    if settings.mix and len(entries) >= 2:
        _keep_mix(entries, candidates, natural_rank, catalog, model_filters, now)
    _stagger(entries, candidates, order, settings.move_fraction)
    extra_filters = model_filters[1:]
    for agent_id, entry in entries.items():
        decided = decisions[agent_id]
        if entry is decided.placement and decided.with_extras is not None:
            entries[agent_id] = decided.with_extras  # neither mixed nor deferred: the same as last time
            continue
        if decided.extras is None:
            decided.extras = {}
        entries[agent_id] = _with_extras(entry, candidates[agent_id], catalog, settings, extra_filters, now,
                                         decided.extras)
        if entry is decided.placement:
            decided.with_extras = entries[agent_id]
    excluded: dict[str, str] = {}
    for reasons in dropped:
        excluded.update(sorted(reasons.items()))
    return Plan(tuple(entries[agent_id] for agent_id in order), excluded, created_at)


@dataclass(slots=True)
class _Decided:
    """One agent's part of a plan before mix, stagger and extras, kept between plans (scored on events): an
    agent whose placement inputs did not change since the last plan is not decided again. At 5,000 agents
    telemetry replaces every record each second, but the inputs (:func:`_inputs`) rarely change."""

    inputs: tuple[object, ...]
    candidate: Candidate
    placement: Placement | None
    excluded: str = ""
    natural_rank: int | None = None
    extras: dict[tuple[str, str], tuple[str, ...]] | None = None
    """:func:`_with_extras`'s choice by (target model, tier)."""
    with_extras: Placement | None = None
    """``placement`` with its extras, when neither mix nor stagger changed it."""
    rank: tuple[float, str] = (0.0, "")
    """Where the agent stands in a plan: the highest score first, then by agent id."""


def _inputs(record: AgentRecord, score: Score | None) -> tuple[object, ...]:
    """Everything of a record that one agent's placement reads but its free memory (compared with ``==``;
    unchanged messages are the same objects, so the comparison is mostly identity). Of the telemetry only what
    the measured speed, the ready model and the memory pool's kind read; the failed models last (``None`` when
    there are none)."""
    telemetry = record.telemetry
    return (record.status, record.hardware, record.model_state, record.assignment, record.observed, record.expired,
            None if telemetry is None else (telemetry.tokens_per_s, telemetry.backend_reachable, telemetry.simulated,
                                            telemetry.ram_free_gb is None, telemetry.vram_free_gb is None),
            score, record.failed_models or None)


def _still_holds(decided: _Decided, inputs: tuple[object, ...], record: AgentRecord) -> bool:
    """Whether the decision of the last plan is the one this record would get: the same inputs, and free memory
    that changed only where no fit check (nor a reason) would tell. The candidate takes the new memory pool."""
    if decided.inputs != inputs:
        return False
    candidate = decided.candidate
    old = candidate.pool
    if old.available_gb is None:
        return True  # memory unknown (nothing to compare); unknown stays unknown while the inputs are the same
    total = old.total_gb  # the pool's kind and size come from the hardware: the same
    if total is None:
        return True
    free = free_memory(record, candidate.facts)
    available = total if free is None else min(total, free + candidate.loaded_gb)  # as memory_pool computes it
    if available != old.available_gb:
        if not candidate.fits_from <= available < candidate.fits_below:
            return False
        if candidate.fit_noted and f"{available:.1f}" != f"{old.available_gb:.1f}":
            return False
        candidate.pool = MemoryPool(old.kind, old.total_gb, available)
    return True


def _decide(record: AgentRecord, inputs: tuple[object, ...], scores: Mapping[str, Score] | None, catalog: Catalog,
            settings: PlacementSettings, model_filters: Sequence[ModelFilter], local_filters: Sequence[ModelFilter],
            starts: dict[tuple[float, str | None], tuple[str, str]], now: float) -> _Decided:
    """One agent's tier and model (or why none), from its record alone."""
    measured = measured_speed(record)
    if scores and record.agent_id in scores:
        score = scores[record.agent_id]
    else:  # agent_score's memo, looked up with the measured speed already at hand (else: agent_score fills it)
        score = catalog.derived.get(("score", record.facts, measured)) or agent_score(record, catalog)  # type: ignore[assignment]
    candidate = make_candidate(record, score, catalog, measured)
    if not record.can_pull:
        placement = _place_local(candidate, catalog, local_filters, now)
        if isinstance(placement, str):
            return _Decided(inputs, candidate, None, placement)
        return _Decided(inputs, candidate, placement)
    current_tier = catalog.tier_of(record.current_model)
    decided = starts.get((score.total, current_tier))
    if decided is None:
        decided = starts[(score.total, current_tier)] = _start_tier(candidate, catalog, settings.hysteresis)
    start, reason = decided
    model, notes = _choose(candidate, catalog, start, model_filters, now)
    if model is None:
        return _Decided(inputs, candidate, None, nothing_placed(notes))
    if notes:
        reason += "; " + "; ".join(notes) + f"; falls back to {model.name}"
    else:
        reason += f": {model.name}"
    placement = Placement(
        record.agent_id, record.current_model, model.name, score.total, catalog.tier_of(model.name) or start,
        reason, current_also=tuple(record.assignment.also) if record.assignment is not None else ())
    return _Decided(inputs, candidate, placement,
                    natural_rank=catalog.tier_rank(catalog.tier_for_score(score.total).name))


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
                 extra_filters: Sequence[ModelFilter], now: float,
                 memo: dict[tuple[str, str], tuple[str, ...]] | None = None) -> Placement:
    """More than one model where memory allows: the default models of the tiers below the main one, as long as
    they fit *beside* it (main + extras + headroom within the machine's memory), so a big machine also answers
    the quick questions a small model serves best. Never for a runtime that cannot pull, never while the main
    model is still to be moved in (deferred), and the same list again changes nothing. ``memo``: this agent's
    earlier choices by (target, tier), kept with its decision between plans."""
    record = candidate.record
    current = tuple(record.assignment.also) if record.assignment is not None else ()
    if entry.local_only or entry.deferred or (settings.extra_models <= 0 and not settings.embedding_model) \
            or candidate.pool.total_gb is None:
        return _placed(entry, current if entry.deferred else (), current)
    key = (entry.target_model, entry.tier)
    found = memo.get(key) if memo is not None else None
    if found is None:
        found = _extras(entry, candidate, catalog, settings, extra_filters, now)
        if memo is not None:
            memo[key] = found
    return _placed(entry, found, current)


def _extras(entry: Placement, candidate: Candidate, catalog: Catalog, settings: PlacementSettings,
            extra_filters: Sequence[ModelFilter], now: float) -> tuple[str, ...]:
    """The extra models of :func:`_with_extras` for a main model that is not deferred."""
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
    return tuple(extras)


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


def _stagger(entries: dict[str, Placement], candidates: Mapping[str, Candidate], order: Sequence[str],
             move_fraction: float) -> None:
    """Ready agents switch a few at a time and one always stays ready; the rest wait for the next plan.
    ``order``: the agents by score (highest first), then id — the order in which movers go first."""
    if len(entries) < 2:
        return
    ready = 0
    in_transit = 0  # agents still pulling or loading from an earlier plan use up the budget too
    moving = 0
    for agent_id, candidate in candidates.items():  # the same agents as ``entries``
        model_state = candidate.record.model_state
        if model_state is not None and model_state.state in ("pulling", "loading"):
            in_transit += 1
        if candidate.ready is not None:
            ready += 1
            entry = entries[agent_id]
            if entry.target_model != entry.current_model:
                moving += 1
    if not moving:
        return
    budget = max(1, math.floor((ready + in_transit) * move_fraction)) - in_transit
    allowed = max(0, min(budget, ready - 1))
    if allowed >= moving:
        return
    note = f"; deferred: {allowed} of {ready} ready agents may switch at once"
    index = 0
    for agent_id in order:
        if candidates[agent_id].ready is None:
            continue
        entry = entries[agent_id]
        if entry.target_model == entry.current_model:
            continue
        index += 1
        if index > allowed:
            entries[agent_id] = Placement(entry.agent_id, entry.current_model, entry.target_model, entry.score,
                                          entry.tier, entry.reason + note, True, entry.local_only, entry.also,
                                          entry.current_also)

"""Placement's filters: where a model would live on a machine and how much room there is, what one agent's
candidate carries through a plan, and the agent and model filters (GPUStack-style: agent filters say why an
agent gets no model at all, model filters why a model cannot go to an agent). Used by
:mod:`broker.scheduling.placement`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from broker.scheduling.catalog import Catalog, CatalogModel
from broker.scheduling.estimates import measured_speed
from broker.scheduling.names import model_key
from broker.scheduling.registry import AgentRecord
from broker.scheduling.scoring import MachineFacts, Score, estimate_tokens_per_s, normalise_speed

FAILED_HERE = "failed here"
"""How a model filter's note says the model failed on this agent (pull or load); reasons put those first."""


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
    kind, total = pool_kind(facts)
    if total is None:
        return MemoryPool(kind, None, None)
    free = free_memory(record, facts)
    if free is None:
        return MemoryPool(kind, total, total)
    if ready is False:
        ready = record.ready_model
    loaded = catalog.estimate(ready) if ready else None
    return MemoryPool(kind, total, min(total, free + (loaded.memory_gb if loaded else 0.0)))


def pool_kind(facts: MachineFacts) -> tuple[str, float | None]:
    """Where models live on the machine, and its size."""
    if facts.has_gpu_pool:
        return "VRAM", facts.vram_gb
    if facts.accelerator == "unified":
        return "unified memory", facts.vram_gb
    return "RAM", facts.ram_gb


def free_memory(record: AgentRecord, facts: MachineFacts) -> float | None:
    """Free memory in the pool as the agent reports it (``None``: not reported)."""
    telemetry = None if record.simulated else record.telemetry
    if facts.has_gpu_pool:
        free = telemetry.vram_free_gb if telemetry is not None else None
        if free is None and record.hardware is not None and not record.simulated:
            reported = [gpu.vram_free_gb for gpu in record.hardware.gpus if gpu.vram_free_gb is not None]
            free = sum(reported) if reported else None
        return free
    return telemetry.ram_free_gb if telemetry is not None else None


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
    fits_from: float = -math.inf
    fits_below: float = math.inf
    """Free memory for which every fit check made on this candidate gives the same answer again (the largest
    need that fitted, the smallest that did not): a decision holds while the free memory stays in between."""
    loaded_gb: float = 0.0
    """Memory of the ready model, which counts as free (switching unloads it)."""
    fit_noted: bool = False
    """A fit check failed, so a reason shows the free memory: the decision holds only while it reads the same."""


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
                     order_key, loaded_gb=catalog.estimate(ready).memory_gb if ready else 0.0)


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


def agent_excluded(record: AgentRecord, now: float, quarantined: Mapping[str, str] | None = None
                   ) -> tuple[int, str] | None:
    """Why an agent gets no model whatever its machine (the agent filters, in their order: online, hardware
    reported, not in quarantine), or ``None``; with the filter's index, as reasons are listed filter by filter.

    Only agents that are online (status online, telemetry on time) get models; placement needs the hardware
    message (retained; it follows the status within moments); an agent in quarantine (its answers showed it
    lying: broker/scheduling/trust.py) gets no model, and the others share the tiers without it.
    """
    if not record.online:
        return 0, f"gone: no telemetry for {record.silent_for(now):.0f} s" if record.expired else "offline"
    if record.hardware is None:
        return 1, "has not reported its hardware yet"
    if quarantined:
        reason = quarantined.get(record.agent_id)
        if reason is not None:
            return 2, f"in quarantine: {reason}"
    return None


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
            if needed > candidate.fits_from:
                candidate.fits_from = needed
            return None
        if needed < candidate.fits_below:
            candidate.fits_below = needed
        candidate.fit_noted = True
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

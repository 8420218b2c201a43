"""Which models the cluster can serve, on which agents, and how soon: pure functions of the registry.

Every model an online, reachable agent's runtime has is servable — its ready
assignment, what is loaded in memory, what is on disk — not only the model
placement assigned. Agents spell one model differently (``smollm2`` and
``smollm2:latest``, a GGUF path); models are grouped by
:func:`~broker.scheduling.names.model_key`, shown under one display name, and
each holder keeps its own spelling (the name a job for that agent must carry).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

from broker.scheduling.catalog import Catalog
from broker.scheduling.names import model_key
from broker.scheduling.registry import OFFER_ORDER, ClusterState, OfferState


@dataclass(frozen=True)
class ModelHolder:
    """One agent that has a model: its own name for it and how soon it can answer with it."""

    agent_id: str
    name: str
    state: OfferState
    simulated: bool = False


@dataclass(frozen=True)
class ModelAvailability:
    """One servable model, the agents that have it, and what the catalog knows about it."""

    name: str
    holders: list[ModelHolder]
    parameters_b: float | None = None
    memory_gb: float | None = None
    context_length: int | None = None
    family: str | None = None
    tags: list[str] = field(default_factory=list)
    in_catalog: bool = False
    embedding: bool = False

    @property
    def agents(self) -> list[str]:
        return [holder.agent_id for holder in self.holders]

    @property
    def best_state(self) -> OfferState:
        return min((holder.state for holder in self.holders), key=lambda state: OFFER_ORDER[state])


@dataclass(frozen=True)
class LoadedModel:
    """A model in one agent's runtime memory now (what Ollama's ``/api/ps`` lists)."""

    agent_id: str
    name: str
    display_name: str
    assigned: bool
    ready: bool
    memory_gb: float | None = None
    parameters_b: float | None = None
    context_length: int | None = None
    simulated: bool = False


def display_name(spellings: list[str], catalog: Catalog) -> str:
    """One name for a model the agents spell in several ways: the catalog's own if an agent uses it, else the
    most common spelling (ties: alphabetical)."""
    catalog_names = {model.name for model in catalog.models}
    exact = sorted(name for name in spellings if name in catalog_names)
    if exact:
        return exact[0]
    counts = Counter(spellings)
    return min(counts, key=lambda name: (-counts[name], name))


def model_availability(state: ClusterState, catalog: Catalog,
                       exclude: Collection[str] = ()) -> list[ModelAvailability]:
    """Every servable model with its holders (best state first), sorted by display name; agents in ``exclude``
    (in quarantine) serve nothing."""
    groups: dict[str, list[ModelHolder]] = {}
    for record in sorted(state.agents.values(), key=lambda record: record.agent_id):
        if record.agent_id in exclude:
            continue
        for offer in record.offers():
            groups.setdefault(model_key(offer.name), []).append(
                ModelHolder(record.agent_id, offer.name, offer.state, record.simulated))
    found = []
    for holders in groups.values():
        name = display_name([holder.name for holder in holders], catalog)
        entry = catalog.model(name)
        estimate = catalog.estimate(name)
        holders.sort(key=lambda holder: (OFFER_ORDER[holder.state], holder.agent_id))
        found.append(ModelAvailability(
            name=name, holders=holders,
            parameters_b=entry.parameters_b if entry else (None if "size unknown" in estimate.tags
                                                           else estimate.parameters_b),
            memory_gb=entry.memory_gb if entry else None,
            context_length=entry.context_length if entry else None,
            family=entry.family if entry else None,
            tags=list(entry.tags) if entry else [],
            in_catalog=entry is not None,
            embedding=estimate.embedding,
        ))
    return sorted(found, key=lambda model: model.name)


def servable_models(state: ClusterState, catalog: Catalog, exclude: Collection[str] = ()) -> list[str]:
    """The display names of every servable model (for ``/v1/models``, ``/api/tags`` and the model picker)."""
    return [model.name for model in model_availability(state, catalog, exclude)]


def loaded_models(state: ClusterState, catalog: Catalog, exclude: Collection[str] = ()) -> list[LoadedModel]:
    """What is loaded where, from the agents' model states (their runtimes' own reports where they give them);
    agents in ``exclude`` (in quarantine) are left out, as from :func:`model_availability`: no job goes there."""
    shown = {model_key(holder.name): model.name for model in model_availability(state, catalog, exclude)
             for holder in model.holders}
    found = []
    for record in sorted(state.agents.values(), key=lambda record: record.agent_id):
        if not record.reachable or record.agent_id in exclude:
            continue
        ready = record.ready_model
        assigned = record.current_model
        for name in record.loaded_models:
            entry = catalog.model(name)
            found.append(LoadedModel(
                agent_id=record.agent_id, name=name, display_name=shown.get(model_key(name), name),
                assigned=assigned is not None and model_key(assigned) == model_key(name),
                ready=ready is not None and model_key(ready) == model_key(name),
                memory_gb=entry.memory_gb if entry else None,
                parameters_b=entry.parameters_b if entry else None,
                context_length=entry.context_length if entry else None,
                simulated=record.simulated,
            ))
    return found

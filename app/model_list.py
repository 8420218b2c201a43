"""The models the cluster offers, as every surface lists them: servable ones with their machines, and those on the way.

One list feeds ``/v1/models``, ``/api/tags``, ``/api/show``, the chat's mode
picker and the script API's ``/models``, and decides which ``model`` names a
request may use. The coordinator says what is servable (every model an online
agent's runtime has: ready, loaded or on disk; :class:`ModelAvailability`);
a model still being pulled or loaded for its assignment is listed too, so a
request for it waits instead of failing. Names match the way runtimes spell
them (``model_key``: ``smollm2`` = ``smollm2:latest`` = ``/models/SmolLM2.gguf``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.coordinator.contract import ClusterSnapshot, ModelAvailability, ModelHolder
from broker.scheduling.names import model_key

ON_ITS_WAY = ("absent", "pulling", "loading")
"""Model states of an assignment that will become servable without anyone asking (a ready one already is)."""
LABEL_AGENTS = 3
"""Machines named in a picker label before the rest are counted ("+2")."""


@dataclass(frozen=True)
class ListedModel:
    """One model the cluster offers: who has it now, who is getting it, what the catalog knows."""

    name: str
    holders: list[ModelHolder] = field(default_factory=list)
    coming_to: list[str] = field(default_factory=list)
    """Online agents that are assigned this model and still pulling or loading it."""
    info: ModelAvailability | None = None

    @property
    def agents(self) -> list[str]:
        """The agents that can answer with it now."""
        return [holder.agent_id for holder in self.holders]


def listed_models(snapshot: ClusterSnapshot, servable: list[ModelAvailability]) -> list[ListedModel]:
    """Every servable model, then the assigned models still on their way, sorted by name."""
    listed = {model_key(model.name): ListedModel(model.name, list(model.holders), [], model) for model in servable}
    for agent in snapshot.agents:
        if not agent.online or not agent.model or agent.model_state not in ON_ITS_WAY:
            continue
        key = model_key(agent.model)
        known = listed.get(key)
        if known is None:
            listed[key] = ListedModel(agent.model, [], [agent.id], None)
        elif agent.id not in known.agents and agent.id not in known.coming_to:
            known.coming_to.append(agent.id)
    return sorted(listed.values(), key=lambda model: model.name)


def find_listed(name: str, models: list[ListedModel]) -> ListedModel | None:
    """The listed model ``name`` means, however a runtime spells it; None when the cluster offers no such model."""
    key = model_key(name)
    return next((model for model in models if model_key(model.name) == key), None)


def where(model: ListedModel) -> str:
    """``gpu-box, pi`` / ``a, b, c +2`` / ``pulling on pi``: the machines of a model in a few words."""
    agents = model.agents
    if agents:
        shown = ", ".join(agents[:LABEL_AGENTS])
        return shown + (f" +{len(agents) - LABEL_AGENTS}" if len(agents) > LABEL_AGENTS else "")
    return "on its way to " + ", ".join(model.coming_to[:LABEL_AGENTS])


def model_label(model: ListedModel) -> str:
    """The picker's label: ``model: qwen2.5:7b · gpu-box, laptop``."""
    return f"model: {model.name} · {where(model)}"

"""The models the cluster offers, as every surface lists them: servable ones with their machines, and those on the way.

One list feeds ``/v1/models``, ``/api/tags``, ``/api/show``, the chat's mode
picker and the script API's ``/models``, and decides which ``model`` names a
request may use. The coordinator says what is servable (every model an online
agent's runtime has: ready, loaded or on disk; :class:`ModelAvailability`);
a model still being pulled or loaded for its assignment is listed too, so a
request for it waits instead of failing. Names match the way runtimes spell
them (``model_key``: ``smollm2`` = ``smollm2:latest`` = ``/models/SmolLM2.gguf``).

Model names come from the agents, so a name with characters no runtime uses
(``<``, ``>``, quotes, brackets, ``!``, control characters) or longer than
:data:`MODEL_NAME_MAX_CHARS` is not offered anywhere (:func:`valid_model_name`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from broker.coordinator.contract import ClusterSnapshot, ModelAvailability, ModelHolder
from broker.scheduling.names import model_key

ON_ITS_WAY = ("absent", "pulling", "loading")
"""Model states of an assignment that will become servable without anyone asking (a ready one already is)."""
LABEL_AGENTS = 3
"""Machines named in a picker label before the rest are counted ("+2")."""
MODEL_NAME_MAX_CHARS = 200
_MODEL_NAME = re.compile(r"[\w./\\~][\w.:/\\@+~ \-]*")
"""What runtimes name models: Ollama (``library/qwen2.5:7b-instruct-q4_K_M``, ``hf.co/user/repo:Q4_K_M``),
llama.cpp and vLLM (``/models/SmolLM2-135M.gguf``, ``C:\\models\\x.gguf``, ``meta-llama/Llama-3.1-8B``),
LM Studio (``lmstudio-community/...``): letters, digits, ``_ . : / \\ @ + ~ -`` and spaces."""
INVALID_NAME = "(a name no runtime uses)"
"""What the cluster view shows for a model name :func:`valid_model_name` refuses."""


@functools.lru_cache(maxsize=65_536)
def valid_model_name(name: object) -> bool:
    """True for a model name in the character set runtimes use and at most :data:`MODEL_NAME_MAX_CHARS` long."""
    return isinstance(name, str) and 0 < len(name) <= MODEL_NAME_MAX_CHARS and bool(_MODEL_NAME.fullmatch(name))


def shown_model_name(name: str | None) -> str:
    """A model name for the cluster view: itself, ``–`` for none, a placeholder for a refused one."""
    if not name:
        return "–"
    return name if valid_model_name(name) else INVALID_NAME


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
    """Every servable model, then the assigned models still on their way, sorted by name; names no runtime would
    use are left out."""
    listed = {
        model_key(model.name): ListedModel(
            model.name, [holder for holder in model.holders if valid_model_name(holder.name)], [], model)
        for model in servable if valid_model_name(model.name)
    }
    for agent in snapshot.agents:
        if not agent.online or not valid_model_name(agent.model) or agent.model_state not in ON_ITS_WAY:
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

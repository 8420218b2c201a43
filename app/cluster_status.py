"""What the app says about the cluster: ``/health`` and ``/status``, and advice when it cannot answer.

Pure functions of a snapshot, so the HTTP API, the script API, the chat's
notice and the Cluster tab say the same thing; each builds its JSON here,
once, from the snapshot's plain fields.

What agents say is outside data: backend URLs and errors are shown redacted
(a URL's password or key never reaches the open ``/status``), model names no
runtime would use are left out, and ``/status`` is bounded in size
(:func:`bounded`) whatever the agents publish.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from app.markup import markdown_literal
from app.model_list import valid_model_name
from broker.coordinator.contract import AgentView, ClusterSnapshot
from broker.mqtt.settings import BrokerAddress
from broker.protocol.redaction import redact_url, redact_urls_in

OLLAMA_HELP = (
    "Install Ollama from https://ollama.com/download and start it (`ollama serve`), then start an agent on that "
    "machine: `python -m agent --broker-url mqtt://{broker}`. If Ollama already runs elsewhere, point an agent at "
    "it with `--backend-url http://HOST:11434`. A llama.cpp server, llama-cpp-python, LM Studio or vLLM works too: "
    "`python -m agent --backend openai --backend-url http://HOST:PORT/v1 --broker-url mqtt://{broker}` "
    "(docs/runtimes.md). Without any of them you can try the cluster with `python run_all.py --demo` "
    "(simulated agents)."
)
RUNTIME_NAMES = {
    "ollama": "Ollama",
    "llama.cpp": "llama.cpp server",
    "llama-cpp-python": "llama-cpp-python server",
    "lm-studio": "LM Studio",
    "vllm": "vLLM",
    "openai": "OpenAI-compatible server",
    "simulated": "simulated backend",
}
"""How the messages name each runtime kind (``RuntimeProfile.kind``)."""
MODELS_NAMED = 8
"""Models named in the one-line summary before the rest are counted."""
Quote = Callable[[str], str]
"""How a message quotes what an agent said: as is (JSON, logs) or literal for Markdown (the chat's notice)."""


def _as_is(text: str) -> str:
    return text


STATUS_AGENTS = 200
"""Agents detailed in ``/status``; more are counted in ``agents_omitted``."""
STATUS_LIST_ITEMS = 32
"""Items of any list in an agent's ``/status`` entry (GPUs, local models, ...); the rest are counted."""
STATUS_TEXT_CHARS = 1000
"""Characters of any text in ``/status``."""
STATUS_DEPTH = 6
"""Nesting kept in an agent's ``/status`` entry."""


def _plural(count: int) -> str:
    return "s" if count != 1 else ""


def runtime_kind(agent: AgentView) -> str | None:
    """The runtime's kind from its profile, else the backend the agent was started with (profile not learned)."""
    kind = agent.runtime.get("kind") if agent.runtime else None
    return str(kind) if kind else agent.backend


def runtime_name(agent: AgentView) -> str:
    kind = runtime_kind(agent)
    return RUNTIME_NAMES.get(kind or "", kind or "runtime")


def servable(snapshot: ClusterSnapshot) -> list[str]:
    """Every model an agent can answer with now (the assigned ones ready, and any other the runtimes have)."""
    return sorted(name for name in set(snapshot.servable_models) | set(snapshot.ready_models)
                  if valid_model_name(name))


def shown_url(url: str | None) -> str | None:
    """A backend URL as the app shows it: without its password or secret query values."""
    return redact_url(url) if url else url


def shown_error(error: str | None) -> str | None:
    """An agent's error as the app shows it: every URL in it redacted."""
    return redact_urls_in(error) if error else error


def is_healthy(snapshot: ClusterSnapshot) -> bool:
    """Connected, with an agent online and a model it can answer with: the cluster can answer."""
    return bool(snapshot.connected and any(agent.online for agent in snapshot.agents) and servable(snapshot))


AgentCondition = Literal["ready", "starting", "failed", "unreachable", "quarantined", "offline"]
"""What one agent can do now, as the cluster view colours it: only ``ready`` is green, and only ``ready`` agents
are counted as ready (an online agent whose model failed is online, not healthy)."""
CONDITION_ORDER: tuple[AgentCondition, ...] = ("ready", "starting", "failed", "unreachable", "quarantined", "offline")
"""The order the counts are named in (and the table sorts by)."""


def agent_condition(agent: AgentView) -> AgentCondition:
    """One agent's condition: offline first, then what stops an online agent from answering, then whether its
    model is ready (pulling, loading or waiting for an assignment count as starting)."""
    if not agent.online:
        return "offline"
    if agent.quarantined:
        return "quarantined"
    if agent.backend_reachable is False:
        return "unreachable"
    if agent.model_state == "failed":
        return "failed"
    if agent.model_state == "ready":
        return "ready"
    return "starting"


def condition_counts(snapshot: ClusterSnapshot) -> dict[AgentCondition, int]:
    """How many agents are in each condition (conditions no agent is in are left out), in
    :data:`CONDITION_ORDER`."""
    counts = Counter(agent_condition(agent) for agent in snapshot.agents)
    return {condition: counts[condition] for condition in CONDITION_ORDER if counts[condition]}


def counts_line(snapshot: ClusterSnapshot) -> str:
    """``3 of 4 agents online · 2 ready · 1 failed · 1 offline``: online, ready and failed counted apart."""
    total = len(snapshot.agents)
    online = sum(1 for agent in snapshot.agents if agent.online)
    counts = condition_counts(snapshot)
    parts = [f"{online} of {total} agent{_plural(total)} online"]
    parts.extend(f"{count} {condition}" for condition, count in counts.items())
    if "ready" not in counts and total:
        parts.insert(1, "0 ready")
    return " · ".join(parts)


def unreachable_advice(agents: list[AgentView], quote: Quote = _as_is) -> list[str]:
    """What to do about agents that cannot reach their runtime, in the words of each runtime (never "install
    Ollama" to someone whose agent talks to a llama.cpp server, LM Studio or vLLM)."""
    parts: list[str] = []
    ollama = [agent for agent in agents if runtime_kind(agent) == "ollama"]
    if ollama:
        names = quote(", ".join(agent.id for agent in ollama))
        detail = shown_error(next((agent.backend_error for agent in ollama if agent.backend_error), None))
        detail = quote(detail) if detail else None
        urls = sorted({quote(shown_url(agent.backend_url) or "") for agent in ollama if agent.backend_url})
        parts.append(
            f"Agent{_plural(len(ollama))} {names} cannot reach Ollama"
            + (f" at {', '.join(urls)}" if urls else "")
            + (f" ({detail})" if detail else "")
            + ". Install Ollama from https://ollama.com/download and start it, or restart the agent with "
            "`--backend-url http://HOST:11434` pointing at a machine that runs it."
        )
    for agent in agents:
        if runtime_kind(agent) == "ollama":
            continue
        where = f" at {quote(shown_url(agent.backend_url) or '')}" if agent.backend_url else ""
        detail = f" ({quote(shown_error(agent.backend_error) or '')})" if agent.backend_error else ""
        parts.append(
            f"Agent {quote(agent.id)} cannot reach its {quote(runtime_name(agent))}{where}{detail}. Start that "
            "server again (or check the address), or restart the agent with `--backend-url http://HOST:PORT/v1` "
            "pointing at a running one."
        )
    return parts


def models_summary(snapshot: ClusterSnapshot, quote: Quote = _as_is) -> str:
    """``qwen2.5:7b (gpu-box), smollm2 (laptop, pi)``: the servable models with their machines, a few at most."""
    holders = {model.name: model.agents for model in snapshot.models if valid_model_name(model.name)}
    names = servable(snapshot)
    shown = [quote(name) + (f" ({quote(', '.join(holders[name]))})" if holders.get(name) else "")
             for name in names[:MODELS_NAMED]]
    more = f" and {len(names) - MODELS_NAMED} more" if len(names) > MODELS_NAMED else ""
    return ", ".join(shown) + more


def cluster_message(snapshot: ClusterSnapshot, broker: BrokerAddress, quote: Quote = _as_is) -> str:
    """One plain sentence (or a short paragraph) about the cluster's state, with advice when it cannot answer;
    ``quote`` is applied to everything an agent said (ids, model names, errors, URLs)."""
    if not snapshot.connected:
        return (
            f"Not connected to the MQTT broker at {broker}. Start it (`python run_all.py` starts one) "
            "or set --broker-url."
        )
    online = [agent for agent in snapshot.agents if agent.online]
    if not online:
        return "No agent is connected yet. " + OLLAMA_HELP.format(broker=f"{broker.host}:{broker.port}")
    unreachable = [agent for agent in online if agent.backend_reachable is False]
    simulated = [agent for agent in online if agent.simulated]
    parts: list[str] = []
    if servable(snapshot):
        parts.append(f"{len(online)} agent{_plural(len(online))} online{_not_all_ready(online)}; "
                     f"models: {models_summary(snapshot, quote)}.")
    else:
        pulling = [
            f"{quote(agent.id)} {quote(agent.model_state or 'waiting')}"
            + (f" {agent.model_progress:.0%}" if agent.model_progress is not None else "")
            + (f" ({quote(shown_error(agent.model_error) or '')})" if agent.model_error else "")
            for agent in online
        ]
        parts.append(f"{len(online)} agent{_plural(len(online))} online, no model ready yet ({'; '.join(pulling)}).")
    parts.extend(unreachable_advice(unreachable, quote))
    if simulated:
        parts.append(f"Simulated agents (demo, not real models): {quote(', '.join(agent.id for agent in simulated))}.")
    return " ".join(parts)


def _not_all_ready(online: list[AgentView]) -> str:
    """`` (2 ready, 1 failed)`` when some online agents are not ready, else nothing."""
    counts = Counter(agent_condition(agent) for agent in online)
    if counts["ready"] == len(online):
        return ""
    return " (" + ", ".join(f"{counts[condition]} {condition}" for condition in CONDITION_ORDER
                            if counts[condition]) + ")"


def health(snapshot: ClusterSnapshot, broker: BrokerAddress) -> dict[str, Any]:
    """``GET /health``: is the cluster able to answer, and if not, what to do about it."""
    return {
        "healthy": is_healthy(snapshot),
        "connected_clients": sum(1 for agent in snapshot.agents if agent.online),
        "active_models": servable(snapshot),
        "message": cluster_message(snapshot, broker),
    }


def status(snapshot: ClusterSnapshot, broker: BrokerAddress, active_queries: int) -> dict[str, Any]:
    """``GET /status``: the original design's summary plus every agent's detail, as plain JSON of bounded size."""
    agents = snapshot.agents[:STATUS_AGENTS]
    return {
        "total_clients": len(snapshot.agents),
        "active_clients": sum(1 for agent in snapshot.agents if agent.online),
        "available_models": servable(snapshot),
        "healthy": is_healthy(snapshot),
        "connected": snapshot.connected,
        "message": cluster_message(snapshot, broker),
        "active_queries": active_queries,
        "agents": [agent_status(agent) for agent in agents],
        "agents_omitted": len(snapshot.agents) - len(agents),
        "leadership": bounded(snapshot.leadership),
        "generated_at": snapshot.generated_at,
    }


def leadership_line(snapshot: ClusterSnapshot, quote: Quote = _as_is) -> str:
    """``placement: this instance leads`` / ``placement: led by app-b.1f2e…`` / ``placement: no leader``: which of
    several instances on the broker assigns models (the others stand by and still answer)."""
    view = snapshot.leadership
    if view is None:
        return ""
    if view.leading:
        return "placement: this instance leads"
    if view.leader_id is None:
        return "placement: no leader yet (standing by)"
    return f"placement: standing by, led by {quote(view.leader_id)}"


def agent_status(agent: AgentView) -> dict[str, Any]:
    """One agent's ``/status`` entry: its view with URLs redacted, refused model names out, every part bounded."""
    fields = {field.name: getattr(agent, field.name) for field in dataclasses.fields(agent)}
    fields["backend_url"] = shown_url(agent.backend_url)
    fields["backend_error"] = shown_error(agent.backend_error)
    fields["model_error"] = shown_error(agent.model_error)
    fields["model"] = agent.model if agent.model is None or valid_model_name(agent.model) else None
    fields["local_models"] = [name for name in agent.local_models[:STATUS_LIST_ITEMS * 4] if valid_model_name(name)]
    fields["loaded_models"] = [name for name in agent.loaded_models[:STATUS_LIST_ITEMS * 4] if valid_model_name(name)]
    fields["available_models"] = {name: state for name, state in list(agent.available_models.items())[
        :STATUS_LIST_ITEMS * 4] if valid_model_name(name)}
    return bounded(fields)


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-ready data with every text, list and mapping cut to the ``/status`` limits, and every URL
    in a text redacted.

    A cut list ends with ``"… N more"``; a cut mapping gets the key ``"…"`` with the count left out.
    """
    if isinstance(value, str):
        value = redact_urls_in(value)  # an agent may quote a URL with its password anywhere (an error, a probe)
        return value if len(value) <= STATUS_TEXT_CHARS else value[: STATUS_TEXT_CHARS - 1] + "…"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int):
        return value
    if depth >= STATUS_DEPTH:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        kept = {str(key)[:STATUS_TEXT_CHARS]: bounded(item, depth + 1) for key, item in items[:STATUS_LIST_ITEMS]}
        if len(items) > STATUS_LIST_ITEMS:
            kept["…"] = f"{len(items) - STATUS_LIST_ITEMS} more"
        return kept
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        kept_items = [bounded(item, depth + 1) for item in items[:STATUS_LIST_ITEMS]]
        if len(items) > STATUS_LIST_ITEMS:
            kept_items.append(f"… {len(items) - STATUS_LIST_ITEMS} more")
        return kept_items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return bounded({field.name: getattr(value, field.name) for field in dataclasses.fields(value)}, depth)
    return bounded(str(value), depth)


def notice_markdown(snapshot: ClusterSnapshot, broker: BrokerAddress) -> str:
    """The line above the chat: the cluster's state, in bold when it cannot answer."""
    message = cluster_message(snapshot, broker, markdown_literal)  # names, errors, URLs: the agents say them
    return message if is_healthy(snapshot) else f"**The cluster cannot answer yet.** {message}"

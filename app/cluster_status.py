"""What the app says about the cluster: ``/health`` and ``/status``, and advice when it cannot answer.

Pure functions of a snapshot, so the HTTP API, the script API, the chat's
notice and the Cluster tab say the same thing; each builds its JSON here,
once, from the snapshot's plain fields.
"""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from broker.coordinator.contract import AgentView, ClusterSnapshot
from broker.mqtt.settings import BrokerAddress

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
    return sorted(set(snapshot.servable_models) | set(snapshot.ready_models))


def is_healthy(snapshot: ClusterSnapshot) -> bool:
    """Connected, with an agent online and a model it can answer with: the cluster can answer."""
    return bool(snapshot.connected and any(agent.online for agent in snapshot.agents) and servable(snapshot))


def unreachable_advice(agents: list[AgentView]) -> list[str]:
    """What to do about agents that cannot reach their runtime, in the words of each runtime (never "install
    Ollama" to someone whose agent talks to a llama.cpp server, LM Studio or vLLM)."""
    parts: list[str] = []
    ollama = [agent for agent in agents if runtime_kind(agent) == "ollama"]
    if ollama:
        names = ", ".join(agent.id for agent in ollama)
        detail = next((agent.backend_error for agent in ollama if agent.backend_error), None)
        urls = sorted({agent.backend_url for agent in ollama if agent.backend_url})
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
        where = f" at {agent.backend_url}" if agent.backend_url else ""
        detail = f" ({agent.backend_error})" if agent.backend_error else ""
        parts.append(
            f"Agent {agent.id} cannot reach its {runtime_name(agent)}{where}{detail}. Start that server again (or "
            "check the address), or restart the agent with `--backend-url http://HOST:PORT/v1` pointing at a "
            "running one."
        )
    return parts


def models_summary(snapshot: ClusterSnapshot) -> str:
    """``qwen2.5:7b (gpu-box), smollm2 (laptop, pi)``: the servable models with their machines, a few at most."""
    holders = {model.name: model.agents for model in snapshot.models}
    names = servable(snapshot)
    shown = [f"{name} ({', '.join(holders[name])})" if holders.get(name) else name for name in names[:MODELS_NAMED]]
    more = f" and {len(names) - MODELS_NAMED} more" if len(names) > MODELS_NAMED else ""
    return ", ".join(shown) + more


def cluster_message(snapshot: ClusterSnapshot, broker: BrokerAddress) -> str:
    """One plain sentence (or a short paragraph) about the cluster's state, with advice when it cannot answer."""
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
        parts.append(f"{len(online)} agent{_plural(len(online))} online; models: {models_summary(snapshot)}.")
    else:
        pulling = [
            f"{agent.id} {agent.model_state or 'waiting'}"
            + (f" {agent.model_progress:.0%}" if agent.model_progress is not None else "")
            + (f" ({agent.model_error})" if agent.model_error else "")
            for agent in online
        ]
        parts.append(f"{len(online)} agent{_plural(len(online))} online, no model ready yet ({'; '.join(pulling)}).")
    parts.extend(unreachable_advice(unreachable))
    if simulated:
        parts.append(f"Simulated agents (demo, not real models): {', '.join(agent.id for agent in simulated)}.")
    return " ".join(parts)


def health(snapshot: ClusterSnapshot, broker: BrokerAddress) -> dict[str, Any]:
    """``GET /health``: is the cluster able to answer, and if not, what to do about it."""
    return {
        "healthy": is_healthy(snapshot),
        "connected_clients": sum(1 for agent in snapshot.agents if agent.online),
        "active_models": servable(snapshot),
        "message": cluster_message(snapshot, broker),
    }


def status(snapshot: ClusterSnapshot, broker: BrokerAddress, active_queries: int) -> dict[str, Any]:
    """``GET /status``: the original design's summary plus every agent's detail, as plain JSON."""
    return {
        "total_clients": len(snapshot.agents),
        "active_clients": sum(1 for agent in snapshot.agents if agent.online),
        "available_models": servable(snapshot),
        "healthy": is_healthy(snapshot),
        "connected": snapshot.connected,
        "message": cluster_message(snapshot, broker),
        "active_queries": active_queries,
        "agents": [dataclasses.asdict(agent) for agent in snapshot.agents],
        "generated_at": snapshot.generated_at,
    }


def notice_markdown(snapshot: ClusterSnapshot, broker: BrokerAddress) -> str:
    """The line above the chat: the cluster's state, in bold when it cannot answer."""
    message = html.escape(cluster_message(snapshot, broker), quote=False)  # names, errors, URLs: the agents say them
    return message if is_healthy(snapshot) else f"**The cluster cannot answer yet.** {message}"

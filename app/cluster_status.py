"""What the app says about the cluster: ``/health`` and ``/status``, and advice when it cannot answer.

Pure functions of a snapshot, so the HTTP API, the script API, the chat's
notice and the Cluster tab say the same thing; each builds its JSON here,
once, from the snapshot's plain fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from broker.coordinator.contract import ClusterSnapshot
from broker.mqtt.settings import BrokerAddress

OLLAMA_HELP = (
    "Install Ollama from https://ollama.com/download and start it (`ollama serve`), then start an agent on that "
    "machine: `python -m agent --broker-url mqtt://{broker}`. If Ollama already runs elsewhere, point an agent at "
    "it with `--backend-url http://HOST:11434`. Without Ollama you can try the cluster with "
    "`python run_all.py --demo` (simulated agents)."
)


def _plural(count: int) -> str:
    return "s" if count != 1 else ""


def is_healthy(snapshot: ClusterSnapshot) -> bool:
    """Connected, with an agent online and a model ready: the cluster can answer."""
    return bool(snapshot.connected and any(agent.online for agent in snapshot.agents) and snapshot.ready_models)


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
    ready = sorted(set(snapshot.ready_models))
    unreachable = [agent for agent in online if agent.backend_reachable is False]
    simulated = [agent for agent in online if agent.simulated]
    parts: list[str] = []
    if ready:
        parts.append(f"{len(online)} agent{_plural(len(online))} online; ready models: {', '.join(ready)}.")
    else:
        pulling = [
            f"{agent.id} {agent.model_state or 'waiting'}"
            + (f" {agent.model_progress:.0%}" if agent.model_progress is not None else "")
            for agent in online
        ]
        parts.append(f"{len(online)} agent{_plural(len(online))} online, no model ready yet ({'; '.join(pulling)}).")
    if unreachable:
        names = ", ".join(agent.id for agent in unreachable)
        detail = next((agent.backend_error for agent in unreachable if agent.backend_error), None)
        parts.append(
            f"Agent{_plural(len(unreachable))} {names} cannot reach Ollama"
            + (f" ({detail})" if detail else "")
            + ". Install Ollama from https://ollama.com/download and start it, or restart the agent with "
            "`--backend-url http://HOST:11434` pointing at a machine that runs it."
        )
    if simulated:
        parts.append(f"Simulated agents (demo, not real models): {', '.join(agent.id for agent in simulated)}.")
    return " ".join(parts)


def health(snapshot: ClusterSnapshot, broker: BrokerAddress) -> dict[str, Any]:
    """``GET /health``: is the cluster able to answer, and if not, what to do about it."""
    return {
        "healthy": is_healthy(snapshot),
        "connected_clients": sum(1 for agent in snapshot.agents if agent.online),
        "active_models": sorted(set(snapshot.ready_models)),
        "message": cluster_message(snapshot, broker),
    }


def status(snapshot: ClusterSnapshot, broker: BrokerAddress, active_queries: int) -> dict[str, Any]:
    """``GET /status``: the original design's summary plus every agent's detail, as plain JSON."""
    return {
        "total_clients": len(snapshot.agents),
        "active_clients": sum(1 for agent in snapshot.agents if agent.online),
        "available_models": sorted(set(snapshot.ready_models)),
        "healthy": is_healthy(snapshot),
        "connected": snapshot.connected,
        "message": cluster_message(snapshot, broker),
        "active_queries": active_queries,
        "agents": [dataclasses.asdict(agent) for agent in snapshot.agents],
        "generated_at": snapshot.generated_at,
    }


def notice_markdown(snapshot: ClusterSnapshot, broker: BrokerAddress) -> str:
    """The line above the chat: the cluster's state, in bold when it cannot answer."""
    message = cluster_message(snapshot, broker)
    return message if is_healthy(snapshot) else f"**The cluster cannot answer yet.** {message}"

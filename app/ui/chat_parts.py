"""The chat tab's pure parts: labels, the mode and machine lists, the one-line notice, the settings summary.

Functions of their arguments only, kept apart from the Gradio wiring in app/ui/chat.py so each can be read
(and unit-tested) on its own.
"""

from __future__ import annotations

import html
from typing import Any

from app import cluster_status
from app.errors import AppError
from app.images import ImageAttachment, size_text, vision_models
from app.model_list import ListedModel, model_label
from broker.coordinator.contract import ClusterSnapshot, RoutingMode
from broker.mqtt.settings import BrokerAddress
from broker.scheduling.names import model_key
from broker.scheduling.registry import OFFER_ORDER

MODE_HELP = (
    "auto: the agent expected to answer first · quality: the largest model ready · a model name: an agent serving it"
    " · all: every agent answers, then the answers are combined"
)
MODE_LABELS = {
    RoutingMode.AUTO: "auto (fastest)",
    RoutingMode.QUALITY: "quality (largest model)",
    RoutingMode.ALL: "all (every agent)",
}
ANY_MACHINE = ""
"""The machine picker's "let routing choose" value (``agent=None``)."""
SEND_LABEL = "Send"
BUSY_LABEL = "Answering…"
RESEND_LABEL = "Resend"
REGENERATE_LABEL = "↻ Regenerate"
RETRY_LABEL = "↻ Retry"
IDLE_PLACEHOLDER = "Type a question and press Enter"
BUSY_PLACEHOLDER = "Answering… (Stop cancels it)"
EDIT_PLACEHOLDER = "Edit your question, then press Enter to resend it"
ATTACH_LABEL = "🖼 Attach image"
NO_VISION_LABEL = "🖼 Images: no machine has a vision model"
NO_VISION = "No machine has a vision model, so images cannot be sent: add one (llava, gemma3:4b, …) to a machine."


def mode_choices(models: list[ListedModel]) -> list[tuple[str, str]]:
    """The routing modes, then every model the cluster serves with the machines that have it (no embedding models:
    they cannot chat)."""
    return [(MODE_LABELS[mode], mode.value) for mode in RoutingMode] + [
        (model_label(model), model.name) for model in models if not (model.info and model.info.embedding)
    ]


def machine_ready(agent: Any) -> bool:
    """Online, not in quarantine, and with a model it can answer with now."""
    return bool(agent.online and not agent.quarantined
                and (agent.model_state == "ready" or any(agent.available_models.values())))


def machine_choices(snapshot: ClusterSnapshot, keep: str | None = None) -> list[tuple[str, str]]:
    """"any machine", then every ready machine with its model; ``keep`` (a chat's saved machine) stays listed
    when it is not ready, marked so, so reopening the chat restores it."""
    choices = [("any machine", ANY_MACHINE)]
    ready = [agent for agent in snapshot.agents if machine_ready(agent)]
    for agent in sorted(ready, key=lambda agent: agent.id):
        details = ", ".join(part for part in (agent.model, "simulated" if agent.simulated else None) if part)
        choices.append((f"{agent.id} ({details})" if details else agent.id, agent.id))
    if keep and all(value != keep for _, value in choices):
        choices.append((f"{keep} (not ready)", keep))
    return choices


def notice_line(snapshot: ClusterSnapshot, broker: BrokerAddress) -> tuple[str, str, bool]:
    """The chat's one quiet line about the cluster, the full advice behind it, and whether it can answer."""
    healthy = cluster_status.is_healthy(snapshot)
    detail = cluster_status.cluster_message(snapshot, broker)
    if not snapshot.connected:
        return "Not connected to the broker · details in Cluster", detail, False
    if not any(agent.online for agent in snapshot.agents):
        return "No machine connected yet · how to add one", detail, False
    ready = sum(1 for agent in snapshot.agents if machine_ready(agent))
    total = len(snapshot.agents)
    line = f"{ready} of {total} machine{'s' if total != 1 else ''} ready"
    if not healthy:
        line += " · no model ready yet"
    simulated = sum(1 for agent in snapshot.agents if agent.online and agent.simulated)
    if simulated:
        line += f" · {simulated} simulated"
    return line + " · details in Cluster", detail, healthy


def settings_summary(mode_value: str | None, machine: str | None, rag_on: bool, system_prompt: str | None) -> str:
    """The settings accordion's label: what this chat uses, readable while it is closed."""
    parts = [str(mode_value or RoutingMode.AUTO.value)]
    if machine:
        parts.append(f"on {machine}")
    if rag_on:
        parts.append("documents on")
    if (system_prompt or "").strip():
        parts.append("system prompt")
    return "Chat settings · " + " · ".join(parts)


def vision_mode(mode_value: str, models: list[ListedModel]) -> str:
    """The mode a question with an image is sent with: a named vision model as it is; for a routing mode the
    vision model most ready (routing modes pick among the models agents have loaded, which may have no vision);
    a model without vision is refused here, with what to pick instead."""
    found = vision_models(models)
    if not found:
        raise AppError(NO_VISION)
    if mode_value not in {mode.value for mode in RoutingMode}:
        if model_key(mode_value) in {model_key(name) for name in found}:
            return mode_value
        raise AppError(f"{mode_value} does not take images: pick a vision model ({', '.join(found[:3])}) or auto "
                       "in Chat settings. Your question and image are kept.")
    by_name = {model.name: model for model in models}
    return min(found, key=lambda name: OFFER_ORDER[by_name[name].info.best_state] if by_name[name].info else 9)


def attachment_chip(attachment: ImageAttachment | None) -> str:
    """The image waiting to go with the next question, shown beside the button."""
    if attachment is None:
        return ""
    return (f'<span class="slb-attachment">🖼 {html.escape(attachment.name)}, {size_text(attachment.size)} · goes with '
            "your next question</span>")


def checked_number(value: Any, name: str, *, whole: bool = False) -> float | None:
    """A number typed in a settings box; empty is None (the model's default), anything else unreadable is refused."""
    text = str(value if value is not None else "").strip().replace(",", ".")
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None
    if whole and not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {text!r}")
    return number

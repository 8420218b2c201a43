"""Pure rendering for the chat: messages, answers, fan-out cards, citations (and the shared page CSS).

The Cluster and Documents tabs render in app/ui/cluster_render.py and app/ui/documents_render.py.

Functions of their arguments only, kept apart from the Gradio wiring so they
are unit-testable and so a stored answer re-opened from the session list
looks exactly like it did live (app/ui/live.py renders the live one with
them). Chat messages are HTML made here (the chatbot shows them without a
Markdown pass of its own): model text through :func:`app.markup.markdown_html`
(no raw HTML, no image), everything else escaped. In the ``gr.Markdown``
parts (placement, search results) outside text goes through
:func:`app.markup.markdown_literal`; in the ``gr.HTML`` parts through
``html.escape``. Model names with characters no runtime uses are not shown
(:func:`app.model_list.valid_model_name`).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from app.markup import markdown_html, text_html
from app.store import ChatMessage as StoredMessage
from app.store import Citation

CURSOR = " ▌"
SIMULATED_BADGE = "simulated"

Message = dict[str, Any]


def agent_label(agent_id: str, model: str | None, simulated: bool) -> str:
    """``agent-a (llama3.2:1b, simulated)``: every answer names its machine and model."""
    details = [part for part in (model, SIMULATED_BADGE if simulated else None) if part]
    return f"{agent_id} ({', '.join(details)})" if details else agent_id


def answered_by(
    agents: Sequence[str], models: Sequence[str], mode: str | None, stats: dict[str, Any], simulated: set[str]
) -> str:
    """The provenance line under an answer."""
    names = []
    for index, agent in enumerate(agents):
        model = models[index] if index < len(models) else (models[0] if len(models) == 1 else None)
        names.append(agent_label(agent, model, agent in simulated))
    parts = [f"answered by {', '.join(names)}" if names else "no agent answered"]
    if mode:
        parts.append(f"mode {mode}")
    if stats.get("aggregation"):
        writer = f" (written by {stats['combined_by']})" if stats.get("combined_by") else ""
        parts.append(f"combined by {stats['aggregation']}{writer}")
    if stats.get("agreement") is not None:
        parts.append(f"agreement {float(stats['agreement']):.2f}")
    if stats.get("ttft_s") is not None:
        parts.append(f"first token {float(stats['ttft_s']):.2f} s")
    if stats.get("tokens_per_s"):
        parts.append(f"{float(stats['tokens_per_s']):.0f} tok/s")
    if stats.get("latency_s") is not None:
        parts.append(f"{float(stats['latency_s']):.1f} s")
    if stats.get("failovers"):
        parts.append(f"{stats['failovers']} failover(s)")
    return " · ".join(parts)


def citations_html(citations: Iterable[Citation | dict[str, Any]]) -> str:
    """The sources of a RAG answer: document, page or section, and the passage as plain text."""
    blocks = []
    for citation in citations:
        item = citation.model_dump() if isinstance(citation, Citation) else dict(citation)
        where = []
        if item.get("page") is not None:
            where.append(f"page {item['page']}")
        if item.get("section"):
            where.append(str(item["section"]))
        location = f" ({html.escape(', '.join(where))})" if where else ""
        number = html.escape(str(item.get("number", "?")))
        name = html.escape(str(item.get("document_name", "?")))
        blocks.append(f'<div class="slb-citation"><p><strong>[{number}] {name}</strong>{location}</p>'
                      f"<blockquote>{text_html(str(item.get('snippet', '')))}</blockquote></div>")
    return "\n".join(blocks)


def answers_html(answers: Iterable[dict[str, Any]]) -> str:
    """Every agent's answer of a fan-out, for the collapsed block under a combined answer."""
    blocks = []
    for answer in answers:
        label = agent_label(answer.get("agent_id", "?"), answer.get("model"), bool(answer.get("simulated")))
        parts = [f"<p><strong>{html.escape(label)}</strong></p>"]
        if answer.get("error"):
            parts.append(f"<p><em>failed: {html.escape(str(answer['error']))}</em></p>")
        if answer.get("text"):
            parts.append(markdown_html(str(answer["text"])))
        blocks.append("\n".join(parts))
    return "\n<hr>\n".join(blocks)


def user_message(text: str) -> Message:
    """The user's question as the chat shows it (Markdown, with the same allow-list as answers)."""
    return {"role": "user", "content": markdown_html(text)}


def error_message(error: str) -> Message:
    return {"role": "assistant", "content": f"<p><strong>Error: {html.escape(error)}</strong></p>"}


def answer_messages(
    text: str,
    *,
    agents: Sequence[str],
    models: Sequence[str],
    mode: str | None,
    stats: dict[str, Any],
    citations: Sequence[Citation | dict[str, Any]],
    simulated: set[str],
    streaming: bool = False,
    status: str | None = None,
) -> list[Message]:
    """Chatbot messages for one answer: the text with its provenance, the sources, the per-agent answers."""
    parts: list[str] = []
    body = text + (CURSOR if streaming else "")
    if status:
        parts.append(f"<p><em>{html.escape(status)}</em></p>")
    elif stats.get("restarts"):
        parts += [f"<p><em>{html.escape(str(restart.get('note', '')))}</em></p>" for restart in stats["restarts"]]
    if body.strip():
        parts.append(markdown_html(body))
    if stats.get("error") and stats.get("error_code") != "cancelled":
        parts.append(f"<p><strong>Error: {html.escape(str(stats['error']))}</strong></p>")
    elif stats.get("error_code") == "cancelled":
        parts.append("<p><em>(stopped)</em></p>")
    footer = "" if streaming else answered_by(agents, models, mode, stats, simulated)
    if footer:
        parts.append(f"<p><sub>{html.escape(footer)}</sub></p>")
    messages: list[Message] = [{"role": "assistant", "content": "\n".join(parts) or "<p>…</p>"}]
    if stats.get("answers"):
        messages.append(
            {
                "role": "assistant",
                "content": answers_html(stats["answers"]),
                "metadata": {"title": f"Every agent's answer ({len(stats['answers'])})", "status": "done"},
            }
        )
    if citations:
        messages.append(
            {
                "role": "assistant",
                "content": citations_html(citations),
                "metadata": {"title": f"Sources ({len(citations)})", "status": "done"},
            }
        )
    return messages


def history_messages(history: Sequence[StoredMessage], simulated: set[str] | None = None) -> list[Message]:
    """A stored session as chatbot messages."""
    messages: list[Message] = []
    for stored in history:
        if stored.role == "user":
            messages.append(user_message(stored.content))
        elif stored.role == "assistant":
            marked = set(stored.stats.get("simulated_agents", [])) | (simulated or set())
            messages.extend(
                answer_messages(
                    stored.content,
                    agents=stored.agents,
                    models=stored.models,
                    mode=stored.mode,
                    stats=stored.stats,
                    citations=stored.citations,
                    simulated=marked,
                )
            )
    return messages


def agent_card_html(
    agent: str, model: str | None, state: str, stats: dict[str, Any], text: str, simulated: bool
) -> str:
    """One agent's answer of a fan-out, as a card: machine, model, state, speed, text so far."""
    numbers = []
    if stats.get("ttft_s") is not None:
        numbers.append(f"first token {stats['ttft_s']:.2f} s")
    if stats.get("tokens_per_s"):
        numbers.append(f"{stats['tokens_per_s']:.0f} tok/s")
    badge = '<span class="slb-badge slb-sim">simulated</span>' if simulated else ""
    return (
        '<div class="slb-card">'
        f'<div class="slb-card-head"><b>{html.escape(agent)}</b> {badge}'
        f'<span class="slb-model">{html.escape(model or "")}</span></div>'
        f'<div class="slb-card-state">{html.escape(state)}'
        f'{" · " + html.escape(" · ".join(numbers)) if numbers else ""}</div>'
        f'<div class="slb-card-text">{html.escape(text)}</div>'
        "</div>"
    )


def answers_panel_html(cards: Sequence[str], aggregation: str | None, agreement: float | None) -> str:
    """The cards side by side, with how the answers were combined once that is known."""
    summary = ""
    if aggregation:
        agreement_text = f" · agreement <b>{agreement:.2f}</b>" if agreement is not None else ""
        summary = (
            f'<div class="slb-summary">combined by <b>{html.escape(aggregation)}</b>'
            f"{agreement_text} — the combined answer is in the chat</div>"
        )
    return f'<div class="slb-answers"><div class="slb-grid">{"".join(cards)}</div>{summary}</div>'


CSS = """
.slb-table { width: 100%; border-collapse: collapse; font-size: 0.92em; }
.slb-table th, .slb-table td { border-bottom: 1px solid var(--border-color-primary); padding: 6px 8px;
  text-align: left; vertical-align: top; }
.slb-badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 0.78em; margin-left: 4px; }
.slb-sim { background: #fde68a; color: #713f12; }
.slb-warn { background: #fecaca; color: #7f1d1d; }
.slb-dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; background: #9ca3af; margin-right: 5px; }
.slb-on { background: #22c55e; }
.slb-progress { width: 90px; height: 8px; background: var(--border-color-primary); border-radius: 4px;
  display: inline-block; margin: 0 6px; vertical-align: middle; }
.slb-progress > div { height: 100%; background: #3b82f6; border-radius: 4px; }
.slb-error { color: #b91c1c; font-size: 0.85em; }
.slb-also, .slb-runtime { color: var(--body-text-color-subdued); font-size: 0.8em; }
.slb-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 10px; }
.slb-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px; }
.slb-card-head { display: flex; gap: 6px; align-items: baseline; flex-wrap: wrap; }
.slb-model { color: var(--body-text-color-subdued); font-family: var(--font-mono); font-size: 0.85em; }
.slb-card-state { color: var(--body-text-color-subdued); font-size: 0.82em; margin: 2px 0 6px; }
.slb-card-text { white-space: pre-wrap; max-height: 260px; overflow-y: auto; font-size: 0.92em; }
.slb-summary { margin-top: 8px; }
.slb-empty { color: var(--body-text-color-subdued); padding: 8px; }
.slb-notice { border-left: 4px solid #f59e0b; padding: 4px 10px; }
.slb-nowrap { white-space: nowrap; }
#slb-chatbot .message-markdown-disabled { white-space: normal; }
.slb-link-target { color: var(--body-text-color-subdued); font-size: 0.85em; word-break: break-all; }
"""

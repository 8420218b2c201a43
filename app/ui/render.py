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
from app.store.prompt import relevance_words

CURSOR = " ▌"
SIMULATED_BADGE = "simulated"

Message = dict[str, Any]


def agent_label(agent_id: str, model: str | None, simulated: bool) -> str:
    """``agent-a (llama3.2:1b, simulated)``: every answer names its machine and model."""
    details = [part for part in (model, SIMULATED_BADGE if simulated else None) if part]
    return f"{agent_id} ({', '.join(details)})" if details else agent_id


def answered_by(
    agents: Sequence[str],
    models: Sequence[str],
    mode: str | None,
    stats: dict[str, Any],
    simulated: set[str],
    *,
    failed: bool = False,
) -> str:
    """The provenance line under an answer: "answered by X", or "failed on X" when it failed there."""
    names = []
    for index, agent in enumerate(agents):
        model = models[index] if index < len(models) else (models[0] if len(models) == 1 else None)
        names.append(agent_label(agent, model, agent in simulated))
    if failed:
        parts = [f"failed on {', '.join(names)}" if names else "no agent could answer"]
    else:
        parts = [f"answered by {', '.join(names)}" if names else "no agent answered"]
    if mode:
        parts.append(f"mode {mode}")
    if stats.get("pinned"):
        parts.append("agent named by the caller")
    elif stats.get("affinity"):
        parts.append("same machine as the last turn (its prompt cache)")
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


def tried_agents(agents: Sequence[str], stats: dict[str, Any], tried: Sequence[Any] | None = None) -> list[str]:
    """Every machine an answer was tried on, in order: the stored list, else the answer's agents and switches."""
    names: list[str] = []
    for item in tried or ():
        name = item.get("agent") or item.get("agent_id") if isinstance(item, dict) else item
        if name:
            names.append(str(name))
    if not names:
        names = [str(switch.get("from", "")) for switch in stats.get("switches", []) if isinstance(switch, dict)]
        names += [str(restart.get("from_agent", "")) for restart in stats.get("restarts", [])
                  if isinstance(restart, dict)]
        names += list(agents)
    return [name for name in dict.fromkeys(names) if name]


def failure_html(error: str, tried: Sequence[str]) -> str:
    """What went wrong, where it was tried, and what to do: the block a failed answer shows, live or reopened."""
    where = (f'<p class="slb-tried">tried: {html.escape(", ".join(tried))}</p>' if tried
             else '<p class="slb-tried">no machine took the question</p>')
    return (
        '<div class="slb-failed">'
        f"<p><strong>Failed:</strong> {html.escape(error)}</p>{where}"
        '<p class="slb-retry-hint">Press <b>Retry</b> under the chat to ask again.</p>'
        "</div>"
    )


def citations_html(citations: Iterable[Citation | dict[str, Any]]) -> str:
    """The sources of a RAG answer: document, page or section, how strong a match (in words), the passage as
    plain text."""
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
        words = relevance_words(item.get("match") if isinstance(item.get("match"), str) else None)
        strength = f' <span class="slb-match">· {html.escape(words)}</span>' if words else ""
        blocks.append(f'<div class="slb-citation"><p><strong>[{number}] {name}</strong>{location}{strength}</p>'
                      f"<blockquote>{text_html(str(item.get('snippet', '')))}</blockquote></div>")
    return "\n".join(blocks)


def answers_html(answers: Iterable[dict[str, Any]]) -> str:
    """Every agent's answer of a fan-out as cards side by side, for the block right under a combined answer."""
    cards = []
    for answer in answers:
        error = answer.get("error")
        cards.append(
            agent_card_html(
                str(answer.get("agent_id", "?")),
                answer.get("model"),
                f"failed: {error}" if error else "done",
                dict(answer.get("stats") or {}),
                str(answer.get("text") or ""),
                bool(answer.get("simulated")),
            )
        )
    return f'<div class="slb-answers"><div class="slb-grid">{"".join(cards)}</div></div>'


def attachments_html(attachments: Sequence[Any] | None) -> str:
    """The note a question shows for each image attached to it (the chat keeps the note, not the image)."""
    notes = []
    for item in attachments or ():
        if not isinstance(item, dict):
            continue
        size = item.get("bytes")
        shown = f", {size / 1024:.0f} KB" if isinstance(size, int) and size >= 1024 else \
            (f", {size} bytes" if isinstance(size, int) else "")
        notes.append(f'<p class="slb-attached">🖼 image attached: {html.escape(str(item.get("name", "image")))}'
                     f"{html.escape(shown)}</p>")
    return "".join(notes)


def user_message(text: str, attachments: Sequence[Any] | None = None) -> Message:
    """The user's question as the chat shows it (Markdown, with the same allow-list as answers), with a note of
    each image attached to it."""
    return {"role": "user", "content": markdown_html(text) + attachments_html(attachments)}


def error_message(error: str) -> Message:
    """An answer that could not even start (the question was refused): the error and the way to retry."""
    return {"role": "assistant", "content": failure_html(error, [])}


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
    live_html: str = "",
    outcome: str | None = None,
    error: str | None = None,
    tried: Sequence[Any] | None = None,
) -> list[Message]:
    """Chatbot messages for one answer: the text with its provenance, the sources, the per-agent answers.

    ``outcome`` is the stored status ("ok", "error", "stopped"); without it the stats say (a live answer).
    ``live_html`` (the fan-out cards while they stream) goes inside the answer's own bubble, so every agent's
    answer is right where the answer will be, on a phone too.
    """
    parts: list[str] = []
    body = text + (CURSOR if streaming else "")
    error = error or stats.get("error")
    stopped = outcome == "stopped" or (outcome is None and stats.get("error_code") == "cancelled")
    failed = not streaming and not stopped and (outcome == "error" or (outcome is None and bool(error)))
    tried_on = tried_agents(agents, stats, tried) if failed else []
    if status:
        parts.append(f"<p><em>{html.escape(status)}</em></p>")
    elif stats.get("restarts"):
        parts += [f"<p><em>{html.escape(str(restart.get('note', '')))}</em></p>" for restart in stats["restarts"]]
    if live_html:
        parts.append(live_html)
    if body.strip():
        parts.append(markdown_html(body))
    if failed:
        parts.append(failure_html(str(error or "the answer failed"), tried_on))
    elif stopped:
        parts.append("<p><em>(stopped)</em></p>")
    # A failure names the machines tried, without models: which model ran where is not known for each try.
    footer = "" if streaming else answered_by(tried_on if failed else agents, [] if failed else models, mode, stats,
                                               simulated, failed=failed)
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
    """A stored session as chatbot messages; a failed answer shows its error and where it was tried."""
    messages: list[Message] = []
    for stored in history:
        if stored.role == "user":
            messages.append(user_message(stored.content, stored.stats.get("attachments")))
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
                    outcome=getattr(stored, "status", None),
                    error=getattr(stored, "error", None),
                    tried=getattr(stored, "tried", None),
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


def notice_html(line: str, detail: str, healthy: bool) -> str:
    """The chat's notice: one quiet line (a dot and a count), the full advice folded under it, never a wall."""
    state = "slb-on" if healthy else "slb-notice-dot-bad"
    more = f"<p>{html.escape(detail)}</p>" if detail else ""
    return (
        f'<details class="slb-notice-line"><summary><span class="slb-dot {state}"></span>'
        f"{html.escape(line)}</summary>{more}</details>"
    )


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
.slb-nowrap { white-space: nowrap; }
#slb-chatbot .message-markdown-disabled { white-space: normal; }
.slb-link-target { color: var(--body-text-color-subdued); font-size: 0.85em; word-break: break-all; }
.slb-notice-line { font-size: 0.85em; color: var(--body-text-color-subdued); margin: 0; }
.slb-notice-line > summary { cursor: pointer; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  list-style: none; }
.slb-notice-line > summary::-webkit-details-marker { display: none; }
.slb-notice-line > p { margin: 4px 0 0; white-space: normal; }
.slb-notice-dot-bad { background: #f59e0b; }
.slb-attached { color: var(--body-text-color-subdued); font-size: 0.85em; margin: 4px 0 0; }
.slb-attachment { font-size: 0.85em; align-self: center; }
.slb-failed { border-left: 3px solid #dc2626; padding: 2px 0 2px 10px; margin: 6px 0; }
.slb-failed p { margin: 2px 0; }
.slb-tried, .slb-retry-hint { color: var(--body-text-color-subdued); font-size: 0.88em; }
#slb-chatbot .slb-grid { grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); }
#slb-chat-actions { gap: 6px; }
#slb-chat-actions button { flex: 0 0 auto; min-width: 0; }
.slb-header { display: flex; align-items: center; justify-content: space-between; gap: 12px; }
.slb-header h2 { margin: 0 0 2px; }
.slb-tagline { color: var(--body-text-color-subdued); }
.slb-theme-button { border: 1px solid var(--border-color-primary); border-radius: 16px; padding: 4px 12px;
  background: var(--background-fill-secondary); color: var(--body-text-color); cursor: pointer; font-size: 0.9em;
  white-space: nowrap; }
@media (max-width: 640px) {
  .slb-header h2 { font-size: 1.15em; }
  .slb-header .slb-tagline { display: none; }
  #slb-chat-row { gap: 8px; }
  #slb-chat-side { flex-direction: row !important; flex-wrap: wrap; align-items: flex-start; gap: 8px; }
  #slb-chat-side > #slb-new-chat { flex: 0 0 auto; width: auto; }
  #slb-chat-side > #slb-chats { flex: 1 1 160px; }
  #slb-chatbot { height: 46vh !important; min-height: 220px; }
  #slb-compose { flex-wrap: nowrap !important; gap: 6px; }
  #slb-compose > .form, #slb-compose > div:first-child { flex: 1 1 auto !important; min-width: 0 !important; }
  #slb-compose > button { min-width: 0 !important; flex: 0 0 auto !important; padding: 6px 10px;
    font-size: 0.9em; }
  #slb-chatbot .slb-card-text { max-height: 140px; }
  .slb-grid { grid-template-columns: 1fr; }
}
"""

"""Pure rendering for the UI: chat messages, the cluster table, plans, plot data, documents.

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
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from app.markup import markdown_html, markdown_literal, text_html
from app.model_list import shown_model_name, valid_model_name
from app.sampler import ClusterSample
from app.store import ChatMessage as StoredMessage
from app.store import Citation, Document, SearchHit
from broker.coordinator.contract import AgentView, ClusterSnapshot, PlanView
from broker.protocol.redaction import redact_urls_in

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


# ---------------------------------------------------------------------------- cluster view


def _progress_bar(progress: float | None) -> str:
    if progress is None:
        return ""
    percent = max(0.0, min(1.0, progress)) * 100
    return (
        f'<div class="slb-progress" title="{percent:.0f}%"><div style="width:{percent:.0f}%"></div></div>'
        f"<small>{percent:.0f}%</small>"
    )


def _number(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def agents_table_html(snapshot: ClusterSnapshot) -> str:
    """The live agents table: name, online, simulated marker, score, hardware, model and state, jobs, tokens/s."""
    if not snapshot.agents:
        return '<div class="slb-empty">No agent has joined yet.</div>'
    rows = []
    for agent in sorted(snapshot.agents, key=lambda a: (not a.online, -(a.score or 0), a.id)):
        online = (
            '<span class="slb-dot slb-on"></span>online' if agent.online else '<span class="slb-dot"></span>offline'
        )
        sim = '<span class="slb-badge slb-sim">simulated</span>' if agent.simulated else ""
        cooling = ' <span class="slb-badge slb-warn">cooling down</span>' if agent.cooling_down else ""
        state = html.escape(agent.model_state or "–")
        if agent.model_state == "pulling":
            state += _progress_bar(agent.model_progress)
        if agent.model_error:
            state += f'<div class="slb-error">{html.escape(redact_urls_in(agent.model_error))}</div>'
        backend = runtime_cell(agent)
        if agent.backend_reachable is False:
            why = html.escape(redact_urls_in(agent.backend_error or ""))
            backend += f' <span class="slb-badge slb-warn" title="{why}">unreachable</span>'
        slots_count = agent.slots or agent.max_parallel
        slots = f"/{slots_count}" if slots_count else ""
        others = sorted(name for name in agent.available_models if name != agent.model and valid_model_name(name))
        model_cell = html.escape(shown_model_name(agent.model))
        if others:
            shown = ", ".join(others[:4]) + (f" +{len(others) - 4}" if len(others) > 4 else "")
            model_cell += f'<div class="slb-also">also: {html.escape(shown)}</div>'
        rows.append(
            "<tr>"
            f"<td><b>{html.escape(agent.id)}</b> {sim}{cooling}</td>"
            f"<td>{online}</td>"
            f"<td>{_number(agent.score, 0)}</td>"
            f"<td>{html.escape(agent.hardware_summary or '–')}</td>"
            f"<td>{model_cell}</td>"
            f"<td>{state}</td>"
            f"<td>{agent.jobs_running}{slots} · {agent.jobs_queued}</td>"
            f"<td>{_number(agent.tokens_per_s, 1)}</td>"
            f"<td>{backend}</td>"
            "</tr>"
        )
    head = (
        "<tr><th>Agent</th><th>Status</th><th>Score</th><th>Hardware</th><th>Model</th><th>Model state</th>"
        "<th>Jobs running / slots · queued</th><th>tok/s</th><th>Runtime</th></tr>"
    )
    return f'<table class="slb-table" id="slb-agents">{head}{"".join(rows)}</table>'


def runtime_cell(agent: AgentView) -> str:
    """The runtime column: kind and version, slots (and how they were learned), whether a failover continues
    the partial answer there; how it was detected and health-checked in the tooltip. Escaped: agents say it."""
    profile = agent.runtime or {}
    kind = str(profile.get("kind") or agent.backend or "")
    if not kind:
        return "–"
    version = str(profile.get("version") or "")
    head = kind + (f" {version}" if version and version != kind else "")
    details = []
    if profile:
        slots = profile.get("slots") or agent.slots
        if slots:
            source = profile.get("slots_source")
            details.append(f"{slots} slot{'s' if slots != 1 else ''}" + (f" ({source})" if source else ""))
        prefill = profile.get("continues_prefill")
        details.append({True: "failover continues", False: "failover restarts", None: "prefill not probed"}.get(
            prefill, "prefill not probed"))
        if profile.get("interrupts_running"):
            details.append("a new request interrupts")
    title = redact_urls_in(" · ".join(str(profile[key]) for key in ("detected_by", "health_check")
                                      if profile.get(key)))
    text = f"<b>{html.escape(head)}</b>"
    if details:
        text += f'<div class="slb-runtime">{html.escape(" · ".join(details))}</div>'
    return f'<span title="{html.escape(title)}">{text}</span>' if title else text


def placement_markdown(snapshot: ClusterSnapshot) -> str:
    lines = []
    for agent in sorted(snapshot.agents, key=lambda a: a.id):
        reason = agent.placement_reason or "no placement decision yet"
        marker = " *(simulated)*" if agent.simulated else ""
        model = f"<code>{markdown_literal(shown_model_name(agent.model))}</code>" if agent.model else "–"
        lines.append(f"- **{markdown_literal(agent.id)}**{marker} → {model}: {markdown_literal(reason)}")
    return "\n".join(lines) or "*No agents.*"


def plan_html(plan: PlanView, simulated: set[str]) -> str:
    """A placement plan as a table (what-if preview or the plan just applied)."""
    title = "Applied plan" if plan.applied else "What-if: the plan placement would make now (nothing changed)"
    when = datetime.fromtimestamp(plan.created_at).strftime("%H:%M:%S")
    rows = []
    for entry in plan.entries:
        badge = ' <span class="slb-badge slb-sim">simulated</span>' if entry.agent_id in simulated else ""
        moves = "<b>yes</b>" if entry.change else "no"
        if getattr(entry, "deferred", False):
            moves = "later (keeps the cluster answering)"
        rows.append(
            f"<tr><td><b>{html.escape(entry.agent_id)}</b>{badge}</td>"
            f"<td class=\"slb-nowrap\">{html.escape(shown_model_name(entry.current_model))}</td>"
            f"<td class=\"slb-nowrap\">{html.escape(shown_model_name(entry.target_model))}</td>"
            f"<td>{moves}</td><td>{html.escape(entry.reason)}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="5">no agents to place</td></tr>')
    excluded = "".join(
        f"<li><b>{html.escape(agent)}</b>: {html.escape(reason)}</li>"
        for agent, reason in sorted(plan.excluded.items())
    )
    return (
        f'<div class="slb-plan"><p><b>{title}</b> ({when})</p>'
        '<table class="slb-table"><tr><th>Agent</th><th>Now</th><th>Planned</th><th>Moves</th><th>Why</th></tr>'
        + "".join(rows)
        + "</table>"
        + (f"<p><b>Left out:</b></p><ul>{excluded}</ul>" if excluded else "")
        + "</div>"
    )


def scores_frame(snapshot: ClusterSnapshot) -> pd.DataFrame:
    rows = [
        {"agent": agent.id, "score": float(agent.score or 0.0), "kind": _kind(agent)}
        for agent in snapshot.agents
    ]
    return pd.DataFrame(rows, columns=["agent", "score", "kind"])


def _kind(agent: AgentView) -> str:
    return SIMULATED_BADGE if agent.simulated else "real"


def _plot_name(agent: AgentView | ClusterSample) -> str:
    name = agent.id if isinstance(agent, AgentView) else agent.agent_id
    return f"{name} [sim]" if agent.simulated else name


def history_frames(samples: Sequence[ClusterSample], now: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tokens/s and load (jobs running + queued) over time, one line per agent."""
    now = now or time.time()
    speed_rows = []
    load_rows = []
    for sample in samples:
        at = pd.Timestamp(datetime.fromtimestamp(sample.at))
        name = _plot_name(sample)
        speed_rows.append({"time": at, "agent": name, "tokens_per_s": float(sample.tokens_per_s or 0.0)})
        load_rows.append(
            {"time": at, "agent": name, "jobs": float(sample.jobs_running + sample.jobs_queued),
             "cpu_percent": float(sample.cpu_percent or 0.0)}
        )
    speed = pd.DataFrame(speed_rows, columns=["time", "agent", "tokens_per_s"])
    load = pd.DataFrame(load_rows, columns=["time", "agent", "jobs", "cpu_percent"])
    if speed.empty:
        stamp = pd.Timestamp(datetime.fromtimestamp(now))
        speed = pd.DataFrame([{"time": stamp, "agent": "–", "tokens_per_s": 0.0}])
        load = pd.DataFrame([{"time": stamp, "agent": "–", "jobs": 0.0, "cpu_percent": 0.0}])
    return speed, load


# ---------------------------------------------------------------------------- documents and sessions


def documents_frame(documents: Sequence[Document]) -> pd.DataFrame:
    rows = [
        {
            "Name": document.name,
            "Format": document.format,
            "Size": _size(document.size_bytes),
            "Chunks": document.chunk_count,
            "Added": document.added_at.astimezone().strftime("%Y-%m-%d %H:%M"),
            "Id": document.id[:8],
        }
        for document in documents
    ]
    return pd.DataFrame(rows, columns=["Name", "Format", "Size", "Chunks", "Added", "Id"])


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def search_markdown(query: str, hits: Sequence[SearchHit]) -> str:
    """Search results for a ``gr.Markdown``: the documents' text is literal (a passage may hold markup)."""
    if not hits:
        return f"No passage matches *{markdown_literal(query)}*."
    blocks = []
    for rank, hit in enumerate(hits, start=1):
        location = f" — {markdown_literal(hit.location)}" if hit.location else ""
        text = " ".join(hit.text.split())
        if len(text) > 600:
            text = text[:600] + "…"
        blocks.append(f"**{rank}. {markdown_literal(hit.document_name)}**{location} · score {hit.score:.3f}\n\n"
                      f"> {markdown_literal(text)}")
    return "\n\n".join(blocks)


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

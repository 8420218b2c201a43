"""Pure rendering for the Cluster tab: the agents table, placement, plans and plot data.

Functions of their arguments only, kept apart from the Gradio wiring (app/ui/cluster.py) so they are
unit-testable. Outside text is escaped (``html.escape`` in HTML, :func:`app.markup.markdown_literal` in Markdown).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from datetime import datetime

import pandas as pd

from app.markup import markdown_literal
from app.model_list import shown_model_name, valid_model_name
from app.sampler import ClusterSample
from app.ui.render import SIMULATED_BADGE
from broker.coordinator.contract import AgentView, ClusterSnapshot, PlanView
from broker.protocol.redaction import redact_urls_in

CSS = ""
"""Styles of the Cluster tab (added to the page's CSS by app/ui/__init__.py)."""


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

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

from app.cluster_status import CONDITION_ORDER, agent_condition
from app.markup import markdown_literal
from app.model_list import shown_model_name, valid_model_name
from app.sampler import ClusterSample
from broker.coordinator.contract import AgentView, ClusterSnapshot, PlanView
from broker.protocol.redaction import redact_urls_in
from broker.scheduling.scoring import DEFAULT_SCORERS

CSS = """
#slb-cluster-agents { overflow-x: auto; }
.slb-agents td.slb-name { white-space: nowrap; }
.slb-agents td[data-label="Status"] { min-width: 8.5em; }
.slb-agents td[data-label="Jobs"], .slb-agents td[data-label="Live load"] { min-width: 7.5em; }
.slb-agents tr.slb-is-offline td { color: var(--body-text-color-subdued); }
.slb-agents tr.slb-is-offline td > * { opacity: 0.7; }
.slb-dot.slb-is-ready { background: #22c55e; }
.slb-dot.slb-is-starting { background: #f59e0b; }
.slb-dot.slb-is-failed, .slb-dot.slb-is-unreachable, .slb-dot.slb-is-quarantined { background: #ef4444; }
.slb-dot.slb-is-offline { background: #9ca3af; }
.slb-breakdown, .slb-since, .slb-load { color: var(--body-text-color-subdued); font-size: 0.8em; }
.slb-legend { display: flex; flex-wrap: wrap; gap: 2px 14px; font-size: 0.85em; padding: 0 8px; }
.slb-legend span { white-space: nowrap; }
.slb-swatch { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 5px; }
#slb-plot-speed, #slb-plot-load, #slb-plot-scores { min-width: 0; }
@media (max-width: 720px) {
  .slb-agents thead { display: none; }
  table.slb-agents { border: none; padding: 0; }
  #slb-cluster-agents .html-container { padding-left: 0; padding-right: 0; }
  .slb-agents, .slb-agents tbody, .slb-agents tr { display: block; width: 100%; }
  .slb-agents tr { border: 1px solid var(--border-color-primary); border-radius: 8px; margin: 0 0 10px;
    padding: 4px 2px; }
  .slb-agents td { display: grid; grid-template-columns: 6.5em minmax(0, 1fr); gap: 6px; border: none;
    padding: 3px 8px; overflow-wrap: anywhere; }
  .slb-agents td::before { content: attr(data-label); font-weight: 600; color: var(--body-text-color-subdued); }
  .slb-agents td.slb-name { white-space: normal; font-size: 1.05em; }
}
"""
"""Styles of the Cluster tab (added to the page's CSS by app/ui/__init__.py): on a narrow screen every agent is
a card with one labelled line per column, so no column is cut off."""

CONDITION_TEXT = {
    "ready": "ready",
    "starting": "starting",
    "failed": "model failed",
    "unreachable": "runtime unreachable",
    "quarantined": "in quarantine",
    "offline": "offline",
}
"""How the status column names each :func:`app.cluster_status.agent_condition`."""
SCORE_PARTS_MAX = {scorer.name: scorer.max_points for scorer in DEFAULT_SCORERS}
"""Each score part's maximum (cpu 20, ram 25, gpu 25, speed 30: they add up to 100)."""
COLUMNS = ("Agent", "Status", "Score", "Model", "Jobs", "tok/s", "Live load", "Hardware", "Runtime")


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


def score_text(score: float | None) -> str:
    """A score as the table, the plot and the placement reasons all round it: one decimal."""
    return _number(score, 1)


def breakdown_text(agent: AgentView) -> str:
    """``cpu 17.5/20 · ram 24/25 · gpu 8/25 · speed 23.3/30``: the parts the score adds up from."""
    if not agent.score_breakdown:
        return "hardware unknown: the default 50" if agent.score is not None else ""
    return " · ".join(
        f"{name} {points:g}/{SCORE_PARTS_MAX[name]:g}" if name in SCORE_PARTS_MAX else f"{name} {points:g}"
        for name, points in agent.score_breakdown.items()
    )


def ago_text(seconds: float) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def offline_since_text(agent: AgentView, generated_at: float) -> str:
    """``offline since 14:03:12 (3 min ago)``: when the agent was last heard of (its offline message or its last
    telemetry before it expired)."""
    if agent.last_seen_s is None:
        return "offline"
    since = generated_at - agent.last_seen_s
    return f"offline since {datetime.fromtimestamp(since).strftime('%H:%M:%S')} ({ago_text(agent.last_seen_s)})"


def status_cell(agent: AgentView, generated_at: float) -> str:
    """Coloured dot and the agent's condition (green only when ready), with what it is doing or what went wrong."""
    condition = agent_condition(agent)
    dot = f'<span class="slb-dot slb-is-{condition}"></span>'
    if condition == "offline":
        return f'{dot}<span class="slb-since">{html.escape(offline_since_text(agent, generated_at))}</span>'
    text = CONDITION_TEXT[condition]
    if condition == "starting":
        text = agent.model_state or "waiting for a model"
        if agent.model_state == "absent":
            text = "waiting for its model"
    cell = dot + html.escape(text)
    if agent.model_state == "pulling":
        cell += _progress_bar(agent.model_progress)
    if condition == "unreachable" and agent.backend_error:
        cell += f'<div class="slb-error">{html.escape(redact_urls_in(agent.backend_error))}</div>'
    if condition == "quarantined" and agent.quarantine_reason:
        cell += f'<div class="slb-error">{html.escape(agent.quarantine_reason)}</div>'
    if agent.model_error:
        cell += f'<div class="slb-error">{html.escape(redact_urls_in(agent.model_error))}</div>'
    return cell


def live_load_text(agent: AgentView) -> str:
    """``CPU 31% · 22.5 GB RAM free · 9.8 GB VRAM free`` (what the agent's last telemetry said; – when offline)."""
    parts = []
    if agent.cpu_percent is not None:
        parts.append(f"CPU {agent.cpu_percent:.0f}%")
    if agent.ram_free_gb is not None:
        parts.append(f"{agent.ram_free_gb:.1f} GB RAM free")
    if agent.vram_free_gb is not None:
        parts.append(f"{agent.vram_free_gb:.1f} GB VRAM free")
    return " · ".join(parts) or "–"


def jobs_text(agent: AgentView) -> str:
    """``1 of 4 running · 2 queued``; an offline agent runs nothing (``–``)."""
    if not agent.online:
        return "–"
    slots_count = agent.slots or agent.max_parallel
    running = f"{agent.jobs_running} of {slots_count} running" if slots_count else f"{agent.jobs_running} running"
    return f"{running} · {agent.jobs_queued} queued"


def _cell(label: str, content: str, css_class: str = "") -> str:
    class_attribute = f' class="{css_class}"' if css_class else ""
    return f'<td data-label="{html.escape(label)}"{class_attribute}><div>{content}</div></td>'


def agents_table_html(snapshot: ClusterSnapshot) -> str:
    """The live agents table: name, condition, score and its parts, model, jobs, tokens/s, live load, hardware,
    runtime. Ready agents first; offline ones last and greyed, with since when."""
    if not snapshot.agents:
        return '<div class="slb-empty">No agent has joined yet.</div>'
    rows = []
    order = {condition: index for index, condition in enumerate(CONDITION_ORDER)}
    for agent in sorted(snapshot.agents, key=lambda a: (order[agent_condition(a)], -(a.score or 0), a.id)):
        condition = agent_condition(agent)
        sim = '<span class="slb-badge slb-sim">simulated</span>' if agent.simulated else ""
        cooling = ' <span class="slb-badge slb-warn">cooling down</span>' if agent.cooling_down else ""
        backend = runtime_cell(agent)
        if agent.backend_reachable is False and agent.online:
            why = html.escape(redact_urls_in(agent.backend_error or ""))
            backend += f' <span class="slb-badge slb-warn" title="{why}">unreachable</span>'
        others = sorted(name for name in agent.available_models if name != agent.model and valid_model_name(name))
        model_cell = html.escape(shown_model_name(agent.model))
        if others and agent.online:
            shown = ", ".join(others[:4]) + (f" +{len(others) - 4}" if len(others) > 4 else "")
            model_cell += f'<div class="slb-also">also: {html.escape(shown)}</div>'
        score = score_text(agent.score)
        breakdown = breakdown_text(agent)
        if breakdown:
            score += f'<div class="slb-breakdown">{html.escape(breakdown)}</div>'
        speed = _number(agent.tokens_per_s, 1)
        if agent.tokens_per_s is not None and agent.speed_source:
            speed += f'<div class="slb-breakdown">{html.escape(agent.speed_source)}, per answer</div>'
        cells = (
            _cell("Agent", f"<b>{html.escape(agent.id)}</b> {sim}{cooling}", "slb-name"),
            _cell("Status", status_cell(agent, snapshot.generated_at)),
            _cell("Score", score),
            _cell("Model", model_cell),
            _cell("Jobs", jobs_text(agent)),
            _cell("tok/s", speed),
            _cell("Live load", f'<span class="slb-load">{html.escape(live_load_text(agent))}</span>'),
            _cell("Hardware", html.escape(agent.hardware_summary or "–")),
            _cell("Runtime", backend),
        )
        rows.append(f'<tr class="slb-is-{condition}">{"".join(cells)}</tr>')
    head = "<thead><tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in COLUMNS) + "</tr></thead>"
    return f'<table class="slb-table slb-agents" id="slb-agents">{head}<tbody>{"".join(rows)}</tbody></table>'


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
    """The score of each agent as a stacked bar of its parts (cpu, ram, gpu, speed), so the bar shows the
    breakdown; an agent without one (hardware unknown) is one ``default`` part."""
    rows = []
    for agent in snapshot.agents:
        parts = agent.score_breakdown or {"default": float(agent.score or 0.0)}
        rows.extend({"agent": agent.id, "part": name, "points": float(points)} for name, points in parts.items())
    return pd.DataFrame(rows, columns=["agent", "part", "points"])


PLOT_COLORS = ("#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777",
               "#4b5563", "#65a30d")
"""Line colours of the agents in the plots, in the order of their names (repeating past ten agents)."""


def agent_colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per agent name, the same in both line plots and in the legend under them."""
    return {name: PLOT_COLORS[index % len(PLOT_COLORS)] for index, name in enumerate(sorted(set(names)))}


def legend_html(colors: dict[str, str]) -> str:
    """The line plots' legend as wrapping HTML (the plots' own legend is one row that a phone cuts off)."""
    if not colors:
        return ""
    items = "".join(f'<span><span class="slb-swatch" style="background:{color}"></span>{html.escape(name)}</span>'
                    for name, color in colors.items())
    return f'<div class="slb-legend" id="slb-plot-legend">{items}</div>'


def history_frames(samples: Sequence[ClusterSample], now: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tokens/s generated and load (jobs running + queued) over time, one line per agent; the sampler takes only
    online agents, so a line ends when its agent goes offline."""
    now = now or time.time()
    speed_rows = []
    load_rows = []
    for sample in samples:
        at = pd.Timestamp(datetime.fromtimestamp(sample.at))
        speed_rows.append({"time": at, "agent": sample.agent_id, "tokens_per_s": float(sample.tokens_per_s or 0.0)})
        load_rows.append(
            {"time": at, "agent": sample.agent_id, "jobs": float(sample.jobs_running + sample.jobs_queued),
             "cpu_percent": float(sample.cpu_percent or 0.0)}
        )
    speed = pd.DataFrame(speed_rows, columns=["time", "agent", "tokens_per_s"])
    load = pd.DataFrame(load_rows, columns=["time", "agent", "jobs", "cpu_percent"])
    if speed.empty:
        stamp = pd.Timestamp(datetime.fromtimestamp(now))
        speed = pd.DataFrame([{"time": stamp, "agent": "–", "tokens_per_s": 0.0}])
        load = pd.DataFrame([{"time": stamp, "agent": "–", "jobs": 0.0, "cpu_percent": 0.0}])
    return speed, load

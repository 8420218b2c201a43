"""The Cluster tab: live agents table, plots over time, placement reasons, reassign and what-if.

A ``gr.Timer`` refreshes it while the tab is open (it is switched off on the
other tabs, so idle browsers cost nothing). The plots read the history the
service samples in the background, so they have a past as soon as the page
opens.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import gradio as gr

from app import cluster_status
from app.answers import simulated_agents
from app.markup import markdown_literal
from app.service import AppService
from app.ui.cluster_render import (
    agent_colors,
    agents_table_html,
    history_frames,
    legend_html,
    placement_markdown,
    plan_html,
    scores_frame,
)

logger = logging.getLogger(__name__)

SCORE_PART_COLORS = {"cpu": "#3b82f6", "ram": "#10b981", "gpu": "#8b5cf6", "speed": "#f59e0b", "default": "#9ca3af"}
"""One colour per score part in the stacked scores plot (``default``: hardware unknown)."""


def build_cluster_tab(service: AppService) -> dict[str, Any]:
    settings = service.settings
    summary = gr.Markdown(elem_id="slb-cluster-summary")
    agents = gr.HTML(elem_id="slb-cluster-agents")
    with gr.Row(equal_height=False):
        # The plots' own legend is one row a phone cuts off: it is hidden and drawn as wrapping HTML below.
        speed_plot = gr.LinePlot(
            x="time", y="tokens_per_s", color="agent", title="Tokens/s generated (0 when idle)",
            height=260, x_title=" ", y_title="tok/s", colors_in_legend=[], elem_id="slb-plot-speed",
            x_label_angle=-40,  # angled times end at their tick: none overlaps or runs past a phone's edge
            x_axis_format="%H:%M:%S", y_axis_format=".1~f", y_lim=[0, 10], min_width=300,
        )
        load_plot = gr.LinePlot(
            x="time", y="jobs", color="agent", title="Jobs running + queued", height=260,
            x_title=" ", y_title="jobs", colors_in_legend=[], elem_id="slb-plot-load", x_label_angle=-40,
            x_axis_format="%H:%M:%S", y_axis_format=".1~f", y_lim=[0, 2], min_width=300,
        )
    legend = gr.HTML(elem_id="slb-plot-legend-holder")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            scores_plot = gr.BarPlot(
                x="agent", y="points", color="part", title="Scores (0–100) and their parts", height=300,
                y_lim=[0, 100], x_title=" ", y_title="points", color_title="", x_label_angle=-30,
                color_map=SCORE_PART_COLORS, elem_id="slb-plot-scores",
            )
        with gr.Column(scale=3, min_width=300):
            gr.Markdown("### Why each machine serves its model")
            reasons = gr.Markdown(elem_id="slb-placement")
    with gr.Row():
        preview_button = gr.Button("Preview next plan (what-if)", elem_id="slb-preview")
        reassign_button = gr.Button("Reassign now", variant="primary", elem_id="slb-reassign")
    plan_view = gr.HTML(elem_id="slb-plan")
    timer = gr.Timer(settings.cluster_refresh_s, active=False)

    def refresh():
        snapshot = service.coordinator.snapshot()
        speed, load = history_frames(service.sampler.history())
        simulated = sum(1 for agent in snapshot.agents if agent.simulated)
        head = (
            f"**{cluster_status.counts_line(snapshot)}**"
            + (f" ({simulated} simulated)" if simulated else "")
            + f" · broker {'connected' if snapshot.connected else '**not connected**'}"
            + f" · models: {cluster_status.models_summary(snapshot, markdown_literal) or 'none'}"
            + (f" · {line}" if (line := cluster_status.leadership_line(snapshot, markdown_literal)) else "")
        )
        if not cluster_status.is_healthy(snapshot):
            head += "\n\n" + cluster_status.notice_markdown(snapshot, settings.broker)
        # The y axis starts at 0 and never collapses (an idle cluster is a flat line, not an axis of 0.000000).
        colors = agent_colors([agent.id for agent in snapshot.agents])
        colors.update({name: "#9ca3af" for name in set(speed["agent"]) - set(colors)})  # gone since, or none
        speed_plot_value = gr.LinePlot(value=speed, color_map=colors,
                                       y_lim=[0, max(10.0, float(speed["tokens_per_s"].max()) * 1.1)])
        load_plot_value = gr.LinePlot(value=load, color_map=colors,
                                      y_lim=[0, max(2.0, float(load["jobs"].max()) + 1)])
        drawn = set(speed["agent"])
        return (
            head,
            agents_table_html(snapshot),
            speed_plot_value,
            load_plot_value,
            legend_html({name: color for name, color in colors.items() if name in drawn}),
            scores_frame(snapshot),
            placement_markdown(snapshot),
        )

    def simulated_ids() -> set[str]:
        return simulated_agents(service.coordinator.snapshot())

    def preview():
        try:
            return plan_html(service.coordinator.plan(), simulated_ids())
        except Exception as error:  # noqa: BLE001 - a placement bug is shown in the tab (and logged), not a broken tab
            logger.warning("what-if plan failed", exc_info=True)
            return f"could not compute the plan: {html.escape(str(error))}"

    async def reassign():
        try:
            plan = await service.coordinator.reassign()
        except Exception as error:  # noqa: BLE001 - as in preview(): shown in the tab and logged
            logger.warning("reassign failed", exc_info=True)
            return f"reassign failed: {html.escape(str(error))}"
        changes = sum(1 for entry in plan.entries if entry.change)
        gr.Info(f"Re-planned: {changes} change(s).")
        return plan_html(plan, simulated_ids())

    outputs = [summary, agents, speed_plot, load_plot, legend, scores_plot, reasons]
    timer.tick(refresh, None, outputs, api_visibility="private", concurrency_id="refresh", concurrency_limit=None,
               show_progress="hidden")
    preview_button.click(preview, None, plan_view, api_name="ui_plan", api_visibility="undocumented",
                         concurrency_limit=None)
    reassign_button.click(reassign, None, plan_view, api_name="ui_reassign", api_visibility="undocumented",
                          concurrency_limit=1, concurrency_id="reassign")
    return {"timer": timer, "refresh": refresh, "outputs": outputs}

"""The Gradio UI: Chat, Documents and Cluster tabs, plus the API for scripts."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from app.service import AppService
from app.ui import cluster_render, documents_render, render
from app.ui.chat import build_chat_tab, mode_choices, notice_markdown
from app.ui.cluster import build_cluster_tab
from app.ui.documents import build_documents_tab
from app.ui.scripting import build_script_api

logger = logging.getLogger(__name__)

TITLE = "Smart AI Load Balancer"
CHAT_STATUS_REFRESH_S = 5.0

CSS = render.CSS + cluster_render.CSS + documents_render.CSS
"""The page's styles: the shared and chat ones, then each tab's own."""

__all__ = ["CSS", "TITLE", "build_ui"]


def build_ui(service: AppService, *, metrics: Any = None) -> gr.Blocks:
    """The whole page; queue limits are set here, on purpose (see docs/web.md)."""
    settings = service.settings
    # delete_cache: uploaded files are copies of the user's documents; Gradio's cache keeps them at most an hour.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"## {TITLE}\nOne private assistant on all your machines.", elem_id="slb-header")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="slb-tab-chat") as chat_tab:
                chat = build_chat_tab(service, metrics=metrics)
            with gr.Tab("Documents", id="documents", elem_id="slb-tab-documents") as documents_tab:
                documents = build_documents_tab(service)
            with gr.Tab("Cluster", id="cluster", elem_id="slb-tab-cluster") as cluster_tab:
                cluster = build_cluster_tab(service)
        build_script_api(service)

        status_timer = gr.Timer(CHAT_STATUS_REFRESH_S)
        known_choices: dict[str, list[tuple[str, str]]] = {}

        def chat_status(request: gr.Request):
            """Keep the chat's notice and the mode list current (only sends the mode list when it changed)."""
            choices = mode_choices(service.models())
            key = request.session_hash if request is not None else ""
            if known_choices.get(key or "") == choices:
                return notice_markdown(service), gr.skip()
            known_choices[key or ""] = choices
            if len(known_choices) > 10_000:
                known_choices.clear()
            return notice_markdown(service), gr.update(choices=choices)

        status_timer.tick(
            chat_status, None, [chat["notice"], chat["mode"]], api_visibility="private", concurrency_id="refresh",
            concurrency_limit=None, show_progress="hidden",
        )

        async def on_load(request: gr.Request):
            choices = mode_choices(service.models())
            if request is not None:
                known_choices[request.session_hash or ""] = choices
            return (
                notice_markdown(service),
                gr.update(choices=choices),
                gr.update(choices=await chat["session_choices"](), value=None),
            )

        demo.load(
            on_load, None, [chat["notice"], chat["mode"], chat["sessions"]],
            api_visibility="private", concurrency_limit=None, show_progress="hidden",
        )
        # The document list waits for the document store, which may still be opening: its own event.
        demo.load(
            documents["library"], None, [documents["table"], documents["to_delete"]],
            api_visibility="private", concurrency_limit=None, show_progress="hidden",
        )

        timer = cluster["timer"]
        cluster_tab.select(
            lambda: gr.Timer(active=True), None, timer, api_visibility="private", queue=False, show_progress="hidden"
        )
        cluster_tab.select(
            cluster["refresh"], None, cluster["outputs"], api_visibility="private", concurrency_id="refresh",
            concurrency_limit=None, show_progress="hidden",
        )
        for other in (chat_tab, documents_tab):
            other.select(
                lambda: gr.Timer(active=False), None, timer, api_visibility="private", queue=False,
                show_progress="hidden",
            )
        documents_tab.select(
            documents["library"], None, [documents["table"], documents["to_delete"]], api_visibility="private",
            concurrency_limit=None, show_progress="hidden",
        )
    demo.queue(default_concurrency_limit=settings.chat_concurrency, max_size=settings.chat_concurrency * 16)
    return demo

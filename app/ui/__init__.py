"""The Gradio UI: Chat, Documents and Cluster tabs, plus the API for scripts."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import gradio as gr

from app.service import AppService
from app.ui import cluster_render, documents_render, render
from app.ui.chat import build_chat_tab, notice_markup
from app.ui.chat_parts import machine_choices, mode_choices
from app.ui.cluster import build_cluster_tab
from app.ui.documents import build_documents_tab
from app.ui.scripting import build_script_api
from app.ui.users import user_of

logger = logging.getLogger(__name__)

TITLE = "Smart AI Load Balancer"
CHAT_STATUS_REFRESH_S = 5.0

THEME_SWITCH_JS = """
const KEY = 'slb-theme';
const button = element.querySelector('button');
const isDark = () => document.body.classList.contains('dark');
const label = () => {
  button.textContent = isDark() ? '\u2600 Light' : '\u263E Dark';
  button.setAttribute('aria-label', isDark() ? 'Switch to light mode' : 'Switch to dark mode');
};
const apply = (mode) => { document.body.classList.toggle('dark', mode === 'dark'); label(); };
const saved = localStorage.getItem(KEY);
if (saved === 'dark' || saved === 'light') { apply(saved); } else { label(); }
button.addEventListener('click', () => {
  const mode = isDark() ? 'light' : 'dark';
  localStorage.setItem(KEY, mode);
  apply(mode);
});
if (window.matchMedia('(max-width: 640px)').matches) {
  const fold = (tries) => {
    const open = document.querySelector('#slb-chats > .label-wrap.open, #slb-chats .label-wrap.open');
    if (open) { open.click(); } else if (tries > 0) { setTimeout(() => fold(tries - 1), 100); }
  };
  fold(50);
}
"""
"""The header's light/dark switch: toggles Gradio's ``dark`` class on the body and remembers the choice in
localStorage; on a phone it also folds the chat list so the message box is on the first screen."""

CSS = render.CSS + cluster_render.CSS + documents_render.CSS
"""The page's styles: the shared and chat ones, then each tab's own."""

__all__ = ["CSS", "TITLE", "build_ui"]


class ScriptBlocks(gr.Blocks):
    """Blocks whose script-API calls may leave out trailing optional arguments.

    Arguments added to a script endpoint later (``agent`` on ``/query``, ``private`` on ``/rag_add``) have
    defaults in the handler's signature; gradio_client fills them in, but a plain HTTP caller written for the
    earlier arity would get "didn't receive enough input values". Missing trailing arguments whose parameter has
    a default get it, so adding an optional argument never breaks a script; a missing required one is still
    refused by Gradio. (The page itself always sends every input.)
    """

    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        missing = len(block_fn.inputs) - len(inputs)
        if missing > 0 and block_fn.fn is not None:
            parameters = [
                parameter for parameter in inspect.signature(block_fn.fn).parameters.values()
                if parameter.annotation not in (gr.Request, "gr.Request")
                and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            ]
            tail = parameters[len(inputs):len(block_fn.inputs)]
            if len(tail) == missing and all(parameter.default is not parameter.empty for parameter in tail):
                inputs.extend(parameter.default for parameter in tail)
        super().validate_inputs(block_fn, inputs)


def build_ui(service: AppService, *, metrics: Any = None) -> gr.Blocks:
    """The whole page; queue limits are set here, on purpose (see docs/web.md)."""
    settings = service.settings
    # delete_cache: uploaded files are copies of the user's documents; Gradio's cache keeps them at most an hour.
    with ScriptBlocks(title=TITLE, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.HTML(
            f'<div class="slb-header"><div><h2>{TITLE}</h2><span class="slb-tagline">One private assistant on all'
            ' your machines.</span></div><button type="button" class="slb-theme-button">\u263E Dark</button></div>',
            js_on_load=THEME_SWITCH_JS, elem_id="slb-header", padding=False,
        )
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="slb-tab-chat") as chat_tab:
                chat = build_chat_tab(service, metrics=metrics)
            with gr.Tab("Documents", id="documents", elem_id="slb-tab-documents") as documents_tab:
                documents = build_documents_tab(service)
            with gr.Tab("Cluster", id="cluster", elem_id="slb-tab-cluster") as cluster_tab:
                cluster = build_cluster_tab(service)
        build_script_api(service)

        status_timer = gr.Timer(CHAT_STATUS_REFRESH_S)
        known_choices: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}

        def chat_status(request: gr.Request):
            """Keep the chat's notice, the mode list and the machine list current (the lists only when changed)."""
            snapshot = service.coordinator.snapshot()
            choices = (mode_choices(service.models()), machine_choices(snapshot))
            key = request.session_hash if request is not None else ""
            if known_choices.get(key or "") == choices:
                return notice_markup(service), gr.skip(), gr.skip()
            known_choices[key or ""] = choices
            if len(known_choices) > 10_000:
                known_choices.clear()
            return notice_markup(service), gr.update(choices=choices[0]), gr.update(choices=choices[1])

        status_timer.tick(
            chat_status, None, [chat["notice"], chat["mode"], chat["machine"]], api_visibility="private",
            concurrency_id="refresh", concurrency_limit=None, show_progress="hidden",
        )

        async def on_load(request: gr.Request):
            choices = (mode_choices(service.models()), machine_choices(service.coordinator.snapshot()))
            if request is not None:
                known_choices[request.session_hash or ""] = choices
            return (
                notice_markup(service),
                gr.update(choices=choices[0]),
                gr.update(choices=choices[1]),
                gr.update(choices=await chat["session_choices"](user_of(request)), value=None),
            )

        demo.load(
            on_load, None, [chat["notice"], chat["mode"], chat["machine"], chat["sessions"]],
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

"""The Chat tab: sessions, streaming answers, mode and RAG, per-agent answers, stop.

Handlers are async so they run on the same event loop as the coordinator;
store calls go through worker threads (``service.sessions``). A stream is
throttled to ``stream_updates_per_s`` so many browsers at once stay smooth.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import gradio as gr

from app import cluster_status
from app.answers import simulated_agents
from app.errors import AppError
from app.model_list import ListedModel, model_label
from app.service import AppService
from app.streaming import throttled
from app.ui.errors import gradio_errors, warn
from app.ui.live import LiveAnswer
from app.ui.render import error_message, history_messages, user_message
from broker.coordinator.contract import AGGREGATIONS, Aggregation, RoutingMode

logger = logging.getLogger(__name__)

MODE_HELP = (
    "auto: the agent expected to answer first · quality: the largest model ready · a model name: an agent serving it"
    " · all: every agent answers, then the answers are combined"
)
MODE_LABELS = {
    RoutingMode.AUTO: "auto (fastest)",
    RoutingMode.QUALITY: "quality (largest model)",
    RoutingMode.ALL: "all (every agent)",
}


def mode_choices(models: list[ListedModel]) -> list[tuple[str, str]]:
    """The routing modes, then every model the cluster serves with the machines that have it (no embedding models:
    they cannot chat)."""
    return [(MODE_LABELS[mode], mode.value) for mode in RoutingMode] + [
        (model_label(model), model.name) for model in models if not (model.info and model.info.embedding)
    ]


def notice_markdown(service: AppService) -> str:
    return cluster_status.notice_markdown(service.coordinator.snapshot(), service.settings.broker)


def build_chat_tab(service: AppService, *, metrics: Any = None) -> dict[str, Any]:
    """Lay out the chat tab inside the current Blocks; returns components other tabs and the page load need."""
    settings = service.settings
    interval = 1.0 / settings.stream_updates_per_s
    session_state = gr.State("")

    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220):
            new_button = gr.Button("New chat", variant="secondary", elem_id="slb-new-chat")
            sessions = gr.Radio(choices=[], label="Chats", elem_id="slb-sessions", interactive=True)
            with gr.Accordion("Rename or delete this chat", open=False):
                title_box = gr.Textbox(label="Title", max_lines=1, elem_id="slb-title")
                rename_button = gr.Button("Rename", size="sm")
                delete_button = gr.Button("Delete chat", variant="stop", size="sm", elem_id="slb-delete-chat")
        with gr.Column(scale=4):
            notice = gr.Markdown(elem_id="slb-chat-notice", elem_classes=["slb-notice"])
            chatbot = gr.Chatbot(
                label="Answers",
                height=520,
                elem_id="slb-chatbot",
                buttons=["copy"],
                feedback_options=None,
                # Messages are HTML made by app/ui/render.py (Markdown with a strict allow-list: no raw HTML, no
                # image); Gradio's own Markdown pass would let a model's <img>, <form> or overlay through.
                render_markdown=False,
                sanitize_html=True,
                allow_tags=False,
                placeholder="Ask the cluster anything. Every answer says which machine and model wrote it.",
            )
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Type a question and press Enter",
                    show_label=False,
                    scale=6,
                    max_lines=8,
                    max_length=settings.max_prompt_chars,
                    elem_id="slb-message",
                )
                send_button = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="slb-send")
                stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="slb-stop")
            with gr.Row():
                mode = gr.Dropdown(
                    choices=mode_choices(service.models()),
                    value=RoutingMode.AUTO.value,
                    label="Mode",
                    info=MODE_HELP,
                    scale=3,
                    elem_id="slb-mode",
                )
                aggregation = gr.Radio(
                    choices=list(AGGREGATIONS),
                    value=Aggregation.CONSENSUS.value,
                    label="Combine answers (mode all)",
                    visible=False,
                    scale=2,
                    elem_id="slb-aggregation",
                )
                use_rag = gr.Checkbox(
                    label="Use my documents (RAG)", value=False, scale=1, elem_id="slb-rag",
                    info="adds the best passages of your documents, with citations",
                )
            agents_panel = gr.HTML(elem_id="slb-agent-answers")

    # ------------------------------------------------------------------ handlers

    async def session_choices() -> list[tuple[str, str]]:
        listed = await service.sessions.list_sessions()
        return [(f"{info.title} ({info.message_count})", info.id) for info in listed]

    async def refresh_sessions(session_id: str) -> Any:
        return gr.update(choices=await session_choices(), value=session_id or None)

    async def send(
        text: str,
        history: list[dict[str, Any]] | None,
        session_id: str,
        mode_value: str,
        aggregation_value: str,
        rag_on: bool,
        request: gr.Request,
    ):
        history = list(history or [])
        text = (text or "").strip()
        if not text:
            gr.Warning("Type a question first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if not session_id:
            with gradio_errors():
                session_id = (await service.sessions.create_session(None)).id
        owner = request.session_hash if request is not None else None
        mode_value = mode_value or RoutingMode.AUTO.value
        live = LiveAnswer(mode=mode_value, simulated=simulated_agents(service.coordinator.snapshot()))
        base = [*history, user_message(text)]
        yield base + live.messages(), "", session_id, "", gr.skip()
        if metrics is not None:
            metrics.ui_streams.inc()
        try:
            answer = await service.ask(
                text,
                session_id=session_id,
                mode=mode_value,
                aggregation=aggregation_value or Aggregation.CONSENSUS,
                use_rag=bool(rag_on),
                owner=owner,
            )
            live.follow(answer)
            async with contextlib.aclosing(throttled(answer, interval)) as batches:
                async for batch in batches:
                    for event in batch:
                        live.apply(event)
                    yield base + live.messages(), gr.skip(), gr.skip(), live.panel_html(), gr.skip()
        except AppError as error:
            warn(error)
            live.note = None
            failed = [error_message(str(error))]
            yield base + failed, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        finally:
            if metrics is not None:
                metrics.ui_streams.dec()
        yield base + live.messages(done=True), gr.skip(), session_id, live.panel_html(), await refresh_sessions(
            session_id
        )

    async def stop(request: gr.Request) -> None:
        owner = request.session_hash if request is not None else None
        if owner and await service.cancel_owner(owner):
            gr.Info("Stopping the answer…")

    async def open_session(session_id: str):
        if not session_id:
            return [], "", "", ""
        try:
            info = await service.sessions.get_session(session_id)
            history = await service.sessions.get_history(session_id)
        except AppError as error:
            warn(error)
            return [], "", "", ""
        return history_messages(history), session_id, info.title, ""

    def new_chat():
        """An empty chat; the session is created with its first question, so empty chats never pile up."""
        return [], "", gr.update(value=None), "", ""

    async def rename(session_id: str, title: str):
        if not session_id:
            gr.Warning("Open or start a chat first.")
            return gr.skip()
        try:
            await service.sessions.rename_session(session_id, title)
        except AppError as error:
            warn(error)
            return gr.skip()
        return await refresh_sessions(session_id)

    async def delete(session_id: str):
        if not session_id:
            gr.Warning("Open a chat first.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            await service.sessions.delete_session(session_id)
        except AppError as error:
            warn(error)
        return [], "", gr.update(choices=await session_choices(), value=None), ""

    def mode_changed(value: str):
        return gr.update(visible=value == RoutingMode.ALL)

    # ------------------------------------------------------------------ wiring

    send_inputs = [message, chatbot, session_state, mode, aggregation, use_rag]
    send_outputs = [chatbot, message, session_state, agents_panel, sessions]
    common = {
        "concurrency_id": "chat",
        "concurrency_limit": settings.chat_concurrency,
        "api_visibility": "undocumented",
        "show_progress": "hidden",
    }
    message.submit(send, send_inputs, send_outputs, api_name="ui_send", **common)
    send_button.click(send, send_inputs, send_outputs, api_name="ui_send_button", **common)
    control = {"concurrency_limit": None, "api_visibility": "undocumented", "queue": False}
    stop_button.click(stop, None, None, api_name="ui_stop", **control)
    sessions.select(
        open_session, sessions, [chatbot, session_state, title_box, agents_panel], api_name="ui_open_session",
        concurrency_limit=None, api_visibility="undocumented",
    )
    new_button.click(
        new_chat, None, [chatbot, session_state, sessions, title_box, agents_panel], api_visibility="private",
        queue=False, show_progress="hidden",
    )
    chatbot.clear(
        lambda: ("", gr.update(value=None), ""), None, [session_state, sessions, agents_panel],
        api_visibility="private", queue=False, show_progress="hidden",
    )
    rename_button.click(
        rename, [session_state, title_box], sessions, api_name="ui_rename", concurrency_limit=None,
        api_visibility="undocumented",
    )
    delete_button.click(
        delete, session_state, [chatbot, session_state, sessions, title_box], api_name="ui_delete",
        concurrency_limit=None, api_visibility="undocumented",
    )
    mode.change(mode_changed, mode, aggregation, api_visibility="private", queue=False, show_progress="hidden")

    return {
        "notice": notice,
        "mode": mode,
        "sessions": sessions,
        "session_choices": session_choices,
    }

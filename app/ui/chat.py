"""The Chat tab: chats per user, streaming answers, per-chat settings, regenerate, edit-and-resend, stop.

Handlers are async so they run on the same event loop as the coordinator;
store calls go through worker threads (``service.sessions``). A stream is
throttled to ``stream_updates_per_s`` so many browsers at once stay smooth.
Every session call names its user (``owner=user_of(request)``): with a UI
login each user sees only their own chats. Labels, lists and the notice line are
made in app/ui/chat_parts.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import gradio as gr
from pydantic import ValidationError

from app.answer_stream import AnswerStream
from app.answers import simulated_agents
from app.errors import AppError
from app.images import UPLOAD_SUFFIXES, ImageAttachment, attachment_from_file, vision_models
from app.markup import markdown_literal
from app.service import AppService
from app.store import ChatSettings
from app.streaming import throttled
from app.ui.chat_parts import (
    ANY_MACHINE,
    ATTACH_LABEL,
    BUSY_LABEL,
    BUSY_PLACEHOLDER,
    EDIT_PLACEHOLDER,
    IDLE_PLACEHOLDER,
    MODE_HELP,
    NO_VISION,
    NO_VISION_LABEL,
    REGENERATE_LABEL,
    RESEND_LABEL,
    RETRY_LABEL,
    SEND_LABEL,
    attachment_chip,
    checked_number,
    machine_choices,
    mode_choices,
    notice_line,
    settings_summary,
    vision_mode,
)
from app.ui.errors import warn
from app.ui.live import LiveAnswer
from app.ui.render import error_message, history_messages, notice_html, user_message
from app.ui.users import user_of
from broker.coordinator.contract import AGGREGATIONS, Aggregation, RoutingMode

logger = logging.getLogger(__name__)

def notice_markup(service: AppService) -> str:
    """The chat's notice as HTML (one line; the advice folded under it)."""
    return notice_html(*notice_line(service.coordinator.snapshot(), service.settings.broker))


def attach_button_update(service: AppService) -> Any:
    """The image button: offered while a machine has a vision model, otherwise disabled and saying why."""
    offered = bool(vision_models(service.models()))
    return gr.update(interactive=offered, label=ATTACH_LABEL if offered else NO_VISION_LABEL)


def build_chat_tab(service: AppService, *, metrics: Any = None) -> dict[str, Any]:
    """Lay out the chat tab inside the current Blocks; returns components other tabs and the page load need."""
    settings = service.settings
    interval = 1.0 / settings.stream_updates_per_s
    session_state = gr.State("")
    editing_state = gr.State(None)
    """The id of the stored question being edited (Send then resends it), or None."""
    busy: set[str] = set()
    """Browser sessions with an answer streaming: a second question from them is refused with a note."""
    image_state = gr.State(None)
    """The image attached for the next question (an :class:`ImageAttachment`), or None."""
    sent_image_state = gr.State(None)
    """``(chat id, question, attachment)`` of the last question sent with an image: Regenerate and Retry send the
    image again while the page is open (the chat stores a note of it, not the image)."""
    defaults = ChatSettings()

    with gr.Row(equal_height=False, elem_id="slb-chat-row"):
        with gr.Column(scale=1, min_width=220, elem_id="slb-chat-side"):
            new_button = gr.Button("New chat", variant="secondary", elem_id="slb-new-chat")
            with gr.Accordion("Chats", open=True, elem_id="slb-chats") as chats_box:
                sessions = gr.Radio(choices=[], show_label=False, label="Chats", elem_id="slb-sessions",
                                    interactive=True)
                with gr.Accordion("Rename or delete", open=False, elem_id="slb-manage") as manage_box:
                    title_box = gr.Textbox(label="Title", max_lines=1, elem_id="slb-title")
                    rename_button = gr.Button("Rename", size="sm", elem_id="slb-rename")
                    delete_button = gr.Button("Delete chat…", variant="stop", size="sm", elem_id="slb-delete-chat")
                    with gr.Column(visible=False, elem_id="slb-confirm-delete") as confirm_group:
                        confirm_text = gr.Markdown(elem_id="slb-confirm-text")
                        with gr.Row():
                            confirm_button = gr.Button("Yes, delete", variant="stop", size="sm", min_width=80,
                                                       elem_id="slb-confirm-delete-yes")
                            keep_button = gr.Button("Keep it", size="sm", min_width=80,
                                                    elem_id="slb-confirm-delete-no")
        with gr.Column(scale=4, elem_id="slb-chat-main"):
            notice = gr.HTML(elem_id="slb-chat-notice", js_on_load=None, padding=False)
            chatbot = gr.Chatbot(
                label="Answers",
                show_label=False,
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
            with gr.Row(elem_id="slb-compose"):
                message = gr.Textbox(
                    placeholder=IDLE_PLACEHOLDER,
                    show_label=False,
                    scale=6,
                    min_width=160,
                    max_lines=8,
                    max_length=settings.max_prompt_chars,
                    elem_id="slb-message",
                )
                send_button = gr.Button(SEND_LABEL, variant="primary", scale=1, min_width=70, elem_id="slb-send")
                stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="slb-stop")
            with gr.Row(elem_id="slb-chat-actions"):
                regenerate_button = gr.Button(REGENERATE_LABEL, size="sm", elem_id="slb-regenerate")
                edit_button = gr.Button("✎ Edit last question", size="sm", elem_id="slb-edit-last")
                cancel_edit_button = gr.Button("Cancel edit", size="sm", visible=False, elem_id="slb-cancel-edit")
                image_button = gr.UploadButton(NO_VISION_LABEL, size="sm", type="filepath", file_count="single",
                                               file_types=UPLOAD_SUFFIXES, interactive=False, elem_id="slb-attach")
                attachment = gr.HTML("", elem_id="slb-attachment", padding=False)
                remove_image_button = gr.Button("✕ Remove image", size="sm", visible=False,
                                                elem_id="slb-remove-image")
            with gr.Accordion(settings_summary(None, None, False, None), open=False,
                              elem_id="slb-settings") as settings_box:
                with gr.Row():
                    mode = gr.Dropdown(
                        choices=mode_choices(service.models()),
                        value=RoutingMode.AUTO.value,
                        label="Mode",
                        info=MODE_HELP,
                        scale=3,
                        min_width=240,
                        elem_id="slb-mode",
                    )
                    machine = gr.Dropdown(
                        choices=machine_choices(service.coordinator.snapshot()),
                        value=ANY_MACHINE,
                        label="Machine",
                        info="only this machine answers; any machine: routing chooses",
                        scale=2,
                        min_width=200,
                        elem_id="slb-machine",
                    )
                with gr.Row():
                    use_rag = gr.Checkbox(
                        label="Use my documents (RAG)", value=False, scale=1, min_width=240, elem_id="slb-rag",
                        info="adds the best passages of your documents, with citations",
                    )
                    aggregation = gr.Radio(
                        choices=list(AGGREGATIONS),
                        value=Aggregation.CONSENSUS.value,
                        label="Combine answers (mode all)",
                        visible=False,
                        scale=2,
                        min_width=240,
                        elem_id="slb-aggregation",
                    )
                system_prompt = gr.Textbox(
                    label="System prompt", lines=2, max_lines=8, max_length=settings.max_prompt_chars,
                    placeholder="e.g. Answer in French, briefly.", elem_id="slb-system-prompt",
                )
                with gr.Row():
                    # Text boxes, not number fields: empty means "the model's default" (a number field shows 0).
                    temperature = gr.Textbox(
                        label="Temperature", max_lines=1, min_width=140, placeholder="model default (0–2)",
                        elem_id="slb-temperature",
                    )
                    max_tokens = gr.Textbox(
                        label="Max tokens", max_lines=1, min_width=140, placeholder="model default",
                        elem_id="slb-max-tokens",
                    )

    setting_inputs = [mode, machine, use_rag, aggregation, system_prompt, temperature, max_tokens]
    stream_outputs = [chatbot, message, session_state, sessions, send_button, regenerate_button,
                      cancel_edit_button, editing_state, image_state, attachment, remove_image_button,
                      sent_image_state]

    # ------------------------------------------------------------------ helpers

    def chat_settings(mode_value: str, machine_value: str, rag_on: bool, aggregation_value: str,
                      system_text: str, temperature_value: Any, max_tokens_value: Any) -> ChatSettings:
        """The controls as the chat's settings; wrong values are refused with a clear message."""
        try:
            return ChatSettings(
                mode=mode_value or RoutingMode.AUTO.value,
                agent=machine_value or None,
                use_rag=bool(rag_on),
                aggregation=aggregation_value or Aggregation.CONSENSUS.value,
                system_prompt=(system_text or "").strip(),
                temperature=checked_number(temperature_value, "temperature"),
                max_tokens=None if (tokens := checked_number(max_tokens_value, "max tokens", whole=True)) is None
                else int(tokens),
            )
        except ValidationError as error:
            first = error.errors()[0]
            where = " ".join(str(part) for part in first["loc"]).replace("_", " ")
            raise gr.Error(f"Chat settings: {where}: {first['msg']}") from None
        except ValueError as error:
            raise gr.Error(f"Chat settings: {error}") from None

    def settings_updates(chosen: ChatSettings) -> tuple[Any, ...]:
        """The controls (and the accordion's label) showing one chat's saved settings."""
        snapshot = service.coordinator.snapshot()
        return (
            gr.update(value=chosen.mode or RoutingMode.AUTO.value),
            gr.update(choices=machine_choices(snapshot, chosen.agent), value=chosen.agent or ANY_MACHINE),
            gr.update(value=bool(chosen.use_rag)),
            gr.update(value=chosen.aggregation or Aggregation.CONSENSUS.value, visible=chosen.mode == RoutingMode.ALL),
            gr.update(value=chosen.system_prompt or ""),
            gr.update(value="" if chosen.temperature is None else f"{chosen.temperature:g}"),
            gr.update(value="" if chosen.max_tokens is None else str(chosen.max_tokens)),
            gr.update(label=settings_summary(chosen.mode, chosen.agent, chosen.use_rag, chosen.system_prompt)),
        )

    def streams(**changes: Any) -> tuple[Any, ...]:
        """One update of ``stream_outputs``: the named ones change, the others are left as they are."""
        names = ["chatbot", "message", "session", "sessions", "send", "regenerate", "cancel_edit", "editing",
                 "image", "attachment", "remove_image", "sent_image"]
        unknown = set(changes) - set(names)
        assert not unknown, unknown
        return tuple(changes.get(name, gr.skip()) for name in names)

    def idle_controls(failed: bool = False) -> dict[str, Any]:
        return {
            "send": gr.update(value=SEND_LABEL, interactive=True),
            "regenerate": gr.update(value=RETRY_LABEL if failed else REGENERATE_LABEL, interactive=True),
            "message": gr.update(placeholder=IDLE_PLACEHOLDER),
            "cancel_edit": gr.update(visible=False),
            "editing": None,
        }

    def busy_controls() -> dict[str, Any]:
        """Fresh updates each time: Gradio consumes an update's value when it sends it."""
        return {
            "send": gr.update(value=BUSY_LABEL, interactive=False),
            "regenerate": gr.update(interactive=False),
            "cancel_edit": gr.update(visible=False),
        }

    async def session_choices(owner: str | None) -> list[tuple[str, str]]:
        listed = await service.sessions.list_sessions(owner=owner)
        return [(f"{info.title} ({info.message_count})", info.id) for info in listed]

    async def refresh_sessions(session_id: str, owner: str | None) -> Any:
        return gr.update(choices=await session_choices(owner), value=session_id or None)

    async def stored_view(session_id: str, owner: str | None) -> tuple[list[dict[str, Any]], list[Any]]:
        """A stored chat as the chatbot shows it, and its messages."""
        history = await service.sessions.get_history(session_id, owner=owner)
        return history_messages(history, simulated_agents(service.coordinator.snapshot())), history

    def last_failed(history: Sequence[Any]) -> bool:
        last = history[-1] if history else None
        return last is not None and last.role == "assistant" and getattr(last, "status", "ok") == "error"

    async def stream_answer(
        request: gr.Request | None,
        base: list[dict[str, Any]],
        mode_value: str,
        start: Callable[[], Awaitable[AnswerStream]],
        session_id: str,
        owner: str | None,
        first: dict[str, Any] | None = None,
    ):
        """Show an answer as it streams under ``base`` (the chat up to its question), the controls busy meanwhile;
        the last update leaves the controls idle again and Retry offered when it failed. ``first``: more changes
        for the first update (Send clears the attached image there)."""
        key = (request.session_hash if request is not None else None) or ""
        busy.add(key)
        live = LiveAnswer(mode=mode_value, simulated=simulated_agents(service.coordinator.snapshot()))
        failed = False
        try:
            yield streams(chatbot=base + live.messages(), session=session_id, **busy_controls(),
                          message=gr.update(value="", placeholder=BUSY_PLACEHOLDER), editing=None, **(first or {}))
            if metrics is not None:
                metrics.ui_streams.inc()
            try:
                answer = await start()
                live.follow(answer)
                async with contextlib.aclosing(throttled(answer, interval)) as batches:
                    async for batch in batches:
                        for event in batch:
                            live.apply(event)
                        yield streams(chatbot=base + live.messages())
                final = base + live.messages(done=True)
                failed = live.failed
            except AppError as error:
                warn(error)
                final, failed = base + [error_message(str(error))], True
            finally:
                if metrics is not None:
                    metrics.ui_streams.dec()
        finally:
            busy.discard(key)
        yield streams(chatbot=final, session=session_id, sessions=await refresh_sessions(session_id, owner),
                      **idle_controls(failed))

    def refuse_while_busy(request: gr.Request | None) -> bool:
        """A question while this browser's answer still streams is refused, visibly (Gradio would queue it
        silently); the typed text stays in the box."""
        key = (request.session_hash if request is not None else None) or ""
        if key in busy:
            gr.Warning("Still answering the last question: wait for it or press Stop. Your text is kept.")
            return True
        return False

    # ------------------------------------------------------------------ handlers

    async def send(
        text: str,
        history: list[dict[str, Any]] | None,
        session_id: str,
        editing: int | None,
        attached: ImageAttachment | None,
        mode_value: str,
        machine_value: str,
        rag_on: bool,
        aggregation_value: str,
        system_text: str,
        temperature_value: Any,
        max_tokens_value: Any,
        request: gr.Request,
    ):
        text = (text or "").strip()
        if refuse_while_busy(request):
            yield streams()
            return
        if not text:
            gr.Warning("Type a question first." + (" The image goes with it." if attached else ""))
            yield streams()
            return
        owner = user_of(request)
        chosen = chat_settings(
            mode_value, machine_value, rag_on, aggregation_value, system_text, temperature_value, max_tokens_value
        )
        images = [attached] if attached is not None else None
        noted = [attached.stored()] if attached is not None else None
        try:
            mode_override = vision_mode(chosen.mode, service.models()) if attached is not None else None
        except AppError as error:
            warn(error)
            yield streams()
            return
        stopper = request.session_hash if request is not None else None
        try:
            if not session_id:
                session_id = (await service.sessions.create_session(None, owner=owner, settings=chosen)).id
            else:  # what the controls show is what this question uses, and stays with the chat
                await service.sessions.update_settings(session_id, chosen, owner=owner)
            if editing is not None:
                _, stored = await stored_view(session_id, owner)
                kept = [item for item in stored if item.id < editing]
                base = [*history_messages(kept, simulated_agents(service.coordinator.snapshot())),
                        user_message(text, noted)]

                async def start() -> AnswerStream:
                    return await service.edit_and_resend(session_id, editing, text, user=owner, owner=stopper,
                                                         images=images, mode=mode_override)
            else:
                base = [*(history or []), user_message(text, noted)]

                async def start() -> AnswerStream:
                    return await service.ask(text, session_id=session_id, owner=stopper, user=owner, images=images,
                                             mode=mode_override)
        except AppError as error:
            warn(error)
            yield streams(**idle_controls())
            return
        first = {} if attached is None else {
            "image": None, "attachment": "", "remove_image": gr.update(visible=False),
            "sent_image": (session_id, text, attached)}
        async for update in stream_answer(request, base, mode_override or chosen.mode, start, session_id, owner,
                                          first):
            yield update

    async def regenerate(
        session_id: str,
        sent_image: tuple[str, str, ImageAttachment] | None,
        mode_value: str,
        machine_value: str,
        rag_on: bool,
        aggregation_value: str,
        system_text: str,
        temperature_value: Any,
        max_tokens_value: Any,
        request: gr.Request,
    ):
        if refuse_while_busy(request):
            yield streams()
            return
        if not session_id:
            gr.Warning("Ask a question first: there is no answer to regenerate.")
            yield streams()
            return
        owner = user_of(request)
        chosen = chat_settings(
            mode_value, machine_value, rag_on, aggregation_value, system_text, temperature_value, max_tokens_value
        )
        stopper = request.session_hash if request is not None else None
        try:
            await service.sessions.update_settings(session_id, chosen, owner=owner)
            _, stored = await stored_view(session_id, owner)
        except AppError as error:
            warn(error)
            yield streams()
            return
        last_question = max((item.id for item in stored if item.role == "user"), default=None)
        if last_question is None:
            gr.Warning("This chat has no question to answer again.")
            yield streams()
            return
        kept = [item for item in stored if item.id <= last_question]
        question = next(item for item in stored if item.id == last_question)
        images, mode_override = None, None
        if question.stats.get("attachments"):
            if sent_image is None or sent_image[:2] != (session_id, question.content):
                gr.Warning("This question was sent with an image, which the chat does not keep: attach the image "
                           "again and send the question.")
                yield streams()
                return
            images = [sent_image[2]]
            try:
                mode_override = vision_mode(chosen.mode, service.models())
            except AppError as error:
                warn(error)
                yield streams()
                return
        base = history_messages(kept, simulated_agents(service.coordinator.snapshot()))

        async def start() -> AnswerStream:
            return await service.regenerate(session_id, user=owner, owner=stopper, images=images,
                                            mode=mode_override)

        async for update in stream_answer(request, base, mode_override or chosen.mode, start, session_id, owner):
            yield update

    async def start_edit(session_id: str, request: gr.Request):
        """Put the chat's last question in the box; Send then resends it and drops what followed it."""
        if not session_id:
            gr.Warning("Ask a question first: there is nothing to edit.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            stored = await service.sessions.get_history(session_id, owner=user_of(request))
        except AppError as error:
            warn(error)
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        question = next((item for item in reversed(stored) if item.role == "user"), None)
        if question is None:
            gr.Warning("This chat has no question to edit.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (gr.update(value=question.content, placeholder=EDIT_PLACEHOLDER), question.id,
                gr.update(value=RESEND_LABEL), gr.update(visible=True))

    def cancel_edit():
        return gr.update(value="", placeholder=IDLE_PLACEHOLDER), None, gr.update(value=SEND_LABEL), \
            gr.update(visible=False)

    def attach_image(path: str | None):
        """Check the picked file (an image, within the size limit) and hold it for the next question."""
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        if not vision_models(service.models()):
            warn(NO_VISION)
            return None, "", gr.update(visible=False)
        try:
            picked = attachment_from_file(path)
        except AppError as error:
            warn(error)
            return gr.skip(), gr.skip(), gr.skip()
        except OSError as error:
            warn(f"The image could not be read: {error.strerror or error}")
            return gr.skip(), gr.skip(), gr.skip()
        return picked, attachment_chip(picked), gr.update(visible=True)

    async def stop(request: gr.Request) -> None:
        owner = request.session_hash if request is not None else None
        if owner and await service.cancel_owner(owner):
            gr.Info("Stopping the answer…")

    async def open_session(session_id: str, request: gr.Request):
        """Show a stored chat with its own settings (each chat keeps its mode, machine, RAG, prompt, sampling)."""
        owner = user_of(request)
        empty = ([], "", "", gr.update(value=REGENERATE_LABEL), *leave_edit(), *settings_updates(defaults))
        if not session_id:
            return empty
        try:
            info = await service.sessions.get_session(session_id, owner=owner)
            view, stored = await stored_view(session_id, owner)
        except AppError as error:
            warn(error)
            return empty
        failed = last_failed(stored)
        return (view, session_id, info.title,
                gr.update(value=RETRY_LABEL if failed else REGENERATE_LABEL), *leave_edit(),
                *settings_updates(info.settings or defaults))

    def leave_edit() -> tuple[Any, ...]:
        """Another chat is shown: no edit in progress, no delete waiting for its confirmation (it would now
        delete the chat just opened)."""
        return None, gr.update(value=SEND_LABEL), gr.update(visible=False), gr.update(visible=False)

    def new_chat():
        """An empty chat with the default settings; the session is created with its first question, so empty
        chats never pile up."""
        return [], "", gr.update(value=None), "", *leave_edit(), *settings_updates(defaults)

    async def save_settings(
        session_id: str,
        mode_value: str,
        machine_value: str,
        rag_on: bool,
        aggregation_value: str,
        system_text: str,
        temperature_value: Any,
        max_tokens_value: Any,
        request: gr.Request,
    ):
        """Keep the chat's settings with it (a new chat saves them with its first question)."""
        try:
            chosen = chat_settings(
                mode_value, machine_value, rag_on, aggregation_value, system_text, temperature_value,
                max_tokens_value,
            )
        except gr.Error as error:
            warn(error.message)
            return gr.skip(), gr.skip()
        if session_id:
            try:
                await service.sessions.update_settings(session_id, chosen, owner=user_of(request))
            except AppError as error:
                warn(error)
        return (gr.update(label=settings_summary(chosen.mode, chosen.agent, chosen.use_rag, chosen.system_prompt)),
                gr.update(visible=chosen.mode == RoutingMode.ALL))

    async def rename(session_id: str, title: str, request: gr.Request):
        if not session_id:
            gr.Warning("Open or start a chat first.")
            return gr.skip()
        owner = user_of(request)
        try:
            await service.sessions.rename_session(session_id, title, owner=owner)
        except AppError as error:
            warn(error)
            return gr.skip()
        return await refresh_sessions(session_id, owner)

    async def ask_delete(session_id: str, request: gr.Request):
        """Deleting asks first: the confirmation names the chat."""
        if not session_id:
            gr.Warning("Open a chat first.")
            return gr.skip(), gr.skip()
        try:
            title = (await service.sessions.get_session(session_id, owner=user_of(request))).title
        except AppError as error:
            warn(error)
            return gr.skip(), gr.skip()
        name = markdown_literal(title)
        return gr.update(visible=True), f"Delete **{name}** and all its messages? This cannot be undone."

    async def trash_asks_first(session_id: str, request: gr.Request):
        """The chatbot's own trash icon has already emptied the view: put the chat back and ask, as Delete does."""
        if not session_id:
            return [], gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            view, _ = await stored_view(session_id, user_of(request))
        except AppError as error:
            warn(error)
            return [], gr.skip(), gr.skip(), gr.skip(), gr.skip()
        shown, question = await ask_delete(session_id, request)
        return view, gr.update(open=True), gr.update(open=True), shown, question

    async def delete(session_id: str, request: gr.Request):
        hidden = gr.update(visible=False)
        if not session_id:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), hidden
        owner = user_of(request)
        try:
            await service.sessions.delete_session(session_id, owner=owner)
        except AppError as error:
            warn(error)
        else:
            gr.Info("Chat deleted.")
        return [], "", gr.update(choices=await session_choices(owner), value=None), "", hidden

    # ------------------------------------------------------------------ wiring

    send_inputs = [message, chatbot, session_state, editing_state, image_state, *setting_inputs]
    common = {
        "concurrency_id": "chat",
        "concurrency_limit": settings.chat_concurrency,
        "api_visibility": "undocumented",
        "show_progress": "hidden",
        # A second Enter while an answer streams reaches the handler, which refuses it with a note (Gradio's
        # default "once" would drop it silently).
        "trigger_mode": "multiple",
    }
    message.submit(send, send_inputs, stream_outputs, api_name="ui_send", **common)
    send_button.click(send, send_inputs, stream_outputs, api_name="ui_send_button", **common)
    regenerate_inputs = [session_state, sent_image_state, *setting_inputs]
    regenerate_button.click(regenerate, regenerate_inputs, stream_outputs, api_name="ui_regenerate", **common)
    chatbot.retry(regenerate, regenerate_inputs, stream_outputs, api_visibility="private",
                  **{key: value for key, value in common.items() if key != "api_visibility"})
    attach_outputs = [image_state, attachment, remove_image_button]
    image_button.upload(attach_image, image_button, attach_outputs, api_visibility="private",
                        concurrency_limit=None, show_progress="hidden")
    remove_image_button.click(lambda: (None, "", gr.update(visible=False)), None, attach_outputs,
                              api_visibility="private", queue=False, show_progress="hidden")
    # The notice changes with the machines ready (page load, the status timer): the image button follows.
    notice.change(lambda: attach_button_update(service), None, image_button, api_visibility="private",
                  queue=False, show_progress="hidden")
    control = {"concurrency_limit": None, "api_visibility": "undocumented", "queue": False}
    stop_button.click(stop, None, None, api_name="ui_stop", **control)
    edit_button.click(start_edit, session_state, [message, editing_state, send_button, cancel_edit_button],
                      api_visibility="private", concurrency_limit=None, show_progress="hidden")
    cancel_edit_button.click(cancel_edit, None, [message, editing_state, send_button, cancel_edit_button],
                             api_visibility="private", queue=False, show_progress="hidden")
    setting_outputs = [*setting_inputs, settings_box]
    edit_outputs = [editing_state, send_button, cancel_edit_button, confirm_group]
    sessions.select(
        open_session, sessions,
        [chatbot, session_state, title_box, regenerate_button, *edit_outputs, *setting_outputs],
        api_name="ui_open_session", concurrency_limit=None, api_visibility="undocumented",
    )
    new_button.click(
        new_chat, None,
        [chatbot, session_state, sessions, title_box, *edit_outputs, *setting_outputs],
        api_visibility="private", queue=False, show_progress="hidden",
    )
    # Only what the user changes is saved (not the values a reopened chat puts back): choices when picked, text
    # when the box is left.
    for control_input in setting_inputs:
        trigger = control_input.blur if isinstance(control_input, gr.Textbox) else control_input.input
        trigger(
            save_settings, [session_state, *setting_inputs], [settings_box, aggregation], api_visibility="private",
            concurrency_limit=None, show_progress="hidden",
        )
    rename_button.click(
        rename, [session_state, title_box], sessions, api_name="ui_rename", concurrency_limit=None,
        api_visibility="undocumented",
    )
    delete_button.click(ask_delete, session_state, [confirm_group, confirm_text], api_visibility="private",
                        concurrency_limit=None, show_progress="hidden")
    chatbot.clear(trash_asks_first, session_state, [chatbot, chats_box, manage_box, confirm_group,
                                                               confirm_text],
                  api_visibility="private", concurrency_limit=None, show_progress="hidden")
    keep_button.click(lambda: gr.update(visible=False), None, confirm_group, api_visibility="private", queue=False,
                      show_progress="hidden")
    confirm_button.click(
        delete, session_state, [chatbot, session_state, sessions, title_box, confirm_group], api_name="ui_delete",
        concurrency_limit=None, api_visibility="undocumented",
    )

    return {
        "notice": notice,
        "mode": mode,
        "machine": machine,
        "sessions": sessions,
        "session_choices": session_choices,
    }

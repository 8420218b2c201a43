"""The Gradio API for scripts: one stable ``api_name`` per action (see docs/api.md).

Everything the original HTTP API did (query, status, health, reassign,
sessions, documents) is callable with ``gradio_client.Client(url).predict(...,
api_name="/name")``. Results are plain JSON (dicts and lists) so scripts need
no Gradio types; errors come back as ``gradio_client`` ``AppError`` with a
readable message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import gradio as gr

from app.answer_stream import AnswerStream
from app.answers import fan_out_answers, restart_dict, simulated_agents, stats_of
from app.errors import AppError
from app.service import AppService
from app.store import ChatSettings
from app.streaming import throttled
from app.ui.documents import add_files
from app.ui.errors import gradio_errors
from app.ui.users import user_of
from broker.coordinator.contract import Aggregation, PlanView, RoutingMode

logger = logging.getLogger(__name__)


def _answer_payload(answer: AnswerStream, simulated: set[str], *, done: bool) -> dict[str, Any]:
    record = answer.record
    finished = record.finished
    outcome = record.outcome if done else None
    return {
        "session_id": answer.session_id,
        "request_id": answer.request_id,
        "text": record.text,
        "done": done,
        "status": outcome.status if outcome is not None else None,
        "mode": answer.mode,
        "agents": outcome.agents if outcome is not None else record.agents,
        "models": record.models,
        "tried": record.tried,
        "simulated_agents": sorted(set(record.agents) & simulated),
        "answers": fan_out_answers(record, simulated),
        "aggregation": finished.aggregation if finished else None,
        "agreement": finished.agreement if finished else None,
        "restarts": [restart_dict(restart) for restart in record.restarts],
        "citations": [citation.model_dump(mode="json") for citation in answer.citations],
        "stats": stats_of(record, simulated) if done else {},
        "error": record.failed.error if record.failed else None,
        "error_code": record.failed.code if record.failed else None,
    }


def _plan_json(plan: PlanView) -> dict[str, Any]:
    return dataclasses.asdict(plan)


def _check_text(**values: Any) -> None:
    """Scripts can send any JSON: say which argument is wrong instead of "'int' object has no attribute 'strip'"."""
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise gr.Error(f"{name} must be text, got {type(value).__name__}")


def _check_rag(use_rag: Any) -> bool | None:
    if use_rag is not None and not isinstance(use_rag, bool):
        raise gr.Error(f"use_rag must be true or false, got {type(use_rag).__name__}")
    return use_rag


def build_script_api(service: AppService) -> None:
    """Register every script endpoint in the current Blocks."""
    settings = service.settings
    interval = 1.0 / settings.stream_updates_per_s
    chat_limits = {"concurrency_id": "chat", "concurrency_limit": settings.chat_concurrency}

    async def stream_answer(start: Callable[[], Awaitable[AnswerStream]]) -> AsyncIterator[dict[str, Any]]:
        simulated = simulated_agents(service.coordinator.snapshot())
        with gradio_errors():
            answer = await start()
            async with contextlib.aclosing(throttled(answer, interval)) as batches:
                async for _ in batches:
                    yield _answer_payload(answer, simulated, done=False)
        yield _answer_payload(answer, simulated, done=True)

    async def chat(
        message: str,
        session_id: str = "",
        mode: str = "",
        aggregation: str = "",
        use_rag: bool | None = None,
        agent: str | None = None,
        request: gr.Request = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Ask within one of your chat sessions (created when session_id is empty); streams, the last item has
        done=true and status ok, error or stopped.

        The question and its outcome are stored in the session (a failed answer with its error and the agents
        tried). Empty mode/aggregation and a null use_rag/agent take the chat's settings (/session_settings);
        mode: auto, quality, all, or a model name; aggregation (mode all): consensus, synthesize or first;
        agent: only this machine answers ("" lets routing choose).
        """
        _check_text(prompt=message, session_id=session_id, mode=mode, aggregation=aggregation, agent=agent)
        _check_rag(use_rag)
        user = user_of(request)
        if not session_id:
            with gradio_errors():
                session_id = (await service.sessions.create_session(None, owner=user)).id
        async for item in stream_answer(lambda: service.ask(
            message, session_id=session_id, mode=mode, aggregation=aggregation, use_rag=use_rag, agent=agent,
            user=user,
        )):
            yield item

    async def query(
        prompt: str,
        mode: str = RoutingMode.AUTO.value,
        aggregation: str = Aggregation.CONSENSUS.value,
        use_rag: bool = False,
        agent: str = "",
    ) -> AsyncIterator[dict[str, Any]]:
        """Ask once, without a session; streams, the last item has done=true and every agent's answer in mode all.

        agent: only this machine answers ("": routing chooses)."""
        _check_text(prompt=prompt, mode=mode, aggregation=aggregation, agent=agent)
        _check_rag(use_rag)
        async for item in stream_answer(lambda: service.ask(
            prompt, mode=mode or RoutingMode.AUTO.value, aggregation=aggregation or Aggregation.CONSENSUS.value,
            use_rag=bool(use_rag), agent=agent or "",
        )):
            yield item

    async def session_regenerate(
        session_id: str, mode: str = "", agent: str | None = None, request: gr.Request = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Answer the chat's last question again (its previous answer is deleted first); streams like /chat.

        Empty mode and a null agent take the chat's settings."""
        _check_text(session_id=session_id, mode=mode, agent=agent)
        async for item in stream_answer(lambda: service.regenerate(
            session_id, user=user_of(request), mode=mode, agent=agent
        )):
            yield item

    async def session_edit(
        session_id: str, message_id: int, message: str, request: gr.Request = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Replace one of the chat's questions (message_id from /session_history) with a new text and ask it:
        that question and everything after it are deleted first. Streams like /chat."""
        _check_text(session_id=session_id, message=message)
        if isinstance(message_id, bool) or not isinstance(message_id, int):
            raise gr.Error(f"message_id must be a whole number, got {message_id!r}")
        async for item in stream_answer(lambda: service.edit_and_resend(
            session_id, message_id, message, user=user_of(request)
        )):
            yield item

    async def cancel(request_id: str) -> dict[str, Any]:
        """Stop a running query (its request_id is in every /chat and /query item)."""
        return {"request_id": request_id, "cancelled": await service.cancel(request_id)}

    async def status() -> dict[str, Any]:
        """The cluster summary and every agent's detail (as GET /status)."""
        return await service.status()

    def health() -> dict[str, Any]:
        """healthy, connected_clients, active_models, message (as GET /health)."""
        return service.health()

    def models() -> list[dict[str, Any]]:
        """Every model the cluster serves (its name is usable as mode), with the machines that have it.

        Each item: name, agents (can answer with it now), holders (each agent's own name for it and its state:
        ready, loaded or local), coming_to (agents still pulling or loading it), context_length, parameters_b.
        """
        return [
            {
                "name": model.name,
                "agents": model.agents,
                "holders": [{"agent_id": holder.agent_id, "name": holder.name, "state": holder.state,
                             "simulated": holder.simulated} for holder in model.holders],
                "coming_to": model.coming_to,
                "context_length": model.info.context_length if model.info else None,
                "parameters_b": model.info.parameters_b if model.info else None,
            }
            for model in service.models()
        ]

    def plan() -> dict[str, Any]:
        """What placement would do now, without changing anything (what-if)."""
        return _plan_json(service.coordinator.plan())

    async def reassign() -> dict[str, Any]:
        """Re-plan model placement now and apply it; returns the plan with its reasons."""
        return _plan_json(await service.coordinator.reassign())

    async def sessions_list(request: gr.Request = None) -> list[dict[str, Any]]:
        """Your chat sessions, most recent first: id, title, created_at, updated_at, message_count, settings."""
        with gradio_errors():
            sessions = await service.sessions.list_sessions(owner=user_of(request))
            return [info.model_dump(mode="json") for info in sessions]

    async def session_create(
        title: str = "", settings: dict[str, Any] | None = None, request: gr.Request = None
    ) -> dict[str, Any]:
        """A new empty session (titled from its first question unless a title is given), with optional settings
        (see /session_settings)."""
        _check_text(title=title)
        with gradio_errors():
            info = await service.sessions.create_session(title or None, owner=user_of(request),
                                                         settings=ChatSettings.parse(settings))
            return info.model_dump(mode="json")

    async def session_settings(
        session_id: str, settings: dict[str, Any] | None = None, request: gr.Request = None
    ) -> dict[str, Any]:
        """Change a chat's settings: the keys given replace the current ones (system_prompt, temperature 0-2,
        max_tokens, mode, agent, use_rag, aggregation; null resets temperature, max_tokens, agent). Without
        settings, just reads them. Returns the session."""
        _check_text(session_id=session_id)
        if settings is not None and not isinstance(settings, dict):
            raise gr.Error(f"settings must be an object, got {type(settings).__name__}")
        user = user_of(request)
        with gradio_errors():
            info = await service.sessions.get_session(session_id, owner=user)
            if settings:
                merged = ChatSettings.parse({**info.settings.model_dump(mode="json"), **settings})
                info = await service.sessions.update_settings(session_id, merged, owner=user)
            return info.model_dump(mode="json")

    async def session_history(session_id: str, request: gr.Request = None) -> list[dict[str, Any]]:
        """Every message of a session, oldest first, with agents, models, mode, citations, stats, status
        (ok, error, stopped), error and tried."""
        _check_text(session_id=session_id)
        with gradio_errors():
            history = await service.sessions.get_history(session_id, owner=user_of(request))
            return [message.model_dump(mode="json") for message in history]

    async def session_delete(session_id: str, request: gr.Request = None) -> dict[str, Any]:
        """Delete a session and all its messages."""
        _check_text(session_id=session_id)
        with gradio_errors():
            await service.sessions.delete_session(session_id, owner=user_of(request))
        return {"deleted": session_id}

    async def session_rename(session_id: str, title: str, request: gr.Request = None) -> dict[str, Any]:
        """Give a session a title of your choosing."""
        _check_text(session_id=session_id, title=title)
        with gradio_errors():
            return (await service.sessions.rename_session(session_id, title, owner=user_of(request))).model_dump(
                mode="json")

    async def rag_search(query: str, k: int = 5, request: gr.Request = None) -> list[dict[str, Any]]:
        """The k best passages of your documents for a query, best first, with their sources."""
        try:
            count = int(k) if not isinstance(k, bool) and isinstance(k, int | float | str) else None
        except (ValueError, OverflowError):  # "many", NaN, Infinity
            count = None
        if count is None:
            raise gr.Error(f"k must be a whole number, got {k!r}")
        with gradio_errors():
            hits = await service.documents.search(query, count, user=user_of(request))
        return [hit.model_dump(mode="json") | {"location": hit.location} for hit in hits]

    async def rag_list(request: gr.Request = None) -> list[dict[str, Any]]:
        """Every document you may see: id, name, format, size_bytes, chunk_count, added_at, owner, private."""
        with gradio_errors():
            documents = await service.documents.list_documents(user_of(request))
            return [document.model_dump(mode="json") for document in documents]

    async def rag_delete(document_id: str, request: gr.Request = None) -> dict[str, Any]:
        """Delete a document and all its chunks (someone else's private document does not exist for you)."""
        with gradio_errors():
            await service.documents.delete_document(document_id, user_of(request))
        return {"deleted": document_id}

    gr.api(chat, api_name="chat", **chat_limits)
    gr.api(query, api_name="query", **chat_limits)
    gr.api(session_regenerate, api_name="session_regenerate", **chat_limits)
    gr.api(session_edit, api_name="session_edit", **chat_limits)
    gr.api(cancel, api_name="cancel", concurrency_limit=None)
    for function in (status, health, models, plan):
        gr.api(function, api_name=function.__name__, concurrency_limit=None, queue=False)
    gr.api(reassign, api_name="reassign", concurrency_limit=1, concurrency_id="reassign")
    for function in (sessions_list, session_create, session_settings, session_history, session_delete,
                     session_rename):
        gr.api(function, api_name=function.__name__, concurrency_limit=None)
    gr.api(rag_search, api_name="rag_search", concurrency_id="search", concurrency_limit=8)
    gr.api(rag_list, api_name="rag_list", concurrency_limit=None)
    gr.api(rag_delete, api_name="rag_delete", concurrency_limit=None)

    # /rag_add takes files, so it needs a real (hidden) File component: Gradio checks the uploaded paths.
    with gr.Column(visible=False):
        files = gr.File(file_count="multiple", label="files")
        text = gr.Textbox(label="text")
        name = gr.Textbox(label="name")
        private = gr.Checkbox(value=False, label="private")
        added = gr.JSON(label="result")
        trigger = gr.Button("rag_add")

    async def rag_add(
        files_value: Any, text_value: str, name_value: str, private_value: bool = False, request: gr.Request = None
    ) -> dict[str, Any]:
        """Add documents: files (gradio_client.handle_file), and/or raw text with a name. Returns what was added.

        They belong to the logged-in caller; ``private`` keeps them to that caller (docs/rag.md, Private documents).
        """
        owner, private_flag = user_of(request), bool(private_value)
        documents, errors = await add_files(service, files_value, owner=owner, private=private_flag)
        if text_value and text_value.strip():
            try:
                document = await service.documents.add_text(
                    text_value, name_value or "pasted text.txt", owner=owner, private=private_flag
                )
                documents.append(document.model_dump(mode="json"))
            except AppError as error:
                errors.append(f"{name_value or 'text'}: {error}")
        if not documents and errors:
            raise gr.Error("; ".join(errors))
        if not documents and not errors:
            raise gr.Error("nothing to add: give files or text")
        return {"added": documents, "errors": errors, "names": [os.path.basename(d["name"]) for d in documents]}

    trigger.click(
        rag_add, [files, text, name, private], added, api_name="rag_add", concurrency_id="uploads",
        concurrency_limit=settings.upload_concurrency,
    )

"""The one place that combines the coordinator, the chat sessions and the documents.

The Gradio UI, the scriptable Gradio API and the OpenAI/Ollama HTTP API all
call :meth:`AppService.ask`, so a question asked anywhere is answered the
same way: history trimmed to a budget, document chunks added when RAG is on,
the query streamed from the cluster, and the answer stored with who
answered. The stores are reached through :attr:`AppService.sessions` and
:attr:`AppService.documents`, which run every call in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from app import cluster_status
from app.answer_stream import AnswerStream
from app.answers import STOPPED, simulated_agents, stats_of
from app.async_store import AsyncStore
from app.errors import AppError, BadRequest, refuse_lone_surrogates
from app.model_list import ListedModel, listed_models
from app.ports import CoordinatorPort
from app.sampler import ClusterSampler
from app.settings import AppSettings
from app.store import SHARED_USER, ChatSettings, Citation, RagStore, SessionStore, build_rag_prompt
from app.store.sessions import MAX_NAME_CHARS
from broker.coordinator.contract import AGGREGATIONS, Aggregation, QueryRequest, new_request_id
from broker.heap import settle_heap
from broker.protocol.messages import ChatMessage

if TYPE_CHECKING:  # app.images imports app.api_common, which imports this module
    from app.images import ImageAttachment

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 3.0
"""After a cancel, how long the coordinator has to end the stream before the service stops waiting."""
T = TypeVar("T")


STATUS_MAX_AGE_S = 0.5
"""``/status`` is at most this stale: fresh enough that a restarted app shows its agents within a telemetry
interval (tests/chaos), while any number of pollers cost at most two builds a second."""


class CachedBuild(Generic[T]):
    """A value built in a worker thread at most once per ``max_age_s``; callers meanwhile share the last one.

    For ``/status`` (issue 13.6): open to anyone, polled by monitors, and as large as the agents make it, so
    it must cost the event loop nothing per request and the process at most one build per refresh period.
    """

    def __init__(self, build: Callable[[], T], max_age_s: float) -> None:
        self._build = build
        self.max_age_s = max_age_s
        self._value: T | None = None
        self._built_at = 0.0
        self._pending: asyncio.Future[T] | None = None
        self.builds = 0

    async def get(self) -> T:
        if self._value is not None and time.monotonic() - self._built_at < self.max_age_s:
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> T:
        try:
            value = await anyio.to_thread.run_sync(self._build)
            self._value, self._built_at = value, time.monotonic()
            self.builds += 1
            return value
        finally:
            self._pending = None


class AppService:
    """Asking, cancelling and the cluster's health, shared by the UI and both APIs."""

    def __init__(
        self,
        settings: AppSettings,
        coordinator: CoordinatorPort,
        sessions: SessionStore,
        rag_factory: Callable[[], RagStore],
    ) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.sampler = ClusterSampler(coordinator.snapshot, settings.cluster_refresh_s, settings.history_window_s)
        self._session_store = sessions
        self._rag_factory = rag_factory
        self._rag: RagStore | None = None
        self._rag_lock = asyncio.Lock()
        self.sessions: AsyncStore[SessionStore] = AsyncStore(self._open_sessions)
        self.documents: AsyncStore[RagStore] = AsyncStore(self._open_documents)
        self._active: dict[str, AnswerStream] = {}
        self._warm_task: asyncio.Task[None] | None = None
        self._status: CachedBuild[tuple[dict[str, Any], bytes]] = CachedBuild(
            self._build_status, min(settings.cluster_refresh_s, STATUS_MAX_AGE_S))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start sampling the cluster for the plots; open the document store in the background."""
        self.sampler.start()
        if self.settings.rag_warm_up:
            self._warm_task = asyncio.create_task(self._warm_rag(), name="rag-warm-up")

    async def stop(self) -> None:
        await self.sampler.stop()
        for stream in list(self._active.values()):
            await self.cancel(stream.request_id)
        if self._rag is not None:
            await anyio.to_thread.run_sync(self._rag.close)
        await self.sessions.close()

    async def _open_sessions(self) -> SessionStore:
        return self._session_store

    async def _open_documents(self) -> RagStore:
        """The document store, opened on first use (LanceDB and the embedding model take seconds to load)."""
        if self._rag is None:
            async with self._rag_lock:
                if self._rag is None:
                    self._rag = await anyio.to_thread.run_sync(self._rag_factory)
        return self._rag

    async def _warm_rag(self) -> None:
        try:
            await self.documents.warm_up()
            logger.info("document search ready (embedding model %s)", self.settings.embedding_model)
            settle_heap("loading the embedding model", collect=False)  # a full pass here would stop chats
        except Exception:  # noqa: BLE001 - the first upload or search reports the error to the user
            logger.warning("the document store could not be opened; uploads and search will fail", exc_info=True)

    # ------------------------------------------------------------------ cluster

    def models(self) -> list[ListedModel]:
        """Every model the cluster serves (with its machines), plus those on their way to an agent: a query for
        one of those waits for it (app/model_list.py)."""
        return listed_models(self.coordinator.snapshot(), self.coordinator.models())

    def health(self) -> dict[str, Any]:
        """``GET /health`` (see app/cluster_status.py)."""
        return cluster_status.health(self.coordinator.snapshot(), self.settings.broker)

    async def status(self) -> dict[str, Any]:
        """``GET /status`` (see app/cluster_status.py): built off the event loop, at most once per
        ``STATUS_MAX_AGE_S``."""
        return (await self._status.get())[0]

    async def status_json(self) -> bytes:
        """:meth:`status` as the JSON bytes ``GET /status`` sends (encoded once per build, not per request)."""
        return (await self._status.get())[1]

    def _build_status(self) -> tuple[dict[str, Any], bytes]:
        """Runs in a worker thread: the snapshot is safe from any thread (app/ports.py)."""
        body = cluster_status.status(self.coordinator.snapshot(), self.settings.broker, len(self._active))
        return body, json.dumps(body, allow_nan=False).encode()

    # ------------------------------------------------------------------ asking

    async def ask(
        self,
        question: str,
        *,
        session_id: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        mode: str | None = None,
        aggregation: str | None = None,
        use_rag: bool | None = None,
        agent: str | None = None,
        rag_k: int | None = None,
        options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        owner: str | None = None,
        user: str = SHARED_USER,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        query_fields: dict[str, Any] | None = None,
        images: Sequence[ImageAttachment] | None = None,
    ) -> AnswerStream:
        """Ask the cluster; the answer comes as an :class:`AnswerStream`, which the caller must close.

        With ``session_id`` (a chat of ``user``) the question and the answer are stored, the session's history
        (trimmed to the token budget, failed turns left out) goes with the question, and the chat's
        :class:`~app.store.ChatSettings` fill in what the caller leaves out: ``mode``/``aggregation``/``agent``
        ``None`` or ``""``, ``use_rag`` ``None``; ``agent=""`` means "routing chooses" even if the chat picked a
        machine; the system prompt goes first and temperature / max tokens into the options (the caller's
        ``options`` win). With ``messages`` (the HTTP APIs) the caller's conversation is sent as is and nothing
        is stored. ``owner`` is the browser session that may stop the answer (the Stop button), not the user.
        ``query_fields``: more :class:`QueryRequest` fields from the HTTP APIs (``format``, ``think``,
        ``keep_alive``, ``check_answer``: app/structured.py). ``images`` (the chat UI's attachments) go with the
        question to a vision model; a stored question keeps a note of them, not the images (docs/web.md). Wrong
        input raises :class:`~app.errors.BadRequest` before anything is stored or sent.
        """
        return await self._ask(
            question, session_id=session_id, messages=messages, mode=mode, aggregation=aggregation, use_rag=use_rag,
            agent=agent, rag_k=rag_k, options=options, timeout_s=timeout_s, request_id=request_id, owner=owner,
            user=user, store_question=True, tools=tools, tool_choice=tool_choice, query_fields=query_fields,
            images=images,
        )

    async def regenerate(
        self, session_id: str, *, user: str, owner: str | None = None, **overrides: Any
    ) -> AnswerStream:
        """Ask the chat's last question again: the answer(s) after it (failed, stopped or not) are deleted first.

        ``overrides`` are :meth:`ask`'s keyword arguments (``mode``, ``agent``, ``options``, ...).
        """
        self._refuse_while_answering(session_id)
        history = await self.sessions.get_history(session_id, owner=user)
        last = next((index for index in range(len(history) - 1, -1, -1) if history[index].role == "user"), None)
        if last is None:
            raise BadRequest("this chat has no question to answer again")
        if last + 1 < len(history):
            await self.sessions.truncate_from(session_id, history[last + 1].id, owner=user)
        logger.info("chat %s: answering message %d again", session_id, history[last].id)
        return await self._ask(history[last].content, session_id=session_id, owner=owner, user=user,
                               store_question=False, **overrides)

    async def edit_and_resend(
        self, session_id: str, message_id: int, new_text: str, *, user: str, owner: str | None = None,
        **overrides: Any,
    ) -> AnswerStream:
        """Replace one of the chat's questions with ``new_text`` and ask it: that question and everything after it
        are deleted, then the new text is asked (and stored) as usual. Nothing is deleted if the text is refused."""
        self._check_question(new_text)
        if not isinstance(new_text, str) or not new_text.strip():
            raise BadRequest("the question is empty")
        self._refuse_while_answering(session_id)
        history = await self.sessions.get_history(session_id, owner=user)
        target = next((message for message in history if message.id == message_id), None)
        if target is None or target.role != "user":
            raise BadRequest(f"message {message_id!r} is not a question in this chat")
        await self.sessions.truncate_from(session_id, message_id, owner=user)
        logger.info("chat %s: question %d edited and asked again", session_id, message_id)
        return await self._ask(new_text, session_id=session_id, owner=owner, user=user, store_question=True,
                               **overrides)

    def _refuse_while_answering(self, session_id: str) -> None:
        """Cutting a chat while one of its answers streams would store that answer after the cut."""
        if any(stream.session_id == session_id for stream in self._active.values()):
            raise BadRequest("an answer is still arriving in this chat; stop it or wait for it first")

    def _check_question(self, question: str) -> None:
        if not isinstance(question, str):
            raise BadRequest(f"the question must be text, got {type(question).__name__}")
        refuse_lone_surrogates("the question", question)
        if len(question) > self.settings.max_prompt_chars:
            raise BadRequest(
                f"the question has {len(question)} characters; the limit is {self.settings.max_prompt_chars}"
            )

    async def _ask(
        self,
        question: str,
        *,
        session_id: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        mode: str | None = None,
        aggregation: str | None = None,
        use_rag: bool | None = None,
        agent: str | None = None,
        rag_k: int | None = None,
        options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        owner: str | None = None,
        user: str = SHARED_USER,
        store_question: bool,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        query_fields: dict[str, Any] | None = None,
        images: Sequence[ImageAttachment] | None = None,
    ) -> AnswerStream:
        from app.images import checked_images  # noqa: PLC0415 - see the TYPE_CHECKING import

        pictures = checked_images([[image.data for image in images or ()]], "images")[0]
        chat = ChatSettings()
        if session_id:
            chat = (await self.sessions.get_session(session_id, owner=user)).settings
        mode = (mode.strip() if isinstance(mode, str) else "") or chat.mode
        try:
            method = Aggregation(aggregation or chat.aggregation)
        except ValueError:
            raise BadRequest(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}") from None
        if agent is not None and not isinstance(agent, str):
            raise BadRequest(f"agent must be text, got {type(agent).__name__}")
        chosen_agent = chat.agent if agent is None else (agent.strip() or None)
        if chosen_agent is not None and len(chosen_agent) > MAX_NAME_CHARS:
            raise BadRequest(f"the agent name has {len(chosen_agent)} characters; the limit is {MAX_NAME_CHARS}")
        rag_on = chat.use_rag if use_rag is None else bool(use_rag)
        if not isinstance(question, str) or not question.strip():
            if not messages:
                raise BadRequest("the question is empty")
        self._check_question(question or "")
        refuse_lone_surrogates("the mode", mode)
        if chosen_agent is not None:
            refuse_lone_surrogates("the agent", chosen_agent)
        for message in messages or ():
            refuse_lone_surrogates("a message", message.content)
        request_id = request_id or new_request_id()
        query_options = _chat_options(chat) if session_id else {}
        query_options.update(options or {})
        if session_id and store_question:
            noted = {"attachments": [image.stored() for image in images]} if images else None
            await self.sessions.add_message(session_id, "user", question, owner=user, stats=noted)
        try:
            if session_id:
                history = await self.sessions.history_for_prompt(
                    session_id, self.settings.history_budget_tokens, owner=user
                )
                prompt = [ChatMessage(role=message.role, content=message.content) for message in history]
                if chat.system_prompt.strip():
                    prompt = [ChatMessage(role="system", content=chat.system_prompt), *prompt]
            elif messages:
                prompt = list(messages)
            else:
                prompt = [ChatMessage(role="user", content=question)]
            if pictures:
                prompt = _with_images(prompt, pictures)
            citations: list[Citation] = []
            if rag_on:
                rag_question = question or next((m.content for m in reversed(prompt) if m.role == "user"), "")
                hits = await self.documents.search(rag_question, rag_k or self.settings.rag_top_k, user=user)
                system_text, citations = build_rag_prompt(rag_question, hits)
                if system_text:
                    prompt = _with_system(prompt, system_text)

            request = QueryRequest(
                messages=prompt,
                mode=mode,
                aggregation=method,
                options=query_options,
                timeout_s=timeout_s,
                request_id=request_id,
                agent=chosen_agent,
                tools=tools or None,
                tool_choice=tool_choice,
                **{"conversation": session_id, **(query_fields or {})},
            )
            events = self.coordinator.query(request)
        except BaseException as error:
            if session_id:  # the question is stored: so is why it got no answer (issue 14.4)
                await self._store_unasked(session_id, user, mode, error)
            raise
        stream = AnswerStream(
            request_id=request_id,
            session_id=session_id,
            mode=mode,
            citations=citations,
            owner=owner,
            user=user,
            events=events,
            on_close=self._answer_closed,
        )
        self._active[request_id] = stream
        logger.info("query %s: mode=%s agent=%s rag=%s session=%s", request_id, mode, chosen_agent or "-", rag_on,
                    session_id or "-")
        return stream

    async def _store_unasked(self, session_id: str, user: str, mode: str, error: BaseException) -> None:
        """A stored question that could not even be sent (document search failed, ...): store the error as its
        answer, so the chat shows what happened when it is reopened."""
        if isinstance(error, asyncio.CancelledError):
            status, text, code = "stopped", STOPPED, "cancelled"
        elif isinstance(error, AppError):
            status, text, code = "error", error.message, error.code or "failed"
        else:
            status, text, code = "error", f"the question could not be sent ({type(error).__name__})", "failed"
        try:
            await asyncio.shield(self.sessions.add_message(
                session_id, "assistant", "", owner=user, mode=mode, status=status, error=text,
                stats={"error": text, "error_code": code},
            ))
        except Exception:  # noqa: BLE001 - the caller gets the original error; this copy is logged
            logger.warning("could not store the error of a question in session %s", session_id, exc_info=True)

    async def _answer_closed(self, stream: AnswerStream) -> None:
        """The stream's end: forget the query, keep the answer with its outcome (answer, error or stop)."""
        self._active.pop(stream.request_id, None)
        if not stream.session_id:
            return
        record = stream.record
        outcome = record.outcome
        try:
            await asyncio.shield(
                self.sessions.add_message(
                    stream.session_id,
                    "assistant",
                    record.text,
                    owner=stream.user,
                    agents=outcome.agents,
                    models=outcome.models,
                    mode=stream.mode,
                    citations=[citation.model_dump(mode="json") for citation in stream.citations],
                    stats=stats_of(record, simulated_agents(self.coordinator.snapshot())),
                    status=outcome.status,
                    error=outcome.error,
                    tried=record.tried,
                )
            )
        except Exception:  # noqa: BLE001 - the user already saw the answer; losing its copy is logged
            logger.warning("could not store the answer in session %s", stream.session_id, exc_info=True)

    async def cancel(self, request_id: str) -> bool:
        """Stop a running query on its agent(s); its stream ends with a ``cancelled`` failure."""
        stream = self._active.get(request_id)
        if stream is not None and not stream.cancel_requested:
            stream.cancel_requested = True
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self._force_stop, request_id)
        found = await self.coordinator.cancel(request_id)
        return found or stream is not None

    def _force_stop(self, request_id: str) -> None:
        """The coordinator did not end a cancelled stream in time: stop waiting for it."""
        stream = self._active.get(request_id)
        if stream is not None and stream.reader is not None and not stream.reader.done():
            logger.warning("query %s did not end %.0f s after cancel; stopping its stream", request_id, CANCEL_GRACE_S)
            stream.reader.cancel()

    async def cancel_owner(self, owner: str) -> int:
        """Cancel every running query of one browser session (the stop button)."""
        request_ids = [stream.request_id for stream in self._active.values() if stream.owner == owner]
        for request_id in request_ids:
            await self.cancel(request_id)
        return len(request_ids)


def _chat_options(chat: ChatSettings) -> dict[str, Any]:
    """A chat's sampling settings as query options (Ollama's names, which every backend maps)."""
    options: dict[str, Any] = {}
    if chat.temperature is not None:
        options["temperature"] = chat.temperature
    if chat.max_tokens is not None:
        options["num_predict"] = chat.max_tokens
    return options


def _with_images(prompt: list[ChatMessage], images: list[str]) -> list[ChatMessage]:
    """The images go with the newest question (earlier ones are not resent: the chat keeps a note, not them)."""
    for index in range(len(prompt) - 1, -1, -1):
        if prompt[index].role == "user":
            question = prompt[index]
            return [*prompt[:index], question.model_copy(update={"images": [*question.images, *images]}),
                    *prompt[index + 1:]]
    raise BadRequest("images need a question to go with")


def _with_system(prompt: list[ChatMessage], system_text: str) -> list[ChatMessage]:
    """Put the RAG sources after the caller's own system messages, before the conversation."""
    index = 0
    while index < len(prompt) and prompt[index].role == "system":
        index += 1
    return [*prompt[:index], ChatMessage(role="system", content=system_text), *prompt[index:]]

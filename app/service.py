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
from typing import Any, Generic, TypeVar

import anyio

from app import cluster_status
from app.answer_stream import AnswerStream
from app.answers import simulated_agents, stats_of
from app.async_store import AsyncStore
from app.errors import BadRequest, refuse_lone_surrogates
from app.model_list import ListedModel, listed_models
from app.ports import CoordinatorPort
from app.sampler import ClusterSampler
from app.settings import AppSettings
from app.store import Citation, RagStore, SessionStore, build_rag_prompt
from broker.coordinator.contract import AGGREGATIONS, Aggregation, QueryRequest, RoutingMode, new_request_id
from broker.protocol.messages import ChatMessage

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
        mode: str = RoutingMode.AUTO,
        aggregation: str = Aggregation.CONSENSUS,
        use_rag: bool = False,
        rag_k: int | None = None,
        options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        owner: str | None = None,
    ) -> AnswerStream:
        """Ask the cluster; the answer comes as an :class:`AnswerStream`, which the caller must close.

        With ``session_id`` the question and the answer are stored and the
        session's history (trimmed to the token budget) goes with the
        question; with ``messages`` (the HTTP APIs) the caller's
        conversation is sent as is and nothing is stored. Wrong input raises
        :class:`~app.errors.BadRequest` before anything is stored or sent.
        """
        mode = str(mode or RoutingMode.AUTO).strip()
        try:
            method = Aggregation(aggregation or Aggregation.CONSENSUS)
        except ValueError:
            raise BadRequest(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}") from None
        if not isinstance(question, str) or not question.strip():
            if not messages:
                raise BadRequest("the question is empty")
        refuse_lone_surrogates("the question", question)
        refuse_lone_surrogates("the mode", mode)
        for message in messages or ():
            refuse_lone_surrogates("a message", message.content)
        if len(question) > self.settings.max_prompt_chars:
            raise BadRequest(
                f"the question has {len(question)} characters; the limit is {self.settings.max_prompt_chars}"
            )
        request_id = request_id or new_request_id()
        if session_id:
            await self.sessions.add_message(session_id, "user", question)
            history = await self.sessions.history_for_prompt(session_id, self.settings.history_budget_tokens)
            prompt = [ChatMessage(role=message.role, content=message.content) for message in history]
        elif messages:
            prompt = list(messages)
        else:
            prompt = [ChatMessage(role="user", content=question)]
        citations: list[Citation] = []
        if use_rag:
            rag_question = question or next((m.content for m in reversed(prompt) if m.role == "user"), "")
            hits = await self.documents.search(rag_question, rag_k or self.settings.rag_top_k)
            system_text, citations = build_rag_prompt(rag_question, hits)
            if system_text:
                prompt = _with_system(prompt, system_text)

        request = QueryRequest(
            messages=prompt,
            mode=mode,
            aggregation=method,
            options=dict(options or {}),
            timeout_s=timeout_s,
            request_id=request_id,
        )
        stream = AnswerStream(
            request_id=request_id,
            session_id=session_id,
            mode=mode,
            citations=citations,
            owner=owner,
            events=self.coordinator.query(request),
            on_close=self._answer_closed,
        )
        self._active[request_id] = stream
        logger.info("query %s: mode=%s rag=%s session=%s", request_id, mode, use_rag, session_id or "-")
        return stream

    async def _answer_closed(self, stream: AnswerStream) -> None:
        """The stream's end: forget the query, keep the answer (or what arrived of it) with who answered."""
        self._active.pop(stream.request_id, None)
        record = stream.record
        if not stream.session_id or (record.finished is None and not record.text):
            return
        try:
            await asyncio.shield(
                self.sessions.add_message(
                    stream.session_id,
                    "assistant",
                    record.text,
                    agents=record.agents,
                    models=record.models,
                    mode=stream.mode,
                    citations=[citation.model_dump(mode="json") for citation in stream.citations],
                    stats=stats_of(record, simulated_agents(self.coordinator.snapshot())),
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


def _with_system(prompt: list[ChatMessage], system_text: str) -> list[ChatMessage]:
    """Put the RAG sources after the caller's own system messages, before the conversation."""
    index = 0
    while index < len(prompt) and prompt[index].role == "system":
        index += 1
    return [*prompt[:index], ChatMessage(role="system", content=system_text), *prompt[index:]]

"""The one place that combines the coordinator, the chat sessions and the documents.

The Gradio UI, the scriptable Gradio API and the OpenAI/Ollama HTTP API all
call :class:`AppService`, so a question asked anywhere is answered the same
way: history trimmed to a budget, document chunks added when RAG is on, the
query streamed from the cluster, and the answer stored with who answered.

The stores are synchronous (SQLite, LanceDB, embeddings): every call to them
goes through a worker thread so the event loop — shared with uvicorn, Gradio
and the coordinator's MQTT handling — never waits on disk or on the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from app.settings import AppSettings
from app.store import (
    BadInputError,
    Citation,
    Document,
    RagStore,
    SearchHit,
    SessionInfo,
    SessionStore,
    build_rag_prompt,
)
from app.store import ChatMessage as StoredMessage
from broker.coordinator.contract import (
    AgentAnswer,
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    AgentView,
    ClusterSnapshot,
    PlanView,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
    new_request_id,
)
from broker.protocol.messages import ChatMessage

logger = logging.getLogger(__name__)

T = TypeVar("T")

AGGREGATIONS: tuple[str, ...] = ("consensus", "synthesize", "first")
CANCEL_GRACE_S = 3.0
"""After a cancel, how long the coordinator has to end the stream before the service stops waiting."""

OLLAMA_HELP = (
    "Install Ollama from https://ollama.com/download and start it (`ollama serve`), then start an agent on that "
    "machine: `python -m agent --broker-url mqtt://{broker}`. If Ollama already runs elsewhere, point an agent at "
    "it with `--backend-url http://HOST:11434`. Without Ollama you can try the cluster with "
    "`python run_all.py --demo` (simulated agents)."
)


@dataclass(frozen=True)
class AskStarted:
    """The question is stored and retrieval is done; the cluster is about to be asked."""

    request_id: str
    session_id: str | None
    citations: list[Citation]


AskEvent = AskStarted | QueryEvent


@dataclass
class _ActiveQuery:
    request_id: str
    owner: str | None
    task: asyncio.Task[Any] | None
    started_at: float = field(default_factory=time.monotonic)
    cancel_requested: bool = False


@dataclass(frozen=True)
class ClusterSample:
    """One point of the cluster history the live plots draw."""

    at: float
    agent_id: str
    simulated: bool
    online: bool
    tokens_per_s: float | None
    jobs_running: int
    jobs_queued: int
    cpu_percent: float | None


@dataclass
class AnswerRecord:
    """What is known about an answer while it streams; becomes the stored message."""

    text: str = ""
    agents: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    agent_texts: dict[str, str] = field(default_factory=dict)
    agent_models: dict[str, str] = field(default_factory=dict)
    finished: QueryFinished | None = None
    failed: QueryFailed | None = None
    switches: list[AgentSwitched] = field(default_factory=list)

    def apply(self, event: AskEvent) -> None:
        """Fold one event into the record."""
        if isinstance(event, QueryStarted):
            self.agents, self.models = list(event.agents), list(event.models)
        elif isinstance(event, TextDelta):
            self.text += event.text
            if event.agent_id and event.agent_id not in self.agents:
                self.agents.append(event.agent_id)
        elif isinstance(event, AgentSwitched):
            self.switches.append(event)
            if event.to_agent not in self.agents:
                self.agents.append(event.to_agent)
        elif isinstance(event, AgentDelta):
            self.agent_texts[event.agent_id] = self.agent_texts.get(event.agent_id, "") + event.text
            self.agent_models[event.agent_id] = event.model
        elif isinstance(event, AgentFinished):
            answer = event.answer
            self.agent_texts[answer.agent_id] = answer.text
            self.agent_models[answer.agent_id] = answer.model
        elif isinstance(event, QueryFinished):
            self.finished = event
            self.text = event.text
            self.agents, self.models = list(event.agents), list(event.models)
        elif isinstance(event, QueryFailed):
            self.failed = event
            if event.partial_text and len(event.partial_text) >= len(self.text):
                self.text = event.partial_text


def stats_of(record: AnswerRecord, simulated: set[str]) -> dict[str, Any]:
    """The stats stored with an answer (and shown under it)."""
    stats: dict[str, Any] = {}
    finished = record.finished
    if finished is not None:
        if finished.stats is not None:
            stats.update(finished.stats.model_dump(exclude_none=True))
        if finished.latency_s is not None:
            stats["latency_s"] = round(finished.latency_s, 3)
        if finished.failovers:
            stats["failovers"] = finished.failovers
        if finished.aggregation is not None:
            stats["aggregation"] = finished.aggregation
        if finished.agreement is not None:
            stats["agreement"] = round(finished.agreement, 3)
        combined_by = getattr(finished, "combined_by", None)
        if combined_by:
            stats["combined_by"] = combined_by
        if finished.answers:
            stats["answers"] = [answer_dict(answer) for answer in finished.answers]
    if record.failed is not None:
        stats["error"] = record.failed.error
        stats["error_code"] = record.failed.code
    if record.switches:
        stats["switches"] = [
            {"from": switch.from_agent, "to": switch.to_agent, "reason": switch.reason} for switch in record.switches
        ]
    marked = sorted(agent for agent in record.agents if agent in simulated)
    if marked:
        stats["simulated_agents"] = marked
    return stats


def answer_dict(answer: AgentAnswer) -> dict[str, Any]:
    """A fan-out answer as plain JSON."""
    return {
        "agent_id": answer.agent_id,
        "model": answer.model,
        "text": answer.text,
        "error": answer.error,
        "simulated": answer.simulated,
        "stats": answer.stats.model_dump(exclude_none=True) if answer.stats is not None else {},
    }


def agent_dict(agent: AgentView) -> dict[str, Any]:
    """An agent view as plain JSON (the /status shape)."""
    return dataclasses.asdict(agent)


def plan_dict(plan: PlanView) -> dict[str, Any]:
    return dataclasses.asdict(plan)


class AppService:
    """Chat, documents and cluster operations shared by the UI and both APIs."""

    def __init__(
        self,
        settings: AppSettings,
        coordinator: Any,
        sessions: SessionStore,
        rag_factory: Callable[[], RagStore],
    ) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.sessions = sessions
        self._rag_factory = rag_factory
        self._rag: RagStore | None = None
        self._rag_lock = asyncio.Lock()
        self._active: dict[str, _ActiveQuery] = {}
        window = max(10, int(settings.history_window_s / settings.cluster_refresh_s))
        self._history: deque[list[ClusterSample]] = deque(maxlen=window)
        self._sampler: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._simulated_cache: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start sampling the cluster for the plots; open the document store in the background."""
        self._sampler = asyncio.create_task(self._sample_loop(), name="cluster-sampler")
        if self.settings.rag_warm_up:
            self._warm_task = asyncio.create_task(self._warm_rag(), name="rag-warm-up")

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for active in list(self._active.values()):
            await self.cancel(active.request_id)
        if self._rag is not None:
            await anyio.to_thread.run_sync(self._rag.close)
        await anyio.to_thread.run_sync(self.sessions.close)

    async def _warm_rag(self) -> None:
        try:
            rag = await self.rag()
            await anyio.to_thread.run_sync(rag.warm_up)
            logger.info("document search ready (embedding model %s)", self.settings.embedding_model)
        except Exception:  # noqa: BLE001 - the first upload or search reports the error to the user
            logger.warning("the document store could not be opened; uploads and search will fail", exc_info=True)

    async def rag(self) -> RagStore:
        """The document store, opened on first use (LanceDB and the embedding model take seconds to load)."""
        if self._rag is None:
            async with self._rag_lock:
                if self._rag is None:
                    self._rag = await anyio.to_thread.run_sync(self._rag_factory)
        return self._rag

    # ------------------------------------------------------------------ cluster

    def snapshot(self) -> ClusterSnapshot:
        snapshot = self.coordinator.snapshot()
        self._simulated_cache = {agent.id for agent in snapshot.agents if agent.simulated}
        return snapshot

    def model_names(self) -> list[str]:
        """Models ready somewhere in the cluster."""
        return list(self.coordinator.model_names())

    def known_models(self) -> list[str]:
        """Ready models plus those assigned to an online agent (pulling or loading): a query for one waits."""
        names = set(self.model_names())
        names.update(agent.model for agent in self.snapshot().agents if agent.online and agent.model)
        return sorted(names)

    def health(self) -> dict[str, Any]:
        """``GET /health``: is the cluster able to answer, and if not, what to do about it."""
        snapshot = self.snapshot()
        online = [agent for agent in snapshot.agents if agent.online]
        ready = sorted(set(snapshot.ready_models))
        healthy = bool(snapshot.connected and online and ready)
        return {
            "healthy": healthy,
            "connected_clients": len(online),
            "active_models": ready,
            "message": self.cluster_message(snapshot),
        }

    def cluster_message(self, snapshot: ClusterSnapshot | None = None) -> str:
        """One plain sentence (or a short paragraph) about the cluster's state, with advice when it cannot answer."""
        snapshot = snapshot or self.snapshot()
        broker = self.settings.broker
        if not snapshot.connected:
            return (
                f"Not connected to the MQTT broker at {broker}. Start it (`python run_all.py` starts one) "
                "or set --broker-url."
            )
        online = [agent for agent in snapshot.agents if agent.online]
        if not online:
            return "No agent is connected yet. " + OLLAMA_HELP.format(broker=f"{broker.host}:{broker.port}")
        ready = sorted(set(snapshot.ready_models))
        unreachable = [agent for agent in online if agent.backend_reachable is False]
        simulated = [agent for agent in online if agent.simulated]
        parts: list[str] = []
        if ready:
            parts.append(
                f"{len(online)} agent{'s' if len(online) != 1 else ''} online; ready models: {', '.join(ready)}."
            )
        else:
            pulling = [
                f"{agent.id} {agent.model_state or 'waiting'}"
                + (f" {agent.model_progress:.0%}" if agent.model_progress is not None else "")
                for agent in online
            ]
            parts.append(
                f"{len(online)} agent{'s' if len(online) != 1 else ''} online, no model ready yet ("
                + "; ".join(pulling)
                + ")."
            )
        if unreachable:
            names = ", ".join(agent.id for agent in unreachable)
            detail = next((agent.backend_error for agent in unreachable if agent.backend_error), None)
            parts.append(
                f"Agent{'s' if len(unreachable) != 1 else ''} {names} cannot reach Ollama"
                + (f" ({detail})" if detail else "")
                + ". Install Ollama from https://ollama.com/download and start it, or restart the agent with "
                "`--backend-url http://HOST:11434` pointing at a machine that runs it."
            )
        if simulated:
            parts.append(
                f"Simulated agents (demo, not real models): {', '.join(agent.id for agent in simulated)}."
            )
        return " ".join(parts)

    def status(self) -> dict[str, Any]:
        """``GET /status``: the original design's summary plus every agent's detail."""
        snapshot = self.snapshot()
        online = [agent for agent in snapshot.agents if agent.online]
        ready = sorted(set(snapshot.ready_models))
        return {
            "total_clients": len(snapshot.agents),
            "active_clients": len(online),
            "available_models": ready,
            "healthy": bool(snapshot.connected and online and ready),
            "connected": snapshot.connected,
            "message": self.cluster_message(snapshot),
            "active_queries": len(self._active),
            "agents": [agent_dict(agent) for agent in snapshot.agents],
            "generated_at": snapshot.generated_at,
        }

    def plan(self) -> PlanView:
        """What placement would do now (dry run)."""
        return self.coordinator.plan()

    async def reassign(self) -> PlanView:
        return await self.coordinator.reassign()

    def cluster_history(self) -> list[ClusterSample]:
        return [sample for samples in self._history for sample in samples]

    async def _sample_loop(self) -> None:
        """Keep a few minutes of per-agent load so the plots have a past when the page opens."""
        while True:
            try:
                snapshot = self.snapshot()
                now = time.time()
                self._history.append(
                    [
                        ClusterSample(
                            at=now,
                            agent_id=agent.id,
                            simulated=agent.simulated,
                            online=agent.online,
                            tokens_per_s=agent.tokens_per_s,
                            jobs_running=agent.jobs_running,
                            jobs_queued=agent.jobs_queued,
                            cpu_percent=agent.cpu_percent,
                        )
                        for agent in snapshot.agents
                    ]
                )
            except Exception:  # noqa: BLE001 - a bad snapshot must not end the sampling
                logger.warning("cluster sampling failed", exc_info=True)
            await asyncio.sleep(self.settings.cluster_refresh_s)

    # ------------------------------------------------------------------ asking

    async def ask(
        self,
        question: str,
        *,
        session_id: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        mode: str = "auto",
        aggregation: str = "consensus",
        use_rag: bool = False,
        rag_k: int | None = None,
        options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        owner: str | None = None,
    ) -> AsyncIterator[AskEvent]:
        """Answer ``question`` through the cluster, as an async stream of events.

        With ``session_id`` the question and the answer are stored and the
        session's history (trimmed to the token budget) goes with the
        question; with ``messages`` (the HTTP APIs) the caller's
        conversation is sent as is and nothing is stored. Closing the stream
        early cancels the query on the agents.
        """
        mode = (mode or "auto").strip()
        aggregation = aggregation or "consensus"
        if aggregation not in AGGREGATIONS:
            raise BadInputError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if not isinstance(question, str) or not question.strip():
            if not messages:
                raise BadInputError("the question is empty")
        if len(question) > self.settings.max_prompt_chars:
            raise BadInputError(
                f"the question has {len(question)} characters; the limit is {self.settings.max_prompt_chars}"
            )
        request_id = request_id or new_request_id()
        if session_id:
            await self._in_thread(self.sessions.add_message, session_id, "user", question)
            history = await self._in_thread(
                self.sessions.history_for_prompt, session_id, self.settings.history_budget_tokens
            )
            prompt = [ChatMessage(role=message.role, content=message.content) for message in history]
        elif messages:
            prompt = list(messages)
        else:
            prompt = [ChatMessage(role="user", content=question)]
        citations: list[Citation] = []
        if use_rag:
            rag_question = question or next((m.content for m in reversed(prompt) if m.role == "user"), "")
            hits = await self.search_documents(rag_question, rag_k or self.settings.rag_top_k)
            system_text, citations = build_rag_prompt(rag_question, hits)
            if system_text:
                prompt = _with_system(prompt, system_text)

        request = QueryRequest(
            messages=prompt,
            mode=mode,
            aggregation=aggregation,  # type: ignore[arg-type]
            options=dict(options or {}),
            timeout_s=timeout_s,
            request_id=request_id,
        )
        active = _ActiveQuery(request_id=request_id, owner=owner, task=asyncio.current_task())
        self._active[request_id] = active
        record = AnswerRecord()
        events = self.coordinator.query(request)
        logger.info("query %s: mode=%s rag=%s session=%s", request_id, mode, use_rag, session_id or "-")
        try:
            yield AskStarted(request_id=request_id, session_id=session_id, citations=citations)
            async for event in events:
                record.apply(event)
                yield event
                if isinstance(event, QueryFinished | QueryFailed):
                    break
        finally:
            self._active.pop(request_id, None)
            with contextlib.suppress(Exception):
                await events.aclose()  # an early close cancels the query on the agents
            if record.finished is None and record.failed is None:
                record.failed = QueryFailed(
                    request_id=request_id, error="stopped", code="cancelled", partial_text=record.text
                )
            if session_id:
                await self._store_answer(session_id, mode, record, citations)

    async def _store_answer(
        self, session_id: str, mode: str, record: AnswerRecord, citations: list[Citation]
    ) -> None:
        """Keep the answer (or what arrived of it) with who answered; a lost write is logged, never raised."""
        if record.finished is None and not record.text:
            return
        try:
            await asyncio.shield(
                self._in_thread(
                    self.sessions.add_message,
                    session_id,
                    "assistant",
                    record.text,
                    agents=record.agents,
                    models=record.models,
                    mode=mode,
                    citations=[citation.model_dump(mode="json") for citation in citations],
                    stats=stats_of(record, self._simulated_cache),
                )
            )
        except Exception:  # noqa: BLE001 - the user already saw the answer; losing its copy is logged
            logger.warning("could not store the answer in session %s", session_id, exc_info=True)

    async def cancel(self, request_id: str) -> bool:
        """Stop a running query on its agent(s); the stream ends with a ``cancelled`` failure."""
        active = self._active.get(request_id)
        try:
            found = bool(await self.coordinator.cancel(request_id))
        except Exception:  # noqa: BLE001
            logger.warning("coordinator cancel of %s failed", request_id, exc_info=True)
            found = False
        if active is not None and not active.cancel_requested:
            active.cancel_requested = True
            asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self._force_stop, request_id)
        return found or active is not None

    def _force_stop(self, request_id: str) -> None:
        """The coordinator did not end a cancelled stream in time: stop waiting for it."""
        active = self._active.get(request_id)
        if active is not None and active.task is not None and not active.task.done():
            logger.warning("query %s did not end %.0f s after cancel; stopping its stream", request_id, CANCEL_GRACE_S)
            active.task.cancel()

    async def cancel_owner(self, owner: str) -> int:
        """Cancel every running query of one browser session (the stop button)."""
        request_ids = [active.request_id for active in self._active.values() if active.owner == owner]
        for request_id in request_ids:
            await self.cancel(request_id)
        return len(request_ids)

    # ------------------------------------------------------------------ sessions

    async def list_sessions(self) -> list[SessionInfo]:
        return await self._in_thread(self.sessions.list_sessions)

    async def create_session(self, title: str | None = None) -> SessionInfo:
        return await self._in_thread(self.sessions.create_session, title or None)

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self._in_thread(self.sessions.get_session, session_id)

    async def history(self, session_id: str) -> list[StoredMessage]:
        return await self._in_thread(self.sessions.get_history, session_id)

    async def rename_session(self, session_id: str, title: str) -> SessionInfo:
        return await self._in_thread(self.sessions.rename_session, session_id, title)

    async def delete_session(self, session_id: str) -> None:
        await self._in_thread(self.sessions.delete_session, session_id)

    # ------------------------------------------------------------------ documents

    async def add_document_file(
        self, path: str, name: str | None = None, progress: Callable[[float, str], None] | None = None
    ) -> Document:
        rag = await self.rag()
        return await self._in_thread(lambda: rag.add_file(path, name=name, progress=progress))

    async def add_document_text(
        self, text: str, name: str, progress: Callable[[float, str], None] | None = None
    ) -> Document:
        rag = await self.rag()
        return await self._in_thread(lambda: rag.add_text(text, name, progress=progress))

    async def list_documents(self) -> list[Document]:
        rag = await self.rag()
        return await self._in_thread(rag.list_documents)

    async def delete_document(self, document_id: str) -> None:
        rag = await self.rag()
        await self._in_thread(rag.delete_document, document_id)

    async def search_documents(self, query: str, k: int = 5) -> list[SearchHit]:
        rag = await self.rag()
        return await self._in_thread(rag.search, query, k)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    async def _in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if kwargs:
            return await anyio.to_thread.run_sync(lambda: function(*args, **kwargs))
        return await anyio.to_thread.run_sync(function, *args)


def _with_system(prompt: list[ChatMessage], system_text: str) -> list[ChatMessage]:
    """Put the RAG sources after the caller's own system messages, before the conversation."""
    index = 0
    while index < len(prompt) and prompt[index].role == "system":
        index += 1
    return [*prompt[:index], ChatMessage(role="system", content=system_text), *prompt[index:]]

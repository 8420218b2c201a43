"""Embeddings through the cluster: split the texts into bounded batches, send each to an agent that has the model,
and put the vectors back together in input order (docs/api.md "Embeddings", docs/protocol.md "Embeddings").

An agent qualifies when its runtime offers the model in any state — its assignment, a placement extra (``also``,
e.g. ``SLB_PLACEMENT_EMBEDDING_MODEL``), a model in its runtime's memory or on its disk — and it is online,
reachable and not in quarantine. Batches go to the qualifying agent with the fewest embed jobs outstanding (ready
before loaded before on-disk), at most its slot count at once; a batch that fails or times out is tried once more
on another agent. Vectors are passed on exactly as the runtime gave them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.protocol import Cancel, Job, Message, Result, Topics
from broker.protocol.messages import MAX_EMBED_INPUTS, MAX_PROMPT_CHARS
from broker.scheduling.names import find_model
from broker.scheduling.registry import AgentRecord, ClusterState

logger = logging.getLogger(__name__)

STATE_ORDER = {"ready": 0, "loaded": 1, "local": 2}
"""Where the model is on an agent, best first: a model on disk must load before it answers."""
TRIES_PER_BATCH = 2


class EmbeddingFailed(Exception):
    """Why an embeddings request has no answer; ``code`` is one of ``no_agent``, ``failed``, ``timeout``,
    ``bad_request`` (the API maps them to 503, 502, 504, 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EmbeddingAnswer:
    """Vectors in input order, the agents' name for the model, summed usage and who computed them."""

    model: str
    vectors: list[Any]
    prompt_tokens: int | None
    agents: tuple[str, ...]


@dataclass
class _Pending:
    """One batch on one agent: the chunks arrive (possibly out of order) until the ``done`` one."""

    agent_id: str
    size: int
    future: asyncio.Future[list[Any]]
    vectors: dict[int, Any] = field(default_factory=dict)
    chunks: dict[int, Result] = field(default_factory=dict)
    last_seq: int | None = None
    prompt_tokens: int | None = None


def batches(inputs: list[str], batch_inputs: int) -> list[tuple[int, list[str]]]:
    """The inputs in runs of at most ``batch_inputs`` texts and :data:`MAX_PROMPT_CHARS` characters (one job
    each), with the index of each run's first text. A single text over the character bound is the caller's to
    refuse; it gets a batch of its own here."""
    size = max(1, min(batch_inputs, MAX_EMBED_INPUTS))
    found: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = chars = 0
    for index, text in enumerate(inputs):
        if current and (len(current) >= size or chars + len(text) > MAX_PROMPT_CHARS):
            found.append((start, current))
            current, start, chars = [], index, 0
        current.append(text)
        chars += len(text)
    if current:
        found.append((start, current))
    return found


class EmbeddingRunner:
    """Runs embeddings requests for the coordinator; :meth:`deliver` takes the result messages of embed jobs."""

    def __init__(self, *, state: Callable[[], ClusterState], publish: Callable[[str, Message], None],
                 topics: Topics, quarantined: Callable[[], Mapping[str, str]], batch_inputs: int,
                 timeout_s: float) -> None:
        self._state = state
        self._publish = publish
        self._topics = topics
        self._quarantined = quarantined
        self.batch_inputs = batch_inputs
        self.timeout_s = timeout_s
        self._pending: dict[str, _Pending] = {}
        self._outstanding: dict[str, int] = {}

    # ---------------------------------------------------------------- who can embed

    def candidates(self, model: str) -> list[tuple[AgentRecord, str]]:
        """Agents that can embed with ``model`` now, best first, each with its own name for the model."""
        quarantined = self._quarantined()
        found: list[tuple[int, int, str, AgentRecord, str]] = []
        for record in self._state().agents.values():
            if not record.online or record.agent_id in quarantined:
                continue
            offers = record.offers()
            name = find_model(model, [offer.name for offer in offers])
            offer = next((offer for offer in offers if offer.name == name), None)
            if offer is None:
                continue
            found.append((STATE_ORDER.get(offer.state, 3), self._outstanding.get(record.agent_id, 0),
                          record.agent_id, record, offer.name))
        found.sort(key=lambda item: item[:3])
        return [(record, name) for *_, record, name in found]

    def no_agent_reason(self, model: str) -> str:
        online = [record for record in self._state().agents.values() if record.online]
        if not online:
            return f"no agent is online to compute embeddings with model {model!r}"
        have = sorted({offer.name for record in online for offer in record.offers()})[:12]
        return (f"no agent serves embedding model {model!r} (models in the cluster: {', '.join(have) or 'none'}); "
                "pull it on an Ollama agent (POST /api/pull) or set SLB_PLACEMENT_EMBEDDING_MODEL so placement "
                "keeps it beside the chat models")

    # ---------------------------------------------------------------- running

    async def embed(self, model: str, inputs: list[str], timeout_s: float | None = None,
                    options: dict[str, Any] | None = None) -> EmbeddingAnswer:
        """Vectors for ``inputs`` (in order) from the agents that have ``model``; :class:`EmbeddingFailed` if not."""
        if not inputs:
            raise EmbeddingFailed("bad_request", "no input to embed")
        if not self.candidates(model):
            raise EmbeddingFailed("no_agent", self.no_agent_reason(model))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        parts = batches(inputs, self.batch_inputs)
        slots = asyncio.Semaphore(max(1, sum(record.slots for record, _ in self.candidates(model))))
        names: list[str] = []
        agents: list[str] = []
        tokens: list[int | None] = []

        async def run(batch: list[str]) -> list[Any]:
            async with slots:
                vectors, name, agent_id, prompt_tokens = await self._batch(model, batch, deadline, options or {})
                names.append(name)
                agents.append(agent_id)
                tokens.append(prompt_tokens)
                return vectors

        tasks = [asyncio.ensure_future(run(batch)) for _, batch in parts]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        vectors = [vector for result in results for vector in result]
        counted = [count for count in tokens if count is not None]
        return EmbeddingAnswer(names[0] if names else model, vectors, sum(counted) if counted else None,
                               tuple(dict.fromkeys(agents)))

    async def _batch(self, model: str, inputs: list[str], deadline: float,
                     options: dict[str, Any]) -> tuple[list[Any], str, str, int | None]:
        """One batch, tried on up to :data:`TRIES_PER_BATCH` agents."""
        tried: list[str] = []
        errors: list[str] = []
        for _ in range(TRIES_PER_BATCH):
            choices = [(record, name) for record, name in self.candidates(model) if record.agent_id not in tried]
            free = [(record, name) for record, name in choices
                    if self._outstanding.get(record.agent_id, 0) < record.slots]
            if not choices:
                break
            record, name = (free or choices)[0]
            tried.append(record.agent_id)
            try:
                vectors, prompt_tokens = await self._send(record.agent_id, name, inputs, deadline, options)
            except EmbeddingFailed as error:
                errors.append(f"{record.agent_id}: {error.message}")
                if error.code == "timeout" and time.monotonic() >= deadline:
                    raise EmbeddingFailed("timeout", "; ".join(errors)) from None
                continue
            return vectors, name, record.agent_id, prompt_tokens
        if not errors:
            raise EmbeddingFailed("no_agent", self.no_agent_reason(model))
        raise EmbeddingFailed("failed", f"embeddings with {model!r} failed: " + "; ".join(errors))

    async def _send(self, agent_id: str, model: str, inputs: list[str], deadline: float,
                    options: dict[str, Any]) -> tuple[list[Any], int | None]:
        wire_id = f"emb-{uuid.uuid4().hex}"  # unique across restarts: an agent runs a request id only once
        remaining = max(0.1, deadline - time.monotonic())
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(agent_id, len(inputs), future)
        self._pending[wire_id] = pending
        self._outstanding[agent_id] = self._outstanding.get(agent_id, 0) + 1
        try:
            self._publish(self._topics.job(agent_id), Job(request_id=wire_id, model=model, kind="embed",
                                                            inputs=inputs, options=options,
                                                            deadline=time.time() + remaining))
            try:
                vectors = await asyncio.wait_for(asyncio.shield(future), remaining)
            except asyncio.TimeoutError:
                raise EmbeddingFailed("timeout", f"no vectors within {remaining:.0f} s") from None
            return vectors, pending.prompt_tokens
        finally:
            if not future.done():
                future.cancel()
                with contextlib.suppress(Exception):
                    self._publish(self._topics.cancel(agent_id), Cancel(request_id=wire_id, reason="embeddings "
                                                                       "request ended"))
            self._pending.pop(wire_id, None)
            self._outstanding[agent_id] -= 1
            if not self._outstanding[agent_id]:
                del self._outstanding[agent_id]

    def deliver(self, agent_id: str, result: Result) -> bool:
        """Take a result message if it answers an embed job (True), else leave it to the chat path (False)."""
        pending = self._pending.get(result.request_id)
        if pending is None:
            return False
        if pending.agent_id != agent_id or pending.future.done():
            return True
        if result.error is not None or result.error_code is not None:
            pending.future.set_exception(EmbeddingFailed("failed", f"{result.error_code or 'error'}: "
                                                                   f"{result.error or 'no message'}"))
            return True
        pending.chunks[result.seq] = result
        if result.done:
            pending.last_seq = result.seq
            pending.prompt_tokens = result.stats.prompt_tokens if result.stats is not None else None
        if pending.last_seq is None or len(pending.chunks) < pending.last_seq + 1:
            return True
        vectors: dict[int, Any] = {}
        for seq in range(pending.last_seq + 1):
            chunk = pending.chunks.get(seq)
            if chunk is None:
                return True
            for offset, vector in enumerate(chunk.embeddings or []):
                vectors[chunk.embedding_index + offset] = vector
        if sorted(vectors) != list(range(pending.size)):
            pending.future.set_exception(EmbeddingFailed(
                "failed", f"agent {agent_id} answered {len(vectors)} vector(s) for {pending.size} input(s)"))
            return True
        pending.future.set_result([vectors[index] for index in range(pending.size)])
        return True

"""Queries in flight: one agent's attempt at a job, the query it belongs to, and the ledger of both.

Pieces the coordinator composes (tested without a broker):

* :class:`ReorderBuffer` releases result chunks in ``seq`` order; duplicates
  (QoS 1 may deliver twice) are dropped, and a gap that never fills shows up
  as no in-order progress, which the stall timer turns into a failover. What
  waits behind a gap is bounded in characters and chunks, and a gap that stays
  open for the between-chunks stall time fails the attempt even before its
  first token (issue 13.7: a gap at seq 0 held 330 MB for 20 s).
* :class:`EchoFilter` drops text a continuing agent repeats from the partial
  answer it was given, so the caller never sees text twice.
* :class:`Attempt` holds one job's progress and says when it has stalled — no
  first token in time (the allowance grows with the jobs queued ahead of it on
  the agent), or no tokens for a while after that. A job that keeps producing
  is never cut by time: only the query's own deadline ends it — but an answer
  longer than ``max_chars`` (with the text it continues) ends as ``too_long``.
* :class:`Run` is one query in progress; its inbox carries the signals its
  attempts wait on (result chunks, an agent gone, a cancel).
* :class:`InFlight` is the one owner of who works on what: runs by request id,
  live attempts by wire id, and jobs per agent (routing reads those).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from broker.coordinator.contract import QueryEvent, QueryRequest
from broker.protocol.messages import MAX_PROMPT_CHARS, Result, ResultStats, ToolCall

MAX_PENDING_CHUNKS = 4096
"""Out-of-order chunks held at most; past that the gap is treated as a stall."""
MAX_ANSWER_CHARS = MAX_PROMPT_CHARS
"""Default cap on one answer's text (the protocol's ``MAX_PROMPT_CHARS``: a longer one could not be handed to
another agent as a prefix); ``CoordinatorSettings.max_answer_chars`` sets it."""


class ReorderBuffer:
    """Chunks in sequence order; nothing after the ``done`` chunk.

    At most ``max_pending_chars`` characters (and :data:`MAX_PENDING_CHUNKS` chunks) wait behind a gap; a chunk
    that would pass either is dropped and the buffer reports :attr:`overflowed`, which fails the attempt.
    """

    def __init__(self, max_pending_chars: int = MAX_ANSWER_CHARS) -> None:
        self.next_seq = 0
        self.finished = False
        self.duplicates = 0
        self.max_pending_chars = max_pending_chars
        self.pending_chars = 0
        self.overflowed = False
        self._pending: dict[int, Result] = {}

    def push(self, result: Result) -> list[Result]:
        """Accept one chunk; return the chunks now deliverable in order (possibly none)."""
        if self.finished or result.seq < self.next_seq or result.seq in self._pending:
            self.duplicates += 1
            return []
        if result.seq != self.next_seq:
            if self.overflowed or len(self._pending) >= MAX_PENDING_CHUNKS \
                    or self.pending_chars + len(result.delta) > self.max_pending_chars:
                self.overflowed = True  # the gap is not going to be worth waiting for; drop, do not hold
                return []
            self.pending_chars += len(result.delta)
            self._pending[result.seq] = result
            return []
        released = [result]
        self.next_seq += 1
        while not (released[-1].done or released[-1].error) and self.next_seq in self._pending:
            chunk = self._pending.pop(self.next_seq)
            self.pending_chars -= len(chunk.delta)
            released.append(chunk)
            self.next_seq += 1
        if released[-1].done or released[-1].error:
            self.close()
        return released

    def close(self) -> None:
        """Take nothing more and let go of what waits (the attempt ended)."""
        self.finished = True
        self._pending.clear()
        self.pending_chars = 0

    @property
    def waiting_for_gap(self) -> bool:
        return bool(self._pending)


class EchoFilter:
    """After a failover the new agent continues from ``prefix``; if it starts by repeating it, drop the repeat."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._held = ""
        self._decided = not prefix

    def feed(self, text: str) -> str:
        if self._decided:
            return text
        self._held += text
        if self.prefix.startswith(self._held):
            if len(self._held) == len(self.prefix):
                self._decided, self._held = True, ""
            return ""
        self._decided = True
        held, self._held = self._held, ""
        return held[len(self.prefix):] if held.startswith(self.prefix) else held

    def flush(self) -> str:
        """At the end: text held because it looked like an echo but never completed one is real text."""
        self._decided = True
        held, self._held = self._held, ""
        return held


@dataclass
class Attempt:
    """One job sent to one agent. ``deadline`` is the query's; ``first_chunk_s`` (when set) replaces the
    configured wait for the first token, e.g. for a job queued behind others on a one-slot runtime."""

    wire_id: str
    agent_id: str
    model: str
    started_at: float
    deadline: float
    prefix: str = ""
    first_chunk_s: float | None = None
    first_chunk_note: str = ""
    max_chars: int = MAX_ANSWER_CHARS
    """The answer's text (``prefix`` included) may not pass this; past it the attempt ends as ``too_long``."""
    solo: bool = False
    """Nothing else ran on the agent when the job was sent (a speed measured on it is the agent's own)."""
    claimed_tokens_per_s: float | None = None
    """What the agent's telemetry or benchmark claimed for this model when the job was sent."""
    output_allowed: bool = True
    """The question lets the model say something (an empty answer is then no answer)."""
    expected_tokens: float = 0.0
    """The answer length routing expected when it sent the job (for the queue estimate of later jobs)."""
    shape: tuple[object, ...] | None = None
    """The question's shape for the answer-length predictor (:func:`broker.scheduling.estimates.prompt_shape`)."""
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Function calls of the answer (docs/protocol.md "Tools"); a failover never continues an answer with tools."""
    first_chunk_at: float | None = None
    last_progress_at: float | None = None
    done_at: float | None = None
    gap_since: float | None = None
    """When chunks began to wait behind a missing one (``None``: no gap)."""
    stats: ResultStats | None = None
    error: str | None = None
    error_code: str | None = None
    done: bool = False
    rejected: str | None = None
    """Why a finished answer was judged unusable (empty, a lie about its speed); set when the attempt ends."""
    strike_if_answered: str | None = None
    """A strike for this agent should another agent answer the same question (it answered empty)."""
    buffer: ReorderBuffer = field(init=False)
    echo: EchoFilter = field(init=False)

    def __post_init__(self) -> None:
        self.echo = EchoFilter(self.prefix)
        self.buffer = ReorderBuffer(max(0, self.max_chars - len(self.prefix)))

    def accept(self, result: Result, now: float) -> str:
        """Take one chunk; return the new text (in order, echo removed) it releases."""
        new_text = []
        size = len(self.prefix) + len(self.text)
        for chunk in self.buffer.push(result):
            self.last_progress_at = now
            if self.first_chunk_at is None:
                self.first_chunk_at = now
            if chunk.delta:
                piece = self.echo.feed(chunk.delta)
                if size + len(piece) > self.max_chars:
                    self._too_long(now, size + len(piece))
                    break
                size += len(piece)
                new_text.append(piece)
            if chunk.error:
                self.error, self.error_code = chunk.error, chunk.error_code
            if chunk.tool_calls:
                self.tool_calls.extend(chunk.tool_calls)
            if chunk.done or chunk.error:
                self.done = True
                self.done_at = now
                self.stats = chunk.stats
                new_text.append(self.echo.flush())
        self.gap_since = None if not self.buffer.waiting_for_gap else (self.gap_since or now)
        text = "".join(new_text)
        self.text += text
        return text

    def _too_long(self, now: float, would_be: int) -> None:
        self.error = (f"the answer passed the limit of {self.max_chars:,} characters (max_answer_chars): the next "
                      f"chunk would have made it {would_be:,}")
        self.error_code = "too_long"
        self.done = True
        self.done_at = now
        self.buffer.close()

    def first_token_limit(self, first_chunk_s: float) -> float:
        """Seconds this attempt may take to its first token (the allowance, when one was set)."""
        return self.first_chunk_s if self.first_chunk_s is not None else first_chunk_s

    def stall_reason(self, now: float, first_chunk_s: float, between_chunks_s: float) -> str | None:
        """Why this attempt counts as stalled at ``now``, or ``None``; a job producing tokens never is."""
        if self.done:
            return None
        if self.buffer.overflowed:
            return (f"chunk {self.buffer.next_seq} never arrived, and more than {self.buffer.max_pending_chars:,} "
                    f"characters piled up behind it")
        if self.gap_since is not None and now - self.gap_since >= between_chunks_s:
            return (f"chunk {self.buffer.next_seq} never arrived: later chunks waited {between_chunks_s:g} s "
                    f"for it")
        if self.last_progress_at is None:
            limit = self.first_token_limit(first_chunk_s)
            if now - self.started_at >= limit:
                return f"no first token within {limit:.0f} s{self.first_chunk_note}"
            return None
        if now - self.last_progress_at >= between_chunks_s:
            gap = f" (chunk {self.buffer.next_seq} missing)" if self.buffer.waiting_for_gap else ""
            return f"no tokens for {between_chunks_s:g} s after {len(self.prefix) + len(self.text):,} characters{gap}"
        return None

    def next_check(self, first_chunk_s: float, between_chunks_s: float) -> float:
        """When :meth:`stall_reason` could next become true (or the query's deadline come)."""
        gap = self.gap_since + between_chunks_s if self.gap_since is not None else self.deadline
        if self.last_progress_at is None:
            return min(self.deadline, gap, self.started_at + self.first_token_limit(first_chunk_s))
        return min(self.deadline, gap, self.last_progress_at + between_chunks_s)


# ---------------------------------------------------------------- one query in progress


@dataclass(frozen=True)
class CancelSignal:
    """The caller (or ``stop()``) cancelled the query."""

    reason: str


@dataclass(frozen=True)
class GoneSignal:
    """The agent working on ``wire_id`` went away (offline, or its telemetry stopped)."""

    wire_id: str
    reason: str


Signal = Result | CancelSignal | GoneSignal
"""What a run's attempts wait for: a result chunk, an agent gone, or a cancel."""


@dataclass
class Run:
    """One query in progress: its deadline, the caller's event sink, and the inbox its attempts wait on."""

    request: QueryRequest
    started_at: float
    deadline: float
    emit: Callable[[QueryEvent], None]
    inbox: collections.deque[Signal] = field(default_factory=collections.deque)
    _waiter: asyncio.Future[None] | None = field(default=None, repr=False)
    counter: int = 0
    first_text_at: float | None = None
    cancel_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def timeout_s(self) -> float:
        """The whole query's time budget (the caller's ``timeout_s``, else the default deadline)."""
        return self.deadline - self.started_at

    def deadline_passed(self, now: float) -> str | None:
        """Why the query must end at ``now`` because of its deadline, or ``None``."""
        if now < self.deadline:
            return None
        return f"the query's deadline of {self.timeout_s:g} s passed"

    def next_wire_id(self) -> str:
        """A fresh job id per attempt, so a late chunk of an abandoned attempt cannot pass for the new one."""
        self.counter += 1
        return f"{self.request_id[:48]}.{self.counter}"

    def text_arrived(self, now: float) -> None:
        if self.first_text_at is None:
            self.first_text_at = now

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self._put(CancelSignal(reason))

    def deliver(self, result: Result) -> None:
        self._put(result)

    def attempt_gone(self, wire_id: str, reason: str) -> None:
        self._put(GoneSignal(wire_id, reason))

    def _put(self, signal: Signal) -> None:
        self.inbox.append(signal)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_signal(self, until: float) -> Signal | None:
        """The next signal, or ``None`` once monotonic time ``until`` has come (one reader at a time).

        A bare future woken by :meth:`_put` rather than ``wait_for(queue.get())``, which wraps every wait in a
        task of its own (Python 3.11): half the CPU per chunk and one loop iteration from arrival to reader, the
        first token included (docs/benchmarks.md, *Overhead*).
        """
        if self.inbox:
            return self.inbox.popleft()
        timeout = until - time.monotonic()
        if timeout <= 0:
            return None
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self.inbox.popleft() if self.inbox else None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# ---------------------------------------------------------------- the ledger


class InFlight:
    """Who works on what; the only place these tables change.

    Runs by request id (for ``cancel`` and duplicate ids), live attempts by wire id (to hand each result
    chunk to its run, and to tell runs when an agent goes away), and this coordinator's jobs per agent plus
    the jobs the agent reports beyond those (routing's view of an agent's load).
    """

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._attempts: dict[str, tuple[Run, Attempt]] = {}
        self._own: dict[str, int] = {}
        self._external: dict[str, int] = {}

    # ---- runs

    def open_run(self, run: Run) -> None:
        self._runs[run.request_id] = run

    def close_run(self, run: Run) -> None:
        if self._runs.get(run.request_id) is run:
            del self._runs[run.request_id]

    def run(self, request_id: str) -> Run | None:
        return self._runs.get(request_id)

    def runs(self) -> list[Run]:
        return list(self._runs.values())

    # ---- attempts

    def add_attempt(self, run: Run, attempt: Attempt) -> None:
        self._attempts[attempt.wire_id] = (run, attempt)
        self._own[attempt.agent_id] = self._own.get(attempt.agent_id, 0) + 1

    def remove_attempt(self, attempt: Attempt) -> bool:
        """Forget ``attempt``; ``False`` when it was already gone (ending an attempt twice is harmless)."""
        if self._attempts.pop(attempt.wire_id, None) is None:
            return False
        count = self._own.get(attempt.agent_id, 1) - 1
        if count > 0:
            self._own[attempt.agent_id] = count
        else:
            self._own.pop(attempt.agent_id, None)
        return True

    def find(self, wire_id: str) -> tuple[Run, Attempt] | None:
        return self._attempts.get(wire_id)

    def attempt_of(self, run: Run, wire_id: str) -> Attempt | None:
        """``run``'s live attempt with ``wire_id``, or ``None``."""
        entry = self._attempts.get(wire_id)
        return entry[1] if entry is not None and entry[0] is run else None

    def attempts_of(self, run: Run) -> list[Attempt]:
        return [attempt for owner, attempt in self._attempts.values() if owner is run]

    def jobs_by_agent(self) -> dict[str, list[Attempt]]:
        """Every live attempt per agent, oldest first (the order the agent queues them in)."""
        found: dict[str, list[Attempt]] = {}
        for _, attempt in self._attempts.values():
            found.setdefault(attempt.agent_id, []).append(attempt)
        return found

    def attempts_on(self, agent_id: str) -> list[tuple[Run, Attempt]]:
        return [(run, attempt) for run, attempt in self._attempts.values() if attempt.agent_id == agent_id]

    # ---- load per agent

    def report_load(self, agent_id: str, reported_jobs: int) -> None:
        """The agent's telemetry counts all its jobs; what exceeds ours came from elsewhere."""
        self._external[agent_id] = max(0, reported_jobs - self._own.get(agent_id, 0))

    @property
    def own_jobs(self) -> Mapping[str, int]:
        """Jobs this coordinator has on each agent (a read-only view)."""
        return MappingProxyType(self._own)

    @property
    def external_jobs(self) -> Mapping[str, int]:
        """Jobs each agent reported beyond this coordinator's (a read-only view)."""
        return MappingProxyType(self._external)

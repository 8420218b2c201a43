"""One agent's attempt at a job: ordered chunks, stall detection, seamless continuation.

Pure pieces the coordinator composes (tested without a broker):

* :class:`ReorderBuffer` releases result chunks in ``seq`` order; duplicates
  (QoS 1 may deliver twice) are dropped, and a gap that never fills shows up
  as no in-order progress, which the stall timer turns into a failover.
* :class:`EchoFilter` drops text a continuing agent repeats from the partial
  answer it was given, so the caller never sees text twice.
* :class:`Attempt` holds one job's progress and says when it has stalled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.protocol.messages import Result, ResultStats

MAX_PENDING_CHUNKS = 4096
"""Out-of-order chunks held at most; past that the gap is treated as a stall."""


class ReorderBuffer:
    """Chunks in sequence order; nothing after the ``done`` chunk."""

    def __init__(self) -> None:
        self.next_seq = 0
        self.finished = False
        self.duplicates = 0
        self._pending: dict[int, Result] = {}

    def push(self, result: Result) -> list[Result]:
        """Accept one chunk; return the chunks now deliverable in order (possibly none)."""
        if self.finished or result.seq < self.next_seq or result.seq in self._pending:
            self.duplicates += 1
            return []
        self._pending[result.seq] = result
        released: list[Result] = []
        while self.next_seq in self._pending:
            chunk = self._pending.pop(self.next_seq)
            released.append(chunk)
            self.next_seq += 1
            if chunk.done or chunk.error:
                self.finished = True
                self._pending.clear()
                break
        return released

    @property
    def waiting_for_gap(self) -> bool:
        return bool(self._pending)

    @property
    def overflowed(self) -> bool:
        return len(self._pending) > MAX_PENDING_CHUNKS


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
    """One job sent to one agent."""

    wire_id: str
    agent_id: str
    model: str
    started_at: float
    deadline: float
    prefix: str = ""
    text: str = ""
    first_chunk_at: float | None = None
    last_progress_at: float | None = None
    stats: ResultStats | None = None
    error: str | None = None
    error_code: str | None = None
    done: bool = False
    buffer: ReorderBuffer = field(default_factory=ReorderBuffer)
    echo: EchoFilter = field(init=False)

    def __post_init__(self) -> None:
        self.echo = EchoFilter(self.prefix)

    def accept(self, result: Result, now: float) -> str:
        """Take one chunk; return the new text (in order, echo removed) it releases."""
        new_text = []
        for chunk in self.buffer.push(result):
            self.last_progress_at = now
            if self.first_chunk_at is None:
                self.first_chunk_at = now
            if chunk.delta:
                new_text.append(self.echo.feed(chunk.delta))
            if chunk.error:
                self.error, self.error_code = chunk.error, chunk.error_code
            if chunk.done or chunk.error:
                self.done = True
                self.stats = chunk.stats
                new_text.append(self.echo.flush())
        text = "".join(new_text)
        self.text += text
        return text

    def stall_reason(self, now: float, first_chunk_s: float, between_chunks_s: float) -> str | None:
        """Why this attempt counts as stalled at ``now``, or ``None``."""
        if self.done:
            return None
        if self.buffer.overflowed:
            return f"chunk {self.buffer.next_seq} never arrived"
        if now >= self.deadline:
            return f"passed its deadline after {now - self.started_at:.1f} s"
        if self.last_progress_at is None:
            if now - self.started_at >= first_chunk_s:
                return f"no first chunk within {first_chunk_s:g} s"
            return None
        if now - self.last_progress_at >= between_chunks_s:
            gap = f" (chunk {self.buffer.next_seq} missing)" if self.buffer.waiting_for_gap else ""
            return f"no new chunk for {between_chunks_s:g} s{gap}"
        return None

    def next_check(self, first_chunk_s: float, between_chunks_s: float) -> float:
        """When :meth:`stall_reason` could next become true."""
        if self.last_progress_at is None:
            return min(self.deadline, self.started_at + first_chunk_s)
        return min(self.deadline, self.last_progress_at + between_chunks_s)

"""Run jobs on the backend and stream the answers back as batched result chunks.

Rules (docs/agent.md, "How jobs are handled"): the first chunk goes out the
moment the backend yields its first token; after it, at most one message per
``chunk_interval`` or per ``chunk_max_tokens`` tokens. A request id runs at
most once (QoS 1 may deliver twice). Cancel, deadline and stall all end the
job the same way: the job's task is cancelled, which closes the backend stream
at once, and a final chunk says why. Every failure becomes an error chunk;
nothing here may kill the agent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.backends.base import Backend, BackendError, BackendUnreachable, ChatDelta, ChatDone, StreamBroken
from agent.embeddings import embed_results
from broker.protocol import Job, Result, ResultStats, is_valid_agent_id
from broker.protocol.messages import ToolCall

logger = logging.getLogger(__name__)

ServeCheck = Callable[[str], "tuple[str, str] | None"]
"""``check(model)`` → None when the job may run, else ``(error_code, message)``."""


class RecentStats:
    """Tokens/s and time to first token of jobs finished within a sliding window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, str, float | None, float | None]] = collections.deque()

    def add(self, model: str, tokens_per_s: float | None, ttft_s: float | None) -> None:
        self._samples.append((time.monotonic(), model, tokens_per_s, ttft_s))
        self._trim()

    def _trim(self) -> None:
        horizon = time.monotonic() - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def summary(self, model: str | None = None) -> tuple[float | None, float | None]:
        """Median tokens/s and median TTFT over the window (None when no job finished in it)."""
        self._trim()
        samples = [s for s in self._samples if model is None or s[1] == model]
        speeds = [s[2] for s in samples if s[2] is not None]
        ttfts = [s[3] for s in samples if s[3] is not None]
        return (
            round(statistics.median(speeds), 2) if speeds else None,
            round(statistics.median(ttfts), 4) if ttfts else None,
        )


class SlotGate:
    """How many jobs may run on the runtime at once: resizable, and lendable whole to a probe.

    A semaphore cannot shrink, and the runtime profile (agent/runtime_profile.py) learns the real slot count only
    after the model is warm; nor can a semaphore give the runtime to one caller alone, which the profile probe
    needs because a job running beside it would disturb both (llama-cpp-python interrupts one of them).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.busy = 0
        self._exclusive = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _wake(self) -> None:
        """Let every waiter look again (they resume in arrival order, so the queue stays first come first served)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    async def acquire(self) -> None:
        await self._wait_until(lambda: not self._exclusive and self.busy < self.capacity)
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
        self._wake()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._wake()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Wait until no job runs, hold new ones back, and hand the runtime to the caller alone."""
        await self._wait_until(lambda: not self._exclusive)
        self._exclusive = True
        try:
            await self._wait_until(lambda: self.busy == 0)
            yield
        finally:
            self._exclusive = False
            self._wake()


class ResultStream:
    """Sequence numbers and batching for one answer."""

    def __init__(
        self,
        publish: Callable[[Result], None],
        request_id: str,
        *,
        agent_id: str,
        model: str | None,
        interval_s: float,
        max_tokens: int,
    ) -> None:
        self._publish = publish
        self.request_id = request_id
        self.agent_id = agent_id
        self.model = model
        self.interval_s = interval_s
        self.max_tokens = max_tokens
        self.seq = 0
        self.text = ""
        self._pending: list[str] = []
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.finished = False

    def add(self, text: str) -> None:
        """Take a piece of text; send it now if it is the first or the batch is due, else later."""
        if self.finished or not text:
            return
        self.text += text
        self._pending.append(text)
        now = time.monotonic()
        if self.seq == 0 or len(self._pending) >= self.max_tokens or now - self._last_sent >= self.interval_s:
            self._flush()
        elif self._timer is None:
            delay = self.interval_s - (now - self._last_sent)
            self._timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self.finished:
            return
        self._send(Result(request_id=self.request_id, seq=self.seq, delta="".join(self._pending),
                          agent_id=self.agent_id, model=self.model))
        self._pending.clear()

    def _send(self, result: Result) -> None:
        self.seq += 1
        self._last_sent = time.monotonic()
        try:
            self._publish(result)
        except Exception:  # noqa: BLE001 - a publish failure must not kill the job runner
            logger.exception("publishing result %s/%d failed", result.request_id, result.seq)

    def finish(self, *, stats: ResultStats | None = None, error: str | None = None,
               error_code: str | None = None, tool_calls: list[ToolCall] | None = None) -> None:
        """Send the last chunk (with whatever text is still pending) exactly once."""
        if self.finished:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delta = "".join(self._pending)
        self._pending.clear()
        self._send(Result(request_id=self.request_id, seq=self.seq, delta=delta, done=True, error=error,
                          error_code=error_code, stats=stats, agent_id=self.agent_id, model=self.model,  # type: ignore[arg-type]
                          tool_calls=tool_calls or None))
        self.finished = True


@dataclass
class _Handle:
    job: Job
    stream: ResultStream
    received: float
    task: asyncio.Task[None] | None = None
    abort: tuple[str, str] | None = None
    first_token_at: float | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    stall_timer: asyncio.TimerHandle | None = None
    active_at: float = 0.0  # the backend's last sign of life (the stall timer re-arms itself from it)
    began: bool = False


class JobRunner:
    """Accepts jobs, runs up to ``max_parallel`` at once, queues ``max_queue`` more, refuses the rest."""

    def __init__(
        self,
        *,
        backend: Backend,
        publish: Callable[[Result], None],
        agent_id: str,
        max_parallel: int,
        max_queue: int,
        chunk_interval_s: float,
        chunk_max_tokens: int,
        stall_timeout_s: float,
        keep_alive: str | None,
        remembered_jobs: int,
        stats_window_s: float,
        check_model: ServeCheck,
        on_finished: Callable[[str, float | None, float | None], None] | None = None,
        on_backend_unreachable: Callable[[BackendUnreachable], None] | None = None,
    ) -> None:
        self.backend = backend
        self._publish = publish
        self.agent_id = agent_id
        self.max_parallel = max_parallel
        self.max_queue = max_queue
        self.chunk_interval_s = chunk_interval_s
        self.chunk_max_tokens = chunk_max_tokens
        self.stall_timeout_s = stall_timeout_s
        self.keep_alive = keep_alive
        self._remembered = remembered_jobs
        self._check_model = check_model
        self._on_finished = on_finished
        self._on_backend_unreachable = on_backend_unreachable
        self.slots = SlotGate(max_parallel)
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._cancelled_before_arrival: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._jobs: dict[str, _Handle] = {}
        self.running = 0
        self.queued = 0
        self.recent = RecentStats(stats_window_s)
        self.completed = 0
        self.failed = 0
        self.last_token_at = 0.0

    def set_capacity(self, slots: int) -> None:
        """The runtime runs ``slots`` requests at once: never send it more; queue the rest here."""
        self.max_parallel = max(1, slots)
        self.slots.set_capacity(self.max_parallel)

    def streaming(self, within_s: float) -> bool:
        """A job is running and the runtime produced a token within ``within_s``: that is proof of health."""
        return self.slots.busy > 0 and time.monotonic() - self.last_token_at < within_s

    # ------------------------------------------------------------------ intake (event loop thread)

    def _remember(self, mapping: collections.OrderedDict[Any, Any], key: Any, value: Any = None) -> None:
        mapping[key] = value
        while len(mapping) > self._remembered:
            mapping.popitem(last=False)

    def submit(self, job: Job) -> None:
        """Start or queue a job, or answer at once why it cannot run."""
        key = (job.request_id, job.attempt)
        if key in self._seen:
            logger.info("duplicate job %s (attempt %d) ignored", job.request_id, job.attempt)
            return
        self._remember(self._seen, key)
        if job.request_id in self._cancelled_before_arrival:
            self.reject(job.request_id, "cancelled", self._cancelled_before_arrival.pop(job.request_id), job.model)
            return
        late_by = time.time() - job.deadline
        if late_by >= 0:
            self.reject(job.request_id, "deadline",
                        f"deadline passed {late_by:.1f}s before the job reached the agent (check clock sync)",
                        job.model)
            return
        refusal = self._check_model(job.model)
        if refusal is not None:
            self.reject(job.request_id, refusal[0], refusal[1], job.model)
            return
        if self.running + self.queued >= self.max_parallel + self.max_queue:
            self.reject(job.request_id, "busy",
                        f"agent busy: {self.running} running, {self.queued} queued (max {self.max_queue})", job.model)
            return
        stream = ResultStream(self._publish, job.request_id, agent_id=self.agent_id, model=job.model,
                              interval_s=self.chunk_interval_s, max_tokens=self.chunk_max_tokens)
        handle = _Handle(job=job, stream=stream, received=time.monotonic())
        loop = asyncio.get_running_loop()
        remaining = job.deadline - time.time()
        handle.timers.append(loop.call_later(remaining, self._abort, handle, "deadline",
                                             "deadline passed while the job was queued or running"))
        previous = self._jobs.get(job.request_id)
        if previous is not None:
            self._abort(previous, "cancelled", "superseded by a new attempt of the same request")
        self._jobs[job.request_id] = handle
        self.queued += 1
        handle.task = loop.create_task(self._run(handle), name=f"job-{job.request_id}")
        handle.task.add_done_callback(lambda _task: self._after(handle))

    def reject(self, request_id: str, code: str, message: str, model: str | None = None) -> None:
        """Answer a job that will not run with one final error chunk."""
        logger.info("job %s refused: %s (%s)", request_id, message, code)
        self.failed += 1
        ResultStream(self._publish, request_id, agent_id=self.agent_id, model=model, interval_s=0,
                     max_tokens=1).finish(error=message, error_code=code)

    def reject_payload(self, payload: bytes, reason: str) -> None:
        """A job that failed validation: answer ``bad_job`` if its request id is readable, else only log."""
        request_id = None
        # RecursionError: deeply nested JSON ("[[[[…") must be dropped like any other junk, not escape the handler.
        with contextlib.suppress(ValueError, TypeError, AttributeError, RecursionError):
            candidate = json.loads(payload).get("request_id")
            if isinstance(candidate, str) and is_valid_agent_id(candidate):
                request_id = candidate
        if request_id is None:
            logger.warning("dropped a job without a readable request id: %s", reason)
            return
        key = (request_id, -1)
        if key in self._seen:
            return
        self._remember(self._seen, key)
        self.reject(request_id, "bad_job", f"invalid job: {reason}")

    def cancel(self, request_id: str, reason: str | None = None) -> None:
        message = f"cancelled: {reason}" if reason else "cancelled by the coordinator"
        handle = self._jobs.get(request_id)
        if handle is None:
            if not any(key[0] == request_id for key in reversed(self._seen)):
                self._remember(self._cancelled_before_arrival, request_id, message)
            return
        self._abort(handle, "cancelled", message)

    def _abort(self, handle: _Handle, code: str, message: str) -> None:
        if handle.abort is not None or handle.task is None or handle.task.done():
            return
        handle.abort = (code, message)
        handle.task.cancel()

    async def shutdown(self, message: str = "agent stopping") -> None:
        """End every job with an error chunk (the coordinator re-sends them elsewhere)."""
        handles = list(self._jobs.values())
        for handle in handles:
            self._abort(handle, "internal", message)
        tasks = [handle.task for handle in handles if handle.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # ------------------------------------------------------------------ running

    def _after(self, handle: _Handle) -> None:
        """A task cancelled before its first step never ran ``_run``: answer and clean up for it."""
        if handle.began:
            return
        self.queued -= 1
        self._cleanup(handle)
        code, message = handle.abort or ("internal", "job ended before it started")
        self.failed += 1
        handle.stream.finish(error=message, error_code=code)

    def _cleanup(self, handle: _Handle) -> None:
        for timer in handle.timers:
            timer.cancel()
        if handle.stall_timer is not None:
            handle.stall_timer.cancel()
        if self._jobs.get(handle.job.request_id) is handle:
            del self._jobs[handle.job.request_id]

    async def _run(self, handle: _Handle) -> None:
        handle.began = True
        queued = True
        try:
            await self.slots.acquire()
            try:
                queued = False
                self.queued -= 1
                self.running += 1
                try:
                    await self._stream(handle)
                finally:
                    self.running -= 1
            finally:
                self.slots.release()
        except asyncio.CancelledError:
            if handle.abort is None:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            code, message = handle.abort
            logger.info("job %s ended: %s", handle.job.request_id, message)
            self.failed += 1
            handle.stream.finish(error=message, error_code=code)
        except BackendError as error:
            logger.warning("job %s failed: %s", handle.job.request_id, error)
            self.failed += 1
            if isinstance(error, BackendUnreachable) and self._on_backend_unreachable is not None:
                self._on_backend_unreachable(error)
            handle.stream.finish(error=str(error), error_code=error.code)
        except Exception as error:  # noqa: BLE001 - one bad job never kills the agent
            logger.exception("job %s crashed", handle.job.request_id)
            self.failed += 1
            handle.stream.finish(error=f"internal agent error: {type(error).__name__}: {error}",
                                 error_code="internal")
        finally:
            if queued:
                self.queued -= 1
            self._cleanup(handle)

    async def _embed(self, handle: _Handle) -> None:
        """An embed job (agent/embeddings.py): the vectors go out in bounded messages, the last one ``done``."""
        results = await embed_results(self.backend, handle.job, self.agent_id, self.keep_alive, handle.received)
        for result in results:
            handle.stream._send(result)
        handle.stream.finished = True
        self.completed += 1

    def _arm_stall(self, handle: _Handle) -> None:
        """Note the backend's sign of life; one timer per stall interval checks it, not a new timer per token."""
        handle.active_at = time.monotonic()
        if handle.stall_timer is None:
            handle.stall_timer = asyncio.get_running_loop().call_later(self.stall_timeout_s, self._check_stall, handle)

    def _check_stall(self, handle: _Handle) -> None:
        quiet = time.monotonic() - handle.active_at
        if quiet < self.stall_timeout_s:  # a token came meanwhile: wait for the rest of the interval from it
            handle.stall_timer = asyncio.get_running_loop().call_later(self.stall_timeout_s - quiet,
                                                                       self._check_stall, handle)
            return
        handle.stall_timer = None
        waited = "the first token" if handle.first_token_at is None else "the next token"
        self._abort(handle, "stalled",
                    f"backend sent nothing for {self.stall_timeout_s:.0f}s while waiting for {waited}")

    async def _stream(self, handle: _Handle) -> None:
        job = handle.job
        if job.kind == "embed":
            await self._embed(handle)
            return
        started = time.monotonic()
        pieces = 0
        last_token_at = started
        done: ChatDone | None = None
        self._arm_stall(handle)
        offered = {"tools": job.tools, "tool_choice": job.tool_choice} if job.tools else {}  # docs/protocol.md
        if job.format is not None or job.think is not None:  # structured output, thinking (docs/protocol.md)
            offered.update(response_format=job.format, think=job.think)
        keep_alive = self.keep_alive if job.keep_alive is None else (
            job.keep_alive if isinstance(job.keep_alive, str) else f"{job.keep_alive:g}s")
        events = self.backend.chat(job.model, list(job.messages), dict(job.options), job.assistant_prefix,
                                   keep_alive, **offered)
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, ChatDelta):
                    now = time.monotonic()
                    if handle.first_token_at is None:
                        handle.first_token_at = now
                    last_token_at = self.last_token_at = now
                    pieces += 1
                    handle.stream.add(event.text)
                    self._arm_stall(handle)
                elif isinstance(event, ChatDone):
                    done = event
        if done is None:
            raise StreamBroken("backend ended the answer without its final statistics")
        finished = time.monotonic()
        output_tokens = done.output_tokens if done.output_tokens is not None else pieces
        tokens_per_s: float | None = None
        if done.generation_s and output_tokens:
            tokens_per_s = output_tokens / done.generation_s
        elif handle.first_token_at is not None and pieces > 1 and last_token_at > handle.first_token_at:
            tokens_per_s = (pieces - 1) / (last_token_at - handle.first_token_at)
        ttft_s = handle.first_token_at - handle.received if handle.first_token_at is not None else None
        stats = ResultStats(
            prompt_tokens=done.prompt_tokens,
            output_tokens=output_tokens,
            ttft_s=round(ttft_s, 4) if ttft_s is not None else None,
            tokens_per_s=round(tokens_per_s, 2) if tokens_per_s is not None else None,
            total_s=round(finished - handle.received, 4),
            queue_s=round(max(0.0, started - handle.received), 4),
            finish_reason=(done.done_reason or None) and done.done_reason[:32],
            tokens_counted_by="agent" if done.counted or done.output_tokens is None else "runtime",
        )
        handle.stream.finish(stats=stats, tool_calls=list(done.tool_calls))
        self.completed += 1
        # Telemetry and the benchmark describe the backend: its first token, not our queue in front of it.
        backend_ttft = None if ttft_s is None else round(max(0.0, handle.first_token_at - started), 4)
        self.recent.add(job.model, stats.tokens_per_s, backend_ttft)
        if self._on_finished is not None:
            self._on_finished(job.model, stats.tokens_per_s, backend_ttft)

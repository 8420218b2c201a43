"""The job runner without MQTT: batching, sequence numbers, cancel, deadline, duplicates, queue limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.backends import BackendHealth, ChatDelta, ChatDone, ContextTooLong
from agent.backends.simulated import SimulatedBackend, simulated_text
from agent.jobs import JobRunner, RecentStats
from broker.protocol import ChatMessage, Job, Result

MODEL = "llama3.2:1b"


class ScriptedBackend:
    """Yields ``tokens`` pieces ``gap_s`` apart, optionally hanging after ``hang_after`` or raising ``error``."""

    name = "scripted"
    url = "scripted://"
    simulated = True

    def __init__(self, tokens: int = 5, gap_s: float = 0.0, hang_after: int | None = None,
                 error: Exception | None = None) -> None:
        self.tokens = tokens
        self.gap_s = gap_s
        self.hang_after = hang_after
        self.error = error
        self.closed = 0
        self.started = 0

    async def health(self) -> BackendHealth:
        return BackendHealth(True)

    async def list_models(self) -> list[str]:
        return [MODEL]

    async def chat(self, model: str, messages: list[ChatMessage], options: dict[str, Any] | None = None,
                   assistant_prefix: str | None = None, keep_alive: str | None = None) -> AsyncIterator[object]:
        self.started += 1
        try:
            if self.error is not None:
                raise self.error
            for index in range(self.tokens):
                if self.hang_after is not None and index == self.hang_after:
                    await asyncio.sleep(3600)
                if index and self.gap_s:
                    await asyncio.sleep(self.gap_s)
                yield ChatDelta(f"t{index} ")
            yield ChatDone("stop", 3, self.tokens, None, None)
        finally:
            self.closed += 1


class Collector:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.times: list[float] = []

    def __call__(self, result: Result) -> None:
        self.results.append(result)
        self.times.append(time.monotonic())

    def of(self, request_id: str) -> list[Result]:
        return [result for result in self.results if result.request_id == request_id]

    async def final(self, request_id: str, timeout: float = 5.0) -> Result:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [result for result in self.of(request_id) if result.done]
            if done:
                return done[0]
            await asyncio.sleep(0.005)
        raise AssertionError(f"no final chunk for {request_id}")


def make_runner(backend: Any, collector: Collector, **overrides: Any) -> JobRunner:
    options: dict[str, Any] = dict(
        backend=backend, publish=collector, agent_id="unit", max_parallel=2, max_queue=2, chunk_interval_s=0.03,
        chunk_max_tokens=16, stall_timeout_s=5.0, keep_alive=None, remembered_jobs=64, stats_window_s=60,
        check_model=lambda model: None if model == MODEL else ("model_not_served", f"not {model}"),
    )
    options.update(overrides)
    return JobRunner(**options)


def job(request_id: str, *, deadline_in: float = 30.0, model: str = MODEL, text: str = "hello", **extra: Any) -> Job:
    return Job(request_id=request_id, model=model, messages=[ChatMessage(role="user", content=text)],
               deadline=time.time() + deadline_in, **extra)


def assert_well_formed(chunks: list[Result]) -> None:
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(chunk.agent_id == "unit" for chunk in chunks)


async def test_first_chunk_at_once_then_batched_by_time() -> None:
    collector = Collector()
    backend = SimulatedBackend(tokens_per_s=1000, ttft_s=0.0, models=[MODEL])
    runner = make_runner(backend, collector, chunk_max_tokens=1000)
    runner.submit(job("r1", options={"num_predict": 200}))
    final = await collector.final("r1")
    chunks = collector.of("r1")
    assert_well_formed(chunks)
    expected = "".join(simulated_text(MODEL, [ChatMessage(role="user", content="hello")], 200))
    assert "".join(chunk.delta for chunk in chunks) == expected
    assert chunks[0].delta == expected.split(" ")[0]  # the first token alone, not batched
    assert 3 <= len(chunks) <= 12  # ~200 ms of tokens in 30 ms batches, not 200 messages
    gaps = [later - earlier for earlier, later in zip(collector.times[1:-1], collector.times[2:-1], strict=False)]
    assert all(gap >= 0.025 for gap in gaps), gaps
    assert final.stats is not None and final.stats.output_tokens == 200 and final.stats.tokens_per_s
    assert final.stats.ttft_s is not None and final.stats.ttft_s < 0.05 and final.stats.total_s
    assert final.model == MODEL and final.error is None
    assert runner.recent.summary()[0] == final.stats.tokens_per_s


async def test_batches_by_token_count() -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(tokens=21), collector, chunk_interval_s=10.0, chunk_max_tokens=5)
    runner.submit(job("r1"))
    await collector.final("r1")
    chunks = collector.of("r1")
    assert_well_formed(chunks)
    assert [chunk.delta.count("t") for chunk in chunks] == [1, 5, 5, 5, 5, 0]


async def test_duplicate_job_gets_nothing_but_a_new_attempt_runs() -> None:
    collector = Collector()
    backend = ScriptedBackend(tokens=3)
    runner = make_runner(backend, collector)
    runner.submit(job("r1"))
    runner.submit(job("r1"))
    await collector.final("r1")
    await asyncio.sleep(0.05)
    assert backend.started == 1 and sum(chunk.done for chunk in collector.of("r1")) == 1
    runner.submit(job("r1", attempt=1))  # the coordinator's deliberate retry is a new job
    await asyncio.sleep(0.1)
    assert backend.started == 2


async def test_cancel_closes_the_stream_at_once() -> None:
    collector = Collector()
    backend = ScriptedBackend(tokens=1000, gap_s=0.01)
    runner = make_runner(backend, collector)
    runner.submit(job("r1"))
    while not collector.of("r1"):
        await asyncio.sleep(0.005)
    runner.cancel("r1", "user pressed stop")
    final = await collector.final("r1", timeout=1)
    assert final.error_code == "cancelled" and "user pressed stop" in (final.error or "")
    assert backend.closed == 1 and runner.running == 0
    assert_well_formed(collector.of("r1"))


async def test_cancel_of_a_queued_job_and_before_arrival() -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(tokens=1000, gap_s=0.01), collector, max_parallel=1)
    runner.submit(job("a"))
    runner.submit(job("b"))
    await asyncio.sleep(0.02)
    assert runner.running == 1 and runner.queued == 1
    runner.cancel("b")
    assert (await collector.final("b")).error_code == "cancelled"
    runner.cancel("c")  # the cancel overtook its job
    runner.submit(job("c"))
    assert (await collector.final("c")).error_code == "cancelled"
    runner.cancel("a")
    await collector.final("a")
    assert runner.running == 0 and runner.queued == 0


async def test_deadline_before_and_during_the_job() -> None:
    collector = Collector()
    backend = ScriptedBackend(tokens=1000, gap_s=0.01)
    runner = make_runner(backend, collector)
    runner.submit(job("late", deadline_in=-1))
    final = await collector.final("late")
    assert final.error_code == "deadline" and final.seq == 0 and backend.started == 0
    runner.submit(job("slow", deadline_in=0.2))
    final = await collector.final("slow")
    assert final.error_code == "deadline" and len(collector.of("slow")) > 1 and backend.closed == 1


async def test_queue_limit_answers_busy() -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(tokens=1000, gap_s=0.01), collector, max_parallel=1, max_queue=1)
    for request_id in ("a", "b", "c"):
        runner.submit(job(request_id))
    final = await collector.final("c")
    assert final.error_code == "busy"
    await runner.shutdown()
    assert (await collector.final("a")).error_code == "internal"
    assert (await collector.final("b")).error_code == "internal"


async def test_stall_is_detected() -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(tokens=5, hang_after=2), collector, stall_timeout_s=0.2)
    runner.submit(job("r1"))
    final = await collector.final("r1")
    assert final.error_code == "stalled" and "0s" in (final.error or "")
    assert "".join(chunk.delta for chunk in collector.of("r1")) == "t0 t1 "


async def test_failures_become_error_chunks() -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(error=ContextTooLong("input length exceeds the context length")), collector)
    runner.submit(job("ctx"))
    final = await collector.final("ctx")
    assert final.error_code == "context_too_long" and "context length" in (final.error or "")
    runner.submit(job("other", model="mistral:7b"))
    final = await collector.final("other")
    assert final.error_code == "model_not_served" and final.model == "mistral:7b"
    runner.reject_payload(b'{"request_id": "readable", "model": ""}', "model: too short")
    final = await collector.final("readable")
    assert final.error_code == "bad_job" and "too short" in (final.error or "")
    before = len(collector.results)
    runner.reject_payload(b"not json at all", "not JSON")
    runner.reject_payload(b'{"request_id": "bad/id"}', "invalid")
    assert len(collector.results) == before


async def test_crashing_backend_is_internal_error_not_a_crash() -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(error=ZeroDivisionError("boom")), collector)
    runner.submit(job("r1"))
    final = await collector.final("r1")
    assert final.error_code == "internal" and "boom" in (final.error or "")


def test_recent_stats_window() -> None:
    stats = RecentStats(window_s=60)
    assert stats.summary() == (None, None)
    stats.add(MODEL, 10.0, 0.5)
    stats.add(MODEL, 30.0, 0.1)
    stats.add("other", 100.0, None)
    assert stats.summary(MODEL) == (20.0, 0.3)
    assert stats.summary()[0] == 30.0


@pytest.mark.parametrize("interval", [0.0])
async def test_zero_interval_sends_every_token(interval: float) -> None:
    collector = Collector()
    runner = make_runner(ScriptedBackend(tokens=4), collector, chunk_interval_s=interval)
    runner.submit(job("r1"))
    await collector.final("r1")
    assert [chunk.delta for chunk in collector.of("r1")] == ["t0 ", "t1 ", "t2 ", "t3 ", ""]


def test_agent_client_ids_differ_per_topic_prefix() -> None:
    """Two clusters on one broker must not knock each other's agents off (same agent id, other prefix)."""
    from agent.agent import agent_client_id

    assert agent_client_id("desk-pc", "slb/v1") == "slb-agent-desk-pc"
    assert agent_client_id("desk-pc", "lab/v1") != agent_client_id("desk-pc", "home/v1")
    assert agent_client_id("desk-pc", "lab/v1") == agent_client_id("desk-pc", "lab/v1")

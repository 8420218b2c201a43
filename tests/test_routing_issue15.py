"""Issue 15 routing: honest queues on the runtime's real slots, conversation affinity, answer-length prediction,
and a query pinned to one agent (pure logic, and the executor through an offline coordinator)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker.coordinator.contract import QueryFailed, QueryFinished, QueryRequest, QueryStarted, TextDelta
from broker.protocol import ChatMessage, Result, ResultStats
from broker.scheduling.affinity import ConversationMemory, lookup_keys, remember_keys
from broker.scheduling.estimates import AnswerLengths, prompt_shape
from broker.scheduling.routing import JobProgress, RouteCandidate, Router, live_speed
from tests.test_coordinator_units import deliver, offline_coordinator, ready_agent


def candidate(agent_id: str, tokens_per_s: float, *, slots: int = 1, ahead: tuple[JobProgress, ...] = (),
              outstanding: int | None = None, ttft_s: float = 0.2, cached_tokens: int = 0) -> RouteCandidate:
    return RouteCandidate(agent_id, "m", len(ahead) if outstanding is None else outstanding, slots, tokens_per_s,
                          ttft_s, "observed", ahead=ahead, prefill_tokens_per_s=tokens_per_s * 8,
                          cached_tokens=cached_tokens)


# ---------------------------------------------------------------- honest queues


def test_a_second_job_on_one_slot_waits_for_the_first_ones_remaining_tokens() -> None:
    running = JobProgress(expected_tokens=200, generating_s=1.5)  # 100 tok/s: 0.5 s of it left
    assert candidate("a", 100, ahead=(running,)).queue_wait_s(100) == pytest.approx(0.5)
    queued = JobProgress(expected_tokens=100)  # not started: a whole answer (first token + tokens)
    assert candidate("a", 100, ahead=(running, queued)).queue_wait_s(100) == pytest.approx(0.5 + 0.2 + 1.0)
    overrun = JobProgress(expected_tokens=200, generating_s=5.0)  # past its length: it goes on a while
    assert candidate("a", 100, ahead=(overrun,)).queue_wait_s(100) == pytest.approx(1.25)
    two_slots = candidate("a", 100, slots=2, ahead=(running, queued))  # the new job takes the slot that frees first
    assert two_slots.queue_wait_s(100) == pytest.approx(200 / (100 / 1.1) - 1.5)  # two streams share: 10 % slower
    assert candidate("a", 100, slots=2, ahead=(running,)).queue_wait_s(100) == 0.0
    external = candidate("a", 100, ahead=(running,), outstanding=2)  # one job we do not know: an average answer
    assert external.queue_wait_s(100) == pytest.approx(0.5 + 0.2 + 1.0)


def test_a_long_answer_skips_the_slow_idle_agent_for_a_busy_fast_one() -> None:
    router = Router("expected_completion")
    fast = candidate("fast", 335, ahead=(JobProgress(200, 0.1), JobProgress(100)), ttft_s=0.12)
    slow = candidate("slow", 9, ttft_s=1.5)
    assert router.choose([fast, slow], 200).candidate.agent_id == "fast"
    assert router.choose([candidate("fast", 335, ahead=(JobProgress(200, 0.1),) * 30, ttft_s=0.12), slow],
                         16).candidate.agent_id == "slow"


async def test_auto_waits_for_the_best_agent_when_it_is_full_instead_of_spilling_to_a_slow_one() -> None:
    coordinator, connection = await offline_coordinator(agent_queue_limit=0, admission_wait_s=5)
    ready_agent(coordinator, "fast", 300)
    ready_agent(coordinator, "slow", 3)
    first = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="one")],
                                           options={"num_predict": 200}))
    assert (await anext(first)).agents == ["fast"]  # type: ignore[union-attr]
    second = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="two")],
                                            options={"num_predict": 200}))
    waiting = asyncio.ensure_future(anext(second))
    await asyncio.sleep(0.3)
    assert not waiting.done() and len(connection.jobs()) == 1  # fast is full (one slot, no queue): it waits
    job = connection.jobs()[0]
    deliver(coordinator, coordinator.topics.result("fast"), Result(request_id=job.request_id, seq=0, delta="ok",
                                                                    done=True, stats=ResultStats(output_tokens=1)))
    started = await asyncio.wait_for(waiting, 3)
    assert isinstance(started, QueryStarted) and started.agents == ["fast"]
    await first.aclose()
    await second.aclose()


# ---------------------------------------------------------------- conversation affinity


def test_the_conversations_machine_wins_unless_its_queue_costs_more_than_the_saved_prefill() -> None:
    router = Router("expected_completion")
    holder = candidate("holder", 40, ahead=(JobProgress(40, 0.5),), cached_tokens=2000)  # saves 2000/320 = 6.25 s
    other = candidate("other", 60)
    route = router.choose([holder, other], 100)
    assert route.candidate.agent_id == "holder" and route.affinity and "conversation affinity" in route.reason
    jammed = candidate("holder", 40, ahead=(JobProgress(400),) * 3, cached_tokens=2000)
    declined = router.choose([jammed, other], 100)
    assert declined.candidate.agent_id == "other" and not declined.affinity
    assert "affinity declined" in declined.reason


def test_conversation_memory_keys_eviction_and_bounds() -> None:
    turn1 = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hello")]
    turn2 = [*turn1, ChatMessage(role="assistant", content=" Hi there "), ChatMessage(role="user", content="more")]
    memory = ConversationMemory(capacity=4)
    memory.job_sent("a")
    memory.remember(remember_keys(turn1, "Hi there", None), "a", 50, other_jobs=0, now=0.0)
    assert memory.cached(lookup_keys(turn2, None), {"a": 1}, 1.0) == {"a": 50}  # matched by the history
    assert memory.cached(lookup_keys(turn2, None), {}, 1.0) == {}  # the agent is no candidate
    memory.job_sent("a")  # another job took the only slot
    assert memory.cached(lookup_keys(turn2, None), {"a": 1}, 2.0) == {}
    assert memory.cached(lookup_keys(turn2, None), {"a": 2}, 2.0) == {"a": 50}  # two slots: may still hold it
    memory.remember(remember_keys(turn1, "x", "session-1"), "b", 10, other_jobs=0, now=3.0)
    assert memory.cached(lookup_keys([ChatMessage(role="user", content="new")], "session-1"), {"b": 1}, 4.0) == \
        {"b": 10}
    assert memory.cached(lookup_keys(turn2, None), {"a": 2}, 4000.0) == {}  # expired
    for index in range(10):
        memory.remember([f"k{index}"], "a", 1, 0, 5.0)
    assert len(memory) == 4


async def test_a_follow_up_goes_back_to_the_machine_that_served_the_previous_turn() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "near", 50)
    ready_agent(coordinator, "far", 55)
    history = "word " * 4000
    turn1 = [ChatMessage(role="user", content=history)]
    events = coordinator.query(QueryRequest(messages=turn1))
    started = await anext(events)
    assert isinstance(started, QueryStarted) and not started.affinity
    served = started.agents[0]
    job = connection.jobs()[0]
    deliver(coordinator, coordinator.topics.result(served), Result(request_id=job.request_id, seq=0, delta="Sure.",
                                                                    done=True, stats=ResultStats(output_tokens=2)))
    assert isinstance([event async for event in events][-1], QueryFinished)
    turn2 = [*turn1, ChatMessage(role="assistant", content="Sure."), ChatMessage(role="user", content="go on")]
    follow = coordinator.query(QueryRequest(messages=turn2))
    again = await anext(follow)
    assert isinstance(again, QueryStarted) and again.agents == [served] and again.affinity
    assert "conversation affinity" in again.reason
    await follow.aclose()


# ---------------------------------------------------------------- answer lengths


def test_answer_lengths_are_learned_per_shape_and_memory_is_bounded() -> None:
    lengths = AnswerLengths(256, capacity=50, min_samples=3)
    short, long = prompt_shape(40, 1, False, "summarise this"), prompt_shape(40, 1, False, "write an essay")
    assert lengths.predict("m", short) == 256
    for _ in range(5):
        lengths.observe("m", short, 30)
        lengths.observe("m", long, 900)
    assert lengths.predict("m", short) == pytest.approx(30)
    assert lengths.predict("m", long) == pytest.approx(900)
    assert lengths.predict("other-model", short) == pytest.approx(30)  # the shape, seen on another model
    assert 30 < lengths.predict("m", prompt_shape(40, 1, False, "never seen")) < 900  # the model's mean
    for index in range(200):
        lengths.observe(f"model-{index}", prompt_shape(index, 1, False, f"w{index}"), 10)
    assert len(lengths) <= 50


# ---------------------------------------------------------------- one named agent


async def test_a_named_agent_answers_alone_and_a_missing_one_fails_clearly() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "fast", 500)
    ready_agent(coordinator, "pi", 2)
    events = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="hi")], agent="pi"))
    started = await anext(events)
    assert isinstance(started, QueryStarted) and started.agents == ["pi"] and started.pinned
    await events.aclose()
    for name, expected in (("ghost", "is not part of this cluster"), ):
        failed = [e async for e in coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="hi")],
                                                                  agent=name))][-1]
        assert isinstance(failed, QueryFailed) and failed.code == "no_agent" and expected in failed.error
        assert not any(job.request_id.startswith(failed.request_id) for job in connection.jobs())
    named_model = [e async for e in coordinator.query(QueryRequest(
        messages=[ChatMessage(role="user", content="hi")], agent="pi", mode="qwen2.5:7b"))][-1]
    assert isinstance(named_model, QueryFailed) and "does not have model 'qwen2.5:7b'" in named_model.error


async def test_a_named_agent_fails_over_only_to_itself() -> None:
    coordinator, connection = await offline_coordinator(stall_first_token_s=0.1, max_failovers=1)
    ready_agent(coordinator, "a", 10)
    ready_agent(coordinator, "b", 100)
    events = [e async for e in coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="hi")],
                                                              agent="a"))]
    assert isinstance(events[-1], QueryFailed) and "gave up after 2 attempt(s)" in events[-1].error
    assert [topic.split("/")[-2] for topic, _ in connection.published if topic.endswith("/job")] == ["a", "a"]


# ---------------------------------------------------------------- a sudden slowdown, queries waiting in admission


def test_live_pace_of_running_jobs_says_how_fast_an_agent_runs_now() -> None:
    assert live_speed([JobProgress(200, None)], 1) is None  # no token yet: no evidence
    assert live_speed([JobProgress(200, 0.2, 10)], 1) is None  # too early: the first chunks come in bursts
    pace, weight = live_speed([JobProgress(200, 1.0, 31)], 1)  # type: ignore[misc]
    assert pace == pytest.approx(30.0) and weight == pytest.approx(0.5)
    pace, weight = live_speed([JobProgress(200, 2.0, 41), JobProgress(200, 2.0, 41)], 2)  # type: ignore[misc]
    assert pace == pytest.approx(20.0 * 1.1) and weight == 1.0  # two streams share the slots: alone it runs 10 % faster
    # What is left of a streaming job is counted in tokens when they are known (not in seconds at the old speed).
    assert candidate("a", 100, ahead=(JobProgress(200, 1.0, 150),)).queue_wait_s(100) == pytest.approx(0.5)


async def test_an_agent_streaming_far_slower_than_measured_gets_no_more_jobs() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "fast", 300)
    ready_agent(coordinator, "mid", 100)
    first = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="one")],
                                           options={"num_predict": 400}))
    assert (await anext(first)).agents == ["fast"]  # type: ignore[union-attr]
    (job,) = connection.jobs()
    deliver(coordinator, coordinator.topics.result("fast"), Result(request_id=job.request_id, seq=0, delta="x" * 40))
    assert isinstance(await anext(first), TextDelta)
    (attempt,) = coordinator._execution._ledger.jobs_by_agent()["fast"]
    assert attempt.first_chunk_at is not None
    attempt.first_chunk_at -= 2.0  # 2 s streaming, ~10 tokens: 5 tok/s now, not the 300 measured
    candidates = {c.agent_id: c for c in coordinator._execution.candidates(None, frozenset(), QueryRequest(
        messages=[ChatMessage(role="user", content="two")], options={"num_predict": 100}))}
    assert candidates["fast"].tokens_per_s < 10 and "slower now" in candidates["fast"].speed_source
    assert candidates["mid"].tokens_per_s == 100
    second = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="two")],
                                            options={"num_predict": 100}))
    assert (await anext(second)).agents == ["mid"]  # type: ignore[union-attr]
    await first.aclose()
    await second.aclose()


async def test_queries_waiting_for_a_full_agent_count_in_its_queue_for_later_ones() -> None:
    coordinator, connection = await offline_coordinator(agent_queue_limit=0, admission_wait_s=5)
    ready_agent(coordinator, "fast", 300)
    ready_agent(coordinator, "slow", 100)

    def ask(text: str) -> object:
        return coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content=text)],
                                              options={"num_predict": 100}))

    first = ask("one")
    assert (await anext(first)).agents == ["fast"]  # type: ignore[union-attr]
    second = ask("two")
    waiting = asyncio.ensure_future(anext(second))  # fast is full but still the best: it waits for fast
    await asyncio.sleep(0.3)
    assert not waiting.done() and len(connection.jobs()) == 1
    # Alone, fast would again be the best for a third query (0.43 s left of the first + 0.43 s); with the second
    # query ahead of it, it is not: the third goes to slow (1.1 s) at once.
    third = ask("three")
    started = await asyncio.wait_for(anext(third), 3)  # type: ignore[call-overload]
    assert isinstance(started, QueryStarted) and started.agents == ["slow"]
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    for stream in (first, second, third):
        await stream.aclose()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the choice in the answer's provenance


def test_affinity_and_a_named_agent_reach_the_slb_field_the_stored_stats_and_the_chat_footer() -> None:
    from app.answers import AnswerRecord, provenance, stats_of
    from app.ui.render import answer_messages

    routed = AnswerRecord()
    routed.apply(QueryStarted("r1", ["pi"], ["llama3.2:1b"], "auto", "lowest expected completion", affinity=True))
    assert provenance(routed, "auto", set())["affinity"] is True
    assert provenance(routed, "auto", set())["pinned"] is False
    stats = stats_of(routed, set())
    assert stats["affinity"] is True and "pinned" not in stats
    footer = answer_messages("ok", agents=["pi"], models=["llama3.2:1b"], mode="auto", stats=stats,
                             citations=[], simulated=set())[0]["content"]
    assert "same machine as the last turn" in footer
    named = AnswerRecord()
    named.apply(QueryStarted("r2", ["pi"], ["llama3.2:1b"], "auto", "pinned to pi by the caller", pinned=True))
    assert provenance(named, "auto", set())["pinned"] is True and stats_of(named, set())["pinned"] is True
    footer = answer_messages("ok", agents=["pi"], models=["llama3.2:1b"], mode="auto",
                             stats=stats_of(named, set()), citations=[], simulated=set())[0]["content"]
    assert "agent named by the caller" in footer and "same machine" not in footer
    plain = AnswerRecord()
    plain.apply(QueryStarted("r3", ["pi"], ["llama3.2:1b"], "auto"))
    assert "affinity" not in stats_of(plain, set()) and provenance(plain, "auto", set())["affinity"] is False

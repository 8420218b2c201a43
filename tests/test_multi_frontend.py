"""Several front ends on one cluster (issue 16.2, routing): each routes its own queries, and counts the jobs the
others have on each agent — from the agents' telemetry (faded by its age) and from the result chunks every front
end hears — so two front ends do not pile onto one agent while another sits idle."""

from __future__ import annotations

import pytest

from broker.coordinator.contract import QueryRequest, QueryStarted
from broker.coordinator.runtime import Coordinator
from broker.protocol import ChatMessage, Result, Telemetry
from broker.scheduling.routing import STREAMING_MAX_JOBS, OthersLoad
from tests.test_coordinator_units import deliver, offline_coordinator, ready_agent

# ---------------------------------------------------------------- others' jobs, pure


def test_reported_jobs_beyond_our_own_count_in_full_then_fade_with_the_reports_age() -> None:
    load = OthersLoad()
    load.report("a", reported_jobs=3, own_jobs=1, interval_s=1.0, now=100.0)
    assert load.jobs(100.0) == {"a": 2}
    assert load.jobs(101.5) == {"a": 2}  # up to 1.5 intervals: the next report is merely late
    assert load.reported("a", 102.25) == pytest.approx(1.0)  # half way to 3 intervals: half of them
    assert load.jobs(103.0) == {}  # 3 intervals: the coordinator expires the agent anyway
    load.report("a", reported_jobs=1, own_jobs=2, interval_s=1.0, now=104.0)  # sampled before our job arrived
    assert load.jobs(104.0) == {}


def test_jobs_seen_streaming_count_until_their_final_chunk_or_a_silence() -> None:
    load = OthersLoad()
    load.chunk("a", "r1", done=False, now=10.0)
    load.chunk("a", "r1", done=False, now=10.1)  # more chunks of one job: still one job
    load.chunk("a", "r2", done=False, now=10.0)
    assert load.jobs(10.5) == {"a": 2}
    load.chunk("a", "r1", done=True, now=11.0)
    assert load.jobs(11.0) == {"a": 1}
    assert load.jobs(13.1) == {}  # r2 went quiet 3 s ago: its final chunk was lost
    load.report("a", reported_jobs=1, own_jobs=0, interval_s=1.0, now=20.0)
    load.chunk("a", "r3", done=False, now=20.0)
    load.chunk("a", "r4", done=False, now=20.0)
    assert load.jobs(20.0) == {"a": 2}  # the larger of the two views, never their sum (they overlap)
    for index in range(10_000):  # an agent streaming chunks for made-up request ids: bounded
        load.chunk("b", f"fake{index}", done=False, now=30.0 + index / 1000)
    assert load.jobs(40.0)["b"] == STREAMING_MAX_JOBS


# ---------------------------------------------------------------- two front ends' routing state


async def two_agents() -> tuple[Coordinator, list[object]]:
    coordinator, connection = await offline_coordinator(random_ties=True)  # as each front end really starts
    for agent_id in ("x", "y"):
        ready_agent(coordinator, agent_id, 50)
    return coordinator, connection.jobs  # type: ignore[return-value]


def question(text: str) -> QueryRequest:
    return QueryRequest(messages=[ChatMessage(role="user", content=text)])


async def first_agent(coordinator: Coordinator, text: str) -> str:
    """Where ``coordinator`` sends ``text`` (the query is then dropped)."""
    stream = coordinator.query(question(text))
    started = await anext(stream)
    await stream.aclose()
    assert isinstance(started, QueryStarted)
    return started.agents[0]


async def test_without_news_of_each_other_front_ends_start_their_rotation_apart() -> None:
    # Equal idle agents: each front end's first pick is its own tie rotation. All starting at the same turn
    # made every front end send its first query (and, in step, every next one) to the same agent.
    picks = {await first_agent((await two_agents())[0], "hello") for _ in range(16)}
    assert picks == {"x", "y"}


async def test_a_front_end_that_hears_another_ones_answer_streaming_sends_its_query_to_the_idle_agent() -> None:
    first, first_jobs = await two_agents()
    stream = first.query(question("one"))
    started = await anext(stream)
    assert isinstance(started, QueryStarted)
    busy = started.agents[0]
    idle = "y" if busy == "x" else "x"
    (job,) = first_jobs()  # type: ignore[operator]
    for _ in range(8):  # fresh front ends, each with its own random rotation start
        second, _ = await two_agents()
        # Every front end subscribes to every agent's results: the first one's answer streams past it.
        deliver(second, second.topics.result(busy), Result(request_id=job.request_id, seq=0, delta="Hel"))
        assert await first_agent(second, "two") == idle
    await stream.aclose()


async def test_a_front_end_counts_the_jobs_an_agents_telemetry_reports_beyond_its_own() -> None:
    for _ in range(8):
        second, _ = await two_agents()
        deliver(second, second.topics.telemetry("x"), Telemetry(tokens_per_s=50, ttft_s=0.1, jobs_running=1,
                                                                jobs_queued=1))
        assert await first_agent(second, "three") == "y"

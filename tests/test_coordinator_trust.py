"""Trust at the agent boundary, without a broker (issue 13.1, 13.6, 13.7).

What an agent claims is checked against what the coordinator saw: empty answers and speeds far above the
delivered rate are failures and strikes, strikes quarantine, the router learns only its own measurements,
slots are capped by what the machine can run. What an agent streams is bounded (answer length, reorder
buffer, continuation prefix), and what it publishes reaches the cluster view bounded. The same behaviour on
the real broker with agent processes: tests/test_coordinator_untrusted_agents.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from broker.coordinator.attempts import Attempt, ReorderBuffer
from broker.coordinator.contract import (
    AgentFinished,
    AgentSwitched,
    AnswerRestarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.runtime import Coordinator
from broker.coordinator.views import MAX_SNAPSHOT_MODELS, MAX_VIEW_MODELS
from broker.protocol import (
    MAX_PAYLOAD_BYTES,
    Benchmark,
    ChatMessage,
    GpuInfo,
    Hardware,
    ModelState,
    Result,
    ResultStats,
    Status,
    Telemetry,
)
from broker.protocol.messages import MAX_GPUS, MAX_MODELS, MAX_PROMPT_CHARS
from broker.scheduling.registry import AgentRecord, slot_ceiling
from broker.scheduling.scoring import machine_facts
from broker.scheduling.trust import PROBATION_ANSWERS, Delivery, Trust, delivered_tokens, judge
from tests.test_coordinator_units import RecordingConnection, deliver, offline_coordinator, ready_agent

TEXT = " word" * 40  # 40 tokens, 200 characters


def delivery(text: str = TEXT, *, first: float | None = 1.0, done: float = 3.0, **changes: object) -> Delivery:
    values: dict[str, object] = dict(text=text, continued=False, output_allowed=True, sent_at=0.5, first_at=first,
                                     done_at=done, stats=ResultStats(output_tokens=40, tokens_per_s=20.0))
    values.update(changes)
    return Delivery(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------- judging one answer


def test_an_honest_answer_is_used_and_measured_on_the_coordinators_clock() -> None:
    verdict = judge(delivery(stats=ResultStats(output_tokens=40, tokens_per_s=25.0, queue_s=9.0)))
    assert verdict.failure is None and verdict.strike is None
    assert verdict.measurement.tokens == 40 and verdict.measurement.tokens_per_s == 20.0  # 40 tokens over 2 s
    assert verdict.measurement.ttft_s == 0.5
    assert verdict.measurement.as_stats(9.0).queue_s == 0.5  # the agent's queue time only within our TTFT


def test_an_empty_answer_is_a_failure_and_a_strike_unless_nothing_was_asked_or_it_completes_a_prefix() -> None:
    lie = judge(delivery("", first=1.0, done=1.0, stats=ResultStats(output_tokens=512, tokens_per_s=100_000)))
    assert lie.failure == lie.strike_if_answered == "empty answer: done without any text (its stats claim 512 tokens)"
    assert lie.strike is None  # a strike once another agent answers the question: the question may allow nothing
    assert judge(delivery("  \n", stats=None)).failure is not None  # whitespace is no answer either
    assert judge(delivery("", continued=True)).failure is None  # the previous agent had said it all
    assert judge(delivery("", output_allowed=False)).failure is None  # num_predict 0


def test_an_answer_claiming_a_speed_far_above_its_delivery_is_rejected() -> None:
    verdict = judge(delivery(stats=ResultStats(output_tokens=40, tokens_per_s=10_000)))  # delivered 20 tok/s
    assert verdict.failure == verdict.strike == "claimed 10,000 tok/s for an answer delivered at 20.0 tok/s"
    assert judge(delivery(stats=ResultStats(output_tokens=40, tokens_per_s=300))).failure is None  # 15×: noise


def test_a_telemetry_or_benchmark_claim_far_above_a_solo_delivery_is_a_strike_only() -> None:
    solo = judge(delivery(solo=True, claimed_tokens_per_s=10_000))
    assert solo.failure is None and solo.strike is not None and "10,000 tok/s" in solo.strike
    assert judge(delivery(solo=False, claimed_tokens_per_s=10_000)).strike is None  # sharing slots slows it


def test_short_deliveries_are_not_judged_for_speed_nor_learned() -> None:
    quick = judge(delivery(" a b c", first=1.0, done=1.01, stats=ResultStats(output_tokens=3, tokens_per_s=10_000)))
    assert quick.failure is None and quick.measurement.tokens_per_s is None


def test_delivered_tokens_never_exceed_what_the_text_can_hold() -> None:
    assert delivered_tokens("ab", ResultStats(output_tokens=5000)) == 4
    assert delivered_tokens("a" * 40, None) == 10
    assert delivered_tokens(TEXT, ResultStats(output_tokens=40)) == 40


# ---------------------------------------------------------------- strikes and quarantine


def test_strikes_quarantine_longer_each_time_and_probation_follows() -> None:
    trust = Trust(strike_limit=3, window_s=60, quarantine_s=10, quarantine_max_s=25)
    assert trust.strike("liar", "empty answer", 0.0) is None
    assert trust.strike("liar", "empty answer", 1.0) is None
    assert trust.strike("liar", "empty answer", 2.0) == 10
    standing = trust.standing("liar", 5.0)
    assert standing.quarantined and standing.left_s == 7.0 and standing.strikes == 3
    assert standing.reason == "3 strike(s) in 60 s; last: empty answer"
    assert trust.quarantined(5.0) == {"liar": standing.reason}
    assert trust.strike("liar", "late answer to an old job", 6.0) is None  # no extra time for old jobs
    assert trust.quarantined(12.0) == {} and trust.standing("liar", 12.0).probation
    assert trust.strike("liar", "empty answer", 13.0) == 20  # one strike on probation: twice as long
    assert "probation" in (trust.standing("liar", 14.0).reason or "")
    for _ in range(PROBATION_ANSWERS):
        trust.good("liar", 40.0)
    assert not trust.standing("liar", 40.0).probation
    trust.strike("liar", "x", 41.0)
    trust.strike("liar", "x", 42.0)
    assert trust.strike("liar", "x", 43.0) == 25  # 40 s capped at quarantine_max_s


def test_strikes_outside_the_window_do_not_add_up() -> None:
    trust = Trust(strike_limit=2, window_s=10, quarantine_s=10, quarantine_max_s=10)
    assert trust.strike("a", "x", 0.0) is None
    assert trust.strike("a", "x", 11.0) is None
    assert trust.strike("a", "x", 12.0) == 10


def test_slots_are_capped_by_what_the_machine_can_run() -> None:
    eight_cores = machine_facts(Hardware(cpu_physical_cores=8, ram_total_gb=32))
    assert slot_ceiling(eight_cores) == 16
    assert slot_ceiling(machine_facts(Hardware(gpus=[GpuInfo(name="RTX 4090", vendor="nvidia",
                                                                 vram_total_gb=24)]))) == 48
    assert slot_ceiling(machine_facts(None)) == 8
    record = AgentRecord("a", status=Status(state="online", max_parallel=1000), facts=eight_cores)
    assert record.claimed_slots == 64 and record.slots == 16  # the protocol caps 1000 at 64, the machine at 16


# ---------------------------------------------------------------- the coordinator with a lying agent


def liar(coordinator: Coordinator, *, model: str = "llama3.2:3b", local: list[str] | None = None) -> None:
    """Claims 10,000 tok/s (the protocol's ceiling) and 64 slots on an 8-core machine."""
    ready_agent(coordinator, "liar", 10_000, model=model, local=local, slots=64)
    topics = coordinator.topics
    deliver(coordinator, topics.hardware("liar"), Hardware(
        cpu_physical_cores=8, ram_total_gb=32, benchmark=Benchmark(model="llama3.2:3b", tokens_per_s=10_000)))


async def answer_empty(coordinator: Coordinator, connection: RecordingConnection, index: int) -> None:
    job = connection.jobs()[index]
    deliver(coordinator, coordinator.topics.result("liar"), Result(
        request_id=job.request_id, seq=0, done=True, stats=ResultStats(output_tokens=512, tokens_per_s=10_000)))


async def next_event(stream: object) -> QueryEvent:
    return await asyncio.wait_for(anext(stream), 5)  # type: ignore[call-overload]


async def answer_honestly(coordinator: Coordinator, connection: RecordingConnection, agent_id: str,
                          text: str = "Paris.") -> None:
    job = connection.jobs()[-1]
    deliver(coordinator, coordinator.topics.result(agent_id), Result(
        request_id=job.request_id, seq=0, delta=text, done=True, stats=ResultStats(output_tokens=2)))


async def test_an_empty_answer_fails_over_strikes_and_three_strikes_quarantine() -> None:
    coordinator, connection = await offline_coordinator(cooldown_s=0.0)
    liar(coordinator)
    # Slow enough that the liar's claims still win once the cluster has learnt these answers are 2 tokens long.
    ready_agent(coordinator, "honest", 2)
    for round_ in range(3):
        stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content=f"q{round_}")]))
        started = await next_event(stream)
        assert isinstance(started, QueryStarted) and started.agents == ["liar"]  # its claims win the first routes
        await answer_empty(coordinator, connection, len(connection.jobs()) - 1)
        switched = await next_event(stream)
        assert isinstance(switched, AgentSwitched) and switched.to_agent == "honest"
        assert "empty answer" in switched.reason
        await answer_honestly(coordinator, connection, "honest")
        events = [event async for event in stream]
        assert isinstance(events[-1], QueryFinished) and events[-1].text == "Paris."
        assert events[-1].agents == ["liar", "honest"]
    view = {agent.id: agent for agent in coordinator.snapshot().agents}
    assert view["liar"].quarantined and view["liar"].strikes == 3 and view["liar"].quarantines == 1
    assert "empty answer" in (view["liar"].quarantine_reason or "") and view["liar"].quarantine_left_s
    assert view["liar"].slots == 16 and view["liar"].claimed_slots == 64
    assert not view["honest"].quarantined and view["honest"].strikes == 0
    assert coordinator.metrics.registry.get_sample_value("slb_agent_quarantines_total") == 1

    sent = len(connection.jobs())
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="after")], mode="quality"))
    started = await next_event(stream)
    assert isinstance(started, QueryStarted) and started.agents == ["honest"]
    assert connection.published[-1][0] == coordinator.topics.job("honest") and len(connection.jobs()) == sent + 1
    await answer_honestly(coordinator, connection, "honest")
    assert isinstance([event async for event in stream][-1], QueryFinished)


async def test_an_empty_answer_nobody_else_gives_either_strikes_nobody() -> None:
    """A question that makes every model say nothing (a stop sequence matching at once) is the question's doing."""
    coordinator, connection = await offline_coordinator(strike_limit=1)
    liar(coordinator, model="llama3.3:70b")
    ready_agent(coordinator, "honest", 20)
    events = [event async for event in _answered_empty(coordinator, connection, "llama3.3:70b")]
    failed = events[-1]
    assert isinstance(failed, QueryFailed) and failed.code == "failed" and "empty answer" in failed.error
    assert {agent.id: agent.strikes for agent in coordinator.snapshot().agents} == {"honest": 0, "liar": 0}


async def test_models_only_a_quarantined_agent_claims_are_not_offered_and_the_reason_says_why() -> None:
    coordinator, connection = await offline_coordinator(strike_limit=1)
    liar(coordinator, model="llama3.3:70b")
    ready_agent(coordinator, "honest", 20)
    assert "llama3.3:70b" in coordinator.model_names()
    assert coordinator.manage_targets("pull", "qwen2.5:0.5b")[0] == ["liar"]  # the strongest, by its claims
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="x")], mode="quality"))
    assert (await next_event(stream)).agents == ["liar"]  # type: ignore[union-attr]
    await answer_empty(coordinator, connection, -1)
    assert isinstance(await next_event(stream), AgentSwitched)
    await answer_honestly(coordinator, connection, "honest")
    assert isinstance([event async for event in stream][-1], QueryFinished)
    assert coordinator.model_names() == ["llama3.2:3b"]
    assert coordinator.snapshot().servable_models == ["llama3.2:3b"]
    assert coordinator.plan().excluded["liar"].startswith("in quarantine: 1 strike(s)")
    assert coordinator.manage_targets("pull", "qwen2.5:0.5b")[0] == ["honest"]
    assert coordinator.snapshot().ready_models == ["llama3.2:3b"]
    again = [event async for event in coordinator.query(QueryRequest(
        messages=[ChatMessage(role="user", content="x")], mode="llama3.3:70b"))]
    assert isinstance(again[-1], QueryFailed) and again[-1].code == "no_agent"
    assert "in quarantine (no jobs): liar" in again[-1].error
    assert "honest answered the same question" in (coordinator.snapshot().agents[1].quarantine_reason or "")
    for agent_id, model in (("liar", "llama3.3:70b"), ("honest", "llama3.2:3b")):  # both runtimes hold a model
        deliver(coordinator, coordinator.topics.model(agent_id), ModelState(
            model=model, state="ready", local_models=[model], loaded_models=[model]))
    assert {loaded.agent_id for loaded in coordinator.loaded_models()} == {"honest"}, "/api/ps lists the liar's"


async def _answered_empty(coordinator: Coordinator, connection: RecordingConnection, mode: str):  # noqa: ANN202
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="x")], mode=mode))
    yield await next_event(stream)
    await answer_empty(coordinator, connection, -1)
    async for event in stream:
        yield event


async def test_text_of_an_answer_that_lied_about_its_speed_is_voided_by_a_restart() -> None:
    """The liar streamed real-looking text but claims 10,000 tok/s for it: the honest agent starts over (though
    it could continue a prefix) and the caller's answer is the honest one alone."""
    coordinator, connection = await offline_coordinator(cooldown_s=0.0)
    liar(coordinator)
    ready_agent(coordinator, "honest", 20)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="q")]))
    assert (await next_event(stream)).agents == ["liar"]  # type: ignore[union-attr]
    job = connection.jobs()[0]
    topic = coordinator.topics.result("liar")
    deliver(coordinator, topic, Result(request_id=job.request_id, seq=0, delta="Made"))
    await asyncio.sleep(0.6)
    deliver(coordinator, topic, Result(request_id=job.request_id, seq=1, delta=" up" * 40, done=True,
                                       stats=ResultStats(output_tokens=41, tokens_per_s=10_000)))
    events: list[QueryEvent] = []
    while not any(isinstance(event, AnswerRestarted) for event in events):
        events.append(await next_event(stream))
    restarted = events[-1]
    assert isinstance(restarted, AnswerRestarted) and restarted.to_agent == "honest"
    assert restarted.discarded_chars == len("Made" + " up" * 40) and "claimed 10,000 tok/s" in restarted.reason
    assert connection.jobs()[-1].assistant_prefix is None
    await answer_honestly(coordinator, connection, "honest")
    rest = [event async for event in stream]
    assert isinstance(rest[-1], QueryFinished) and rest[-1].text == "Paris."
    assert "".join(e.text for e in rest if isinstance(e, TextDelta)) == "Paris."


async def test_the_router_learns_the_coordinators_measurement_not_the_agents_claim() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 20)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="q")]))
    await next_event(stream)
    job = connection.jobs()[0]
    topic = coordinator.topics.result("a")
    deliver(coordinator, topic, Result(request_id=job.request_id, seq=0, delta="One"))
    await asyncio.sleep(0.4)
    deliver(coordinator, topic, Result(request_id=job.request_id, seq=1, delta=" two" * 11, done=True,
                                       stats=ResultStats(output_tokens=12, tokens_per_s=400.0)))  # 12 in ~0.4 s
    [event async for event in stream]
    observed = coordinator._state.agents["a"].observed["llama3.2:3b"]
    assert observed.tokens_per_s is not None and 20 < observed.tokens_per_s < 40  # not 400
    view = coordinator.snapshot().agents[0]
    assert view.speed_source == "measured" and view.tokens_per_s == observed.tokens_per_s


async def test_fan_out_marks_an_empty_answer_and_strikes_its_agent() -> None:
    coordinator, connection = await offline_coordinator()
    liar(coordinator)
    ready_agent(coordinator, "honest", 20)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="q")], mode="all"))
    await next_event(stream)
    jobs = {topic.split("/")[-2]: job for topic, job in
            [(t, j) for t, j in zip([t for t, _ in connection.published if t.endswith("/job")], connection.jobs(),
                                    strict=True)]}
    deliver(coordinator, coordinator.topics.result("liar"), Result(request_id=jobs["liar"].request_id, seq=0,
                                                                    done=True))
    deliver(coordinator, coordinator.topics.result("honest"), Result(request_id=jobs["honest"].request_id, seq=0,
                                                                      delta="Paris.", done=True))
    events = [event async for event in stream]
    finished = {event.answer.agent_id: event.answer for event in events if isinstance(event, AgentFinished)}
    assert "empty answer" in (finished["liar"].error or "") and finished["honest"].error is None
    assert isinstance(events[-1], QueryFinished) and events[-1].text == "Paris."
    assert {agent.id: agent.strikes for agent in coordinator.snapshot().agents} == {"liar": 1, "honest": 0}


# ---------------------------------------------------------------- what an agent streams is bounded


def test_the_reorder_buffer_holds_a_bounded_number_of_characters_behind_a_gap() -> None:
    buffer = ReorderBuffer(max_pending_chars=1000)
    assert buffer.push(Result(request_id="r.1", seq=1, delta="x" * 600)) == []
    assert buffer.pending_chars == 600 and not buffer.overflowed
    assert buffer.push(Result(request_id="r.1", seq=2, delta="x" * 600)) == []  # would be 1,200: dropped
    assert buffer.overflowed and buffer.pending_chars == 600
    released = buffer.push(Result(request_id="r.1", seq=0, delta="a"))
    assert [chunk.seq for chunk in released] == [0, 1] and buffer.pending_chars == 0


def test_a_gap_at_seq_0_fails_the_attempt_after_the_between_chunks_wait_not_the_first_token_wait() -> None:
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=1000.0)
    attempt.accept(Result(request_id="r.1", seq=1, delta="later"), 1.0)
    assert attempt.stall_reason(5.0, 20, 10) is None and attempt.next_check(20, 10) == 11.0
    assert attempt.stall_reason(11.0, 20, 10) == "chunk 0 never arrived: later chunks waited 10 s for it"


def test_an_attempt_ends_as_too_long_at_the_cap_with_the_text_it_continues() -> None:
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=100.0, prefix="p" * 600, max_chars=1000)
    assert attempt.accept(Result(request_id="r.1", seq=0, delta="x" * 300), 1.0) == "x" * 300
    assert attempt.accept(Result(request_id="r.1", seq=1, delta="y" * 200), 1.1) == ""
    assert attempt.done and attempt.error_code == "too_long" and attempt.text == "x" * 300
    assert "passed the limit of 1,000 characters" in (attempt.error or "")
    assert attempt.accept(Result(request_id="r.1", seq=2, delta="z", done=True), 1.2) == ""


def stream_chunks(coordinator: Coordinator, agent_id: str, wire_id: str, total: int, size: int = 10_000,
                  letter: str = "x") -> int:
    for seq in range(total // size):
        deliver(coordinator, coordinator.topics.result(agent_id), Result(request_id=wire_id, seq=seq,
                                                                         delta=letter * size))
    return total // size


async def test_an_agent_that_streams_past_the_limit_and_dies_gives_a_clear_error_never_an_internal_one() -> None:
    """Before: 450,000 characters, then the agent died; the continuation job's prefix failed validation and the
    caller got "internal error". Now the answer stops at the limit with a clear error."""
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 50)
    ready_agent(coordinator, "b", 5)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="write forever")]))
    await next_event(stream)
    stream_chunks(coordinator, "a", connection.jobs()[0].request_id, 450_000)
    deliver(coordinator, coordinator.topics.status("a"), Status(state="offline"))
    events = [event async for event in stream]
    failed = events[-1]
    assert isinstance(failed, QueryFailed) and failed.code == "failed", failed.error[:300]
    assert "internal error" not in failed.error and "passed the limit of 400,000 characters" in failed.error
    assert len(failed.partial_text) <= MAX_PROMPT_CHARS
    assert any(topic == coordinator.topics.cancel("a") for topic, _ in connection.published)  # stop generating
    assert coordinator.snapshot().agents[0].strikes == 0  # a long answer is most likely the question's doing
    assert sum(len(e.text) for e in events if isinstance(e, TextDelta)) <= MAX_PROMPT_CHARS


async def test_a_partial_answer_that_no_longer_fits_in_a_job_restarts_instead_of_failing() -> None:
    """A long prompt plus the partial answer would pass the 1 MiB payload limit: the next agent starts over."""
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 50)
    ready_agent(coordinator, "b", 5)
    long_conversation = [ChatMessage(role="user", content="q" * 350_000),
                         ChatMessage(role="assistant", content="a" * 10),
                         ChatMessage(role="user", content="r" * 350_000)]
    stream = coordinator.query(QueryRequest(messages=long_conversation))
    await next_event(stream)
    stream_chunks(coordinator, "a", connection.jobs()[0].request_id, 390_000)
    deliver(coordinator, coordinator.topics.status("a"), Status(state="offline"))
    events: list[QueryEvent] = []
    while not any(isinstance(event, AnswerRestarted | QueryFailed) for event in events):
        events.append(await next_event(stream))
    assert isinstance(events[-1], AnswerRestarted), str(events[-1])[:300]
    assert events[-1].discarded_chars == 390_000 and connection.jobs()[-1].assistant_prefix is None
    await answer_honestly(coordinator, connection, "b")
    rest = [event async for event in stream]
    assert isinstance(rest[-1], QueryFinished) and rest[-1].text == "Paris."


async def test_a_continuation_that_fits_still_continues_up_to_the_limit() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 50)
    ready_agent(coordinator, "b", 5)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="long")]))
    await next_event(stream)
    stream_chunks(coordinator, "a", connection.jobs()[0].request_id, 390_000)
    deliver(coordinator, coordinator.topics.status("a"), Status(state="offline"))
    events: list[QueryEvent] = []
    while not any(isinstance(event, AgentSwitched) for event in events):
        events.append(await next_event(stream))
    job = connection.jobs()[-1]
    assert job.assistant_prefix is not None and len(job.assistant_prefix) == 390_000
    stream_chunks(coordinator, "b", job.request_id, 20_000, letter="y")  # 410,000 with the prefix
    rest = [event async for event in stream]
    assert isinstance(rest[-1], QueryFailed) and "passed the limit" in rest[-1].error
    assert len(rest[-1].partial_text) == 400_000


# ---------------------------------------------------------------- what an agent publishes reaches the view bounded


async def test_a_snapshot_stays_small_whatever_an_agent_publishes() -> None:
    """Lists and texts at the protocol's limits: the agent's view stays within a few tens of kB."""
    coordinator, _ = await offline_coordinator()
    names = [f"model-{index:04d}-" + "n" * 180 + ":1b" for index in range(MAX_MODELS)]
    topics = coordinator.topics
    deliver(coordinator, topics.status("big"), Status(state="online", backend="ollama", backend_error="e" * 5000,
                                                      hostname="h" * 255))
    deliver(coordinator, topics.hardware("big"), Hardware(
        cpu_brand="c" * 200, cpu_physical_cores=8, ram_total_gb=64, os="o" * 200, arch="a" * 200,
        gpus=[GpuInfo(name="g" * 200, vendor="nvidia", vram_total_gb=24) for _ in range(MAX_GPUS)]))
    deliver(coordinator, topics.model("big"), ModelState(model=names[0], state="ready", error="e" * 5000,
                                                         local_models=names, loaded_models=names))
    deliver(coordinator, topics.telemetry("big"), Telemetry())
    snapshot = coordinator.snapshot()
    (view,) = snapshot.agents
    size = len(json.dumps(dataclasses.asdict(view), default=str))
    assert size < 40_000, size
    assert len(view.local_models) == MAX_VIEW_MODELS and view.local_models_total == MAX_MODELS
    assert len(view.available_models) == MAX_VIEW_MODELS and view.available_models_total == MAX_MODELS
    assert view.loaded_models_total == MAX_MODELS and all(len(name) <= 120 for name in view.local_models)
    assert len(view.backend_error or "") <= 500 and len(view.model_error or "") <= 500
    assert snapshot.models_total == MAX_MODELS and len(snapshot.models) == MAX_SNAPSHOT_MODELS
    assert len(snapshot.servable_models) == MAX_SNAPSHOT_MODELS
    assert len(json.dumps(dataclasses.asdict(snapshot), default=str)) < 120_000
    assert len(coordinator.models()) == MAX_MODELS  # the model list itself is complete


def test_payload_limit_is_what_the_prefix_test_relies_on() -> None:
    assert 700_000 + 390_000 > MAX_PAYLOAD_BYTES > 700_000 + 1_000


@pytest.mark.parametrize("options", [{"num_predict": 0}, {"max_tokens": 0}])
async def test_an_empty_answer_to_a_question_that_allows_none_is_fine(options: dict[str, int]) -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 20)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="q")], options=options))
    await next_event(stream)
    deliver(coordinator, coordinator.topics.result("a"), Result(request_id=connection.jobs()[0].request_id, seq=0,
                                                                 done=True))
    events = [event async for event in stream]
    assert isinstance(events[-1], QueryFinished) and events[-1].text == ""

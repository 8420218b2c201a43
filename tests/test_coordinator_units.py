"""Coordinator pieces without a broker: chunk ordering, echo removal, stalls, aggregation, catalog, wiring."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from broker.coordinator.attempts import Attempt, EchoFilter, ReorderBuffer
from broker.coordinator.contract import AgentSwitched, QueryFailed, QueryFinished, QueryRequest, QueryStarted, TextDelta
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage
from broker.protocol import (
    ChatMessage,
    Hardware,
    Job,
    ModelState,
    Result,
    ResultStats,
    RuntimeProfile,
    Status,
    Telemetry,
    decode,
    encode,
)
from broker.scheduling.aggregation import consensus, similarity, synthesis_messages
from broker.scheduling.catalog import DEFAULT_CATALOG, CatalogError, load_catalog
from broker.scheduling.routing import Router


def chunk(seq: int, delta: str = "", done: bool = False, error: str | None = None) -> Result:
    stats = ResultStats(output_tokens=seq + 1, tokens_per_s=10.0) if done else None
    return Result(request_id="r.1", seq=seq, delta=delta, done=done, error=error, stats=stats)


# ---------------------------------------------------------------- reorder buffer


def test_chunks_are_released_in_order_and_duplicates_dropped() -> None:
    buffer = ReorderBuffer()
    assert [c.seq for c in buffer.push(chunk(1, "b"))] == []
    assert [c.seq for c in buffer.push(chunk(0, "a"))] == [0, 1]
    assert buffer.push(chunk(1, "b")) == [] and buffer.push(chunk(0, "a")) == []
    assert buffer.duplicates == 2
    assert [c.seq for c in buffer.push(chunk(3, "d", done=True))] == []
    assert buffer.waiting_for_gap
    assert [c.seq for c in buffer.push(chunk(2, "c"))] == [2, 3]
    assert buffer.finished and buffer.push(chunk(4, "late")) == []


def test_attempt_text_is_ordered_and_complete() -> None:
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=100.0)
    for seq, now in ((2, 1.0), (0, 1.1), (1, 1.2), (1, 1.3)):
        attempt.accept(chunk(seq, "abc"[seq]), now)
    attempt.accept(chunk(3, "", done=True), 1.4)
    assert attempt.text == "abc" and attempt.done and attempt.stats is not None


def test_stall_before_first_chunk_between_chunks_and_on_a_gap() -> None:
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=100.0)
    assert attempt.stall_reason(19.0, 20, 10) is None
    assert "no first token within 20 s" in (attempt.stall_reason(20.0, 20, 10) or "")
    attempt.accept(chunk(0, "a"), 5.0)
    assert attempt.stall_reason(14.0, 20, 10) is None
    attempt.accept(chunk(2, "c"), 13.0)  # chunk 1 lost: chunks keep coming, but nothing in order
    reason = attempt.stall_reason(15.0, 20, 10)
    assert reason is not None and "chunk 1 missing" in reason
    assert reason.startswith("no tokens for 10 s after 1 characters")
    assert attempt.next_check(20, 10) == 15.0


def test_an_attempt_that_keeps_producing_is_never_cut() -> None:
    """The 6 tok/s Pi: 4,000 characters over minutes is progress, not a stall (the old attempt deadline cut it)."""
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=1000.0)
    for seq in range(400):
        attempt.accept(chunk(seq, "0123456789"), 1.0 + seq)
        assert attempt.stall_reason(1.5 + seq, 20, 10) is None
    reason = attempt.stall_reason(400.0 + 10, 20, 10)
    assert reason == "no tokens for 10 s after 4,000 characters"


def test_first_token_allowance_replaces_the_configured_wait() -> None:
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=1000.0, first_chunk_s=95.0,
                      first_chunk_note=" (allowing for 2 job(s) queued ahead on 1 slot(s))")
    assert attempt.stall_reason(60.0, 20, 10) is None
    assert attempt.next_check(20, 10) == 95.0
    assert attempt.stall_reason(95.0, 20, 10) == (
        "no first token within 95 s (allowing for 2 job(s) queued ahead on 1 slot(s))")


def test_error_chunk_ends_the_attempt() -> None:
    attempt = Attempt("r.1", "a", "m", started_at=0.0, deadline=100.0)
    attempt.accept(Result(request_id="r.1", seq=0, error="model missing", error_code="model_missing"), 1.0)
    assert attempt.done and attempt.error_code == "model_missing"


# ---------------------------------------------------------------- echo filter


@pytest.mark.parametrize(
    ("prefix", "pieces", "expected"),
    [
        ("Hello wor", ["ld!"], "ld!"),  # a proper continuation
        ("Hello wor", ["Hel", "lo wor", "ld!"], "ld!"),  # the agent repeated the prefix first
        ("Hello wor", ["Hello world!"], "ld!"),  # ...in one piece
        ("Hello wor", ["Help"], "Help"),  # looked like an echo, was not
        ("", ["abc"], "abc"),
    ],
)
def test_echo_filter(prefix: str, pieces: list[str], expected: str) -> None:
    echo = EchoFilter(prefix)
    assert "".join(echo.feed(piece) for piece in pieces) + echo.flush() == expected


def test_continuation_never_repeats_text() -> None:
    attempt = Attempt("r.2", "b", "m", started_at=0.0, deadline=100.0, prefix="The answer is")
    attempt.accept(chunk(0, "The answer"), 1.0)
    attempt.accept(chunk(1, " is 42."), 1.1)
    attempt.accept(chunk(2, "", done=True), 1.2)
    assert "The answer is" + attempt.text == "The answer is 42."


# ---------------------------------------------------------------- aggregation


def test_similarity_bounds() -> None:
    assert similarity("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert similarity("the cat sat", "quantum chromodynamics rocks") == 0.0
    assert 0 < similarity("Paris is the capital of France", "The capital of France is Paris") < 1
    assert similarity("a b c", "c b a") < similarity("a b c", "a b c")


def test_consensus_picks_the_answer_closest_to_the_others() -> None:
    answers = [
        "The capital of France is Paris.",
        "Paris is the capital of France.",
        "I think it is Lyon, a large city.",
        "France's capital city is Paris.",
    ]
    result = consensus(answers)
    assert answers[result.index] != answers[2]
    assert 0 < result.agreement < 1  # type: ignore[operator]
    assert result.closeness[2] == min(result.closeness)


def test_consensus_agreement_is_one_for_identical_answers_and_none_for_one() -> None:
    assert consensus(["same words", "same words", "same words"]).agreement == pytest.approx(1.0)
    assert consensus(["only one"]).agreement is None
    with pytest.raises(ValueError):
        consensus([])


def test_synthesis_prompt_carries_question_and_every_answer() -> None:
    question = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Why is sky blue?")]
    messages = synthesis_messages(question, [("gpu / llama3.1:8b", "Rayleigh scattering."), ("pi / 1b", "Air.")])
    assert messages[0].content == "Be brief."
    assert messages[-1].role == "user"
    for text in ("Why is sky blue?", "Rayleigh scattering.", "Air.", "gpu / llama3.1:8b"):
        assert text in messages[-1].content


# ---------------------------------------------------------------- catalog and settings


def test_default_catalog_tiers() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    assert [catalog.primary(t.name).name for t in catalog.ordered_tiers] == [
        "llama3.1:8b", "llama3.2:3b", "llama3.2:1b"]
    assert catalog.tier_for_score(80).name == "large"
    assert catalog.tier_for_score(79.9).name == "medium"
    assert catalog.tier_for_score(59.9).name == "small"
    assert catalog.reference.name == "llama3.1:8b"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON: line 1"),
        ('{"tiers": [], "models": []}', "tiers: List should have at least 1 item"),
        ('{"tiers": [{"name": "t", "min_score": 0}], "models": [{"name": "m", "parameters_b": 1, '
         '"memory_gb": 1, "tier": "nope"}]}', "names tier 'nope'"),
        ('{"tiers": [{"name": "t", "min_score": 10}], "models": [{"name": "m", "parameters_b": 1, '
         '"memory_gb": 1, "tier": "t"}]}', "lowest tier must have min_score 0"),
        ('{"tiers": [{"name": "t", "min_score": 0}], "models": [{"name": "m", "parameters_b": 1, '
         '"memory_gb": -1, "tier": "t"}]}', "models.0.memory_gb: Input should be greater than 0"),
    ],
)
def test_bad_catalog_gives_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(content)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_missing_catalog_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read model catalog .*missing.json"):
        load_catalog(tmp_path / "missing.json")


def test_every_setting_is_described_and_has_an_env_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, field in CoordinatorSettings.model_fields.items():
        assert field.description, name
    monkeypatch.setenv("SLB_ROUTING_POLICY", "round_robin")
    monkeypatch.setenv("SLB_REPLAN_INTERVAL_S", "7")
    settings = CoordinatorSettings()
    assert settings.routing_policy == "round_robin" and settings.replan_interval_s == 7
    assert json.loads(Path(settings.catalog_path).read_text())["models"]


def test_routing_policy_auto_is_an_alias_of_expected_completion() -> None:
    """``--routing-policy auto`` predates the name clash with the routing mode ``auto`` and still works."""
    assert CoordinatorSettings(routing_policy="auto").routing_policy == "expected_completion"  # type: ignore[arg-type]
    assert CoordinatorSettings().routing_policy == "expected_completion"
    with pytest.raises(ValueError):
        CoordinatorSettings(routing_policy="fastest")  # type: ignore[arg-type]


# ---------------------------------------------------------------- coordinator wiring, without a network


class RecordingConnection:
    """Stands in for MqttConnection: records what the coordinator publishes."""

    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: object, **_: object) -> None:
        self.published.append((topic, payload if isinstance(payload, bytes) else encode(payload)))  # type: ignore[arg-type]

    def jobs(self) -> list[Job]:
        return [decode(Job, payload) for topic, payload in self.published if topic.endswith("/job")]


async def offline_coordinator(*, random_ties: bool = False,
                              **overrides: object) -> tuple[Coordinator, RecordingConnection]:
    coordinator = Coordinator(CoordinatorSettings(**overrides))  # type: ignore[arg-type]
    if not random_ties:
        # Ties rotate from turn 0 here (a running coordinator starts at a random turn, for several front ends),
        # so these tests route the same way every run.
        coordinator._execution.router = Router(coordinator.settings.routing_policy)
    coordinator._loop = asyncio.get_running_loop()
    connection = RecordingConnection()
    coordinator._connection = connection  # type: ignore[assignment]
    return coordinator, connection


def deliver(coordinator: Coordinator, topic: str, message: object) -> None:
    coordinator._on_message(InboundMessage(topic, encode(message), 1, False))  # type: ignore[arg-type]


def ready_agent(coordinator: Coordinator, agent_id: str, tokens_per_s: float, *, continues: bool | None = True,
                kind: str = "ollama", slots: int = 1, model: str = "llama3.2:3b", state: str = "ready",
                local: list[str] | None = None, max_parallel: int | None = None) -> None:
    topics = coordinator.topics
    runtime = RuntimeProfile(kind=kind, slots=slots, slots_source="measured", continues_prefill=continues)  # type: ignore[arg-type]
    deliver(coordinator, topics.status(agent_id), Status(state="online", runtime=runtime, max_parallel=max_parallel))
    deliver(coordinator, topics.hardware(agent_id), Hardware(cpu_physical_cores=8, ram_total_gb=32))
    deliver(coordinator, topics.model(agent_id), ModelState(model=model, state=state, local_models=local or []))  # type: ignore[arg-type]
    deliver(coordinator, topics.telemetry(agent_id), Telemetry(tokens_per_s=tokens_per_s, ttft_s=0.1))


async def test_out_of_order_duplicate_and_spoofed_chunks() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 50)
    ready_agent(coordinator, "b", 5)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="hi")]))
    started = await anext(stream)
    assert isinstance(started, QueryStarted) and started.agents == ["a"]
    (job,) = connection.jobs()
    for seq, text in ((1, " world"), (0, "hello"), (1, " world")):
        deliver(coordinator, coordinator.topics.result("a"), Result(request_id=job.request_id, seq=seq, delta=text))
    deliver(coordinator, coordinator.topics.result("b"), Result(request_id=job.request_id, seq=2, delta=" SPOOF"))
    deliver(coordinator, coordinator.topics.result("a"), Result(request_id=job.request_id, seq=2, done=True,
                                                                 stats=ResultStats(output_tokens=2)))
    events = [event async for event in stream]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "hello world"
    assert isinstance(events[-1], QueryFinished) and events[-1].text == "hello world"
    assert coordinator.metrics.registry.get_sample_value("slb_result_chunks_total", {"kind": "wrong_agent"}) == 1


async def test_stall_fails_over_with_the_partial_answer_and_cancels() -> None:
    coordinator, connection = await offline_coordinator(stall_first_token_s=0.3, stall_between_chunks_s=0.2)
    ready_agent(coordinator, "a", 50)
    ready_agent(coordinator, "b", 5)
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="hi")]))
    await anext(stream)
    first_job = connection.jobs()[0]
    deliver(coordinator, coordinator.topics.result("a"), Result(request_id=first_job.request_id, seq=0,
                                                                 delta="The answer"))
    assert isinstance(await anext(stream), TextDelta)
    switched = await anext(stream)  # chunk 1 never comes: the stall timer moves the job
    assert isinstance(switched, AgentSwitched) and switched.to_agent == "b" and "stalled" in switched.reason
    second_job = connection.jobs()[1]
    assert second_job.assistant_prefix == "The answer" and second_job.attempt == 1
    assert any(topic == coordinator.topics.cancel("a") for topic, _ in connection.published)
    deliver(coordinator, coordinator.topics.result("b"), Result(request_id=second_job.request_id, seq=0,
                                                                 delta="The answer is 42", done=True))
    events = [event async for event in stream]
    assert isinstance(events[-1], QueryFinished)
    assert events[-1].text == "The answer is 42" and events[-1].failovers == 1


async def test_gives_up_after_max_failovers_with_a_clear_error() -> None:
    coordinator, connection = await offline_coordinator(stall_first_token_s=0.1, max_failovers=1)
    for name in "abc":
        ready_agent(coordinator, name, 10)
    events = [event async for event in coordinator.query(QueryRequest(
        messages=[ChatMessage(role="user", content="hi")]))]
    failed = events[-1]
    assert isinstance(failed, QueryFailed) and failed.code == "failed"
    assert "gave up after 2 attempt(s)" in failed.error and "no first token" in failed.error
    assert len(connection.jobs()) == 2


async def test_no_agent_and_bad_request() -> None:
    coordinator, _ = await offline_coordinator()
    events = [event async for event in coordinator.query(QueryRequest(
        messages=[ChatMessage(role="user", content="hi")]))]
    assert isinstance(events[-1], QueryFailed) and events[-1].code == "no_agent"
    assert "no agent is online" in events[-1].error
    bad = [event async for event in coordinator.query(QueryRequest(messages=[], request_id="x"))]
    assert isinstance(bad[-1], QueryFailed) and bad[-1].code == "bad_request"

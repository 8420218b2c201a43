"""The coordinator with real runtimes' facts, without a broker: slots, any model an agent has, failover that never
splices, runtime finish reasons, deadlines, and model management (issue 12)."""

from __future__ import annotations

import asyncio

from broker.coordinator.contract import (
    AgentSwitched,
    AnswerRestarted,
    ManageFinished,
    ManageProgress,
    ManageStarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.runtime import Coordinator
from broker.protocol import (
    ChatMessage,
    Manage,
    ModelState,
    Operation,
    Result,
    ResultStats,
    Status,
    decode,
)
from tests.test_coordinator_units import RecordingConnection, deliver, offline_coordinator, ready_agent


def ask(text: str = "hi", mode: str = "auto", **kwargs: object) -> QueryRequest:
    return QueryRequest(messages=[ChatMessage(role="user", content=text)], mode=mode, **kwargs)  # type: ignore[arg-type]


def answer(coordinator: Coordinator, agent_id: str, wire_id: str, pieces: list[str], *, seq: int = 0,
           stats: ResultStats | None = None, error: str | None = None, error_code: str | None = None) -> None:
    """Deliver ``pieces`` as chunks; the last one ends the answer (done, or the error)."""
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        deliver(coordinator, coordinator.topics.result(agent_id), Result(
            request_id=wire_id, seq=seq + index, delta=piece, done=last and error is None,
            error=error if last else None, error_code=error_code if last else None,  # type: ignore[arg-type]
            stats=(stats or ResultStats(output_tokens=len(pieces))) if last and error is None else None))


async def next_job(connection: RecordingConnection, count: int) -> None:
    for _ in range(200):
        if len(connection.jobs()) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} job(s), got {len(connection.jobs())}")


async def rest(stream: object) -> list[QueryEvent]:
    return [event async for event in stream]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- failover that never splices


async def test_failover_to_a_runtime_that_cannot_continue_restarts_the_answer() -> None:
    coordinator, connection = await offline_coordinator(stall_first_token_s=5, stall_between_chunks_s=5)
    ready_agent(coordinator, "ollama", 50, continues=True)
    ready_agent(coordinator, "llamacpp", 5, continues=False, kind="llama-cpp-python")
    stream = coordinator.query(ask())
    assert (await anext(stream)).agents == ["ollama"]  # type: ignore[union-attr]
    first = connection.jobs()[0]
    deliver(coordinator, coordinator.topics.result("ollama"), Result(request_id=first.request_id, seq=0,
                                                                     delta="Once upon a time"))
    assert isinstance(await anext(stream), TextDelta)
    deliver(coordinator, coordinator.topics.status("ollama"), Status(state="offline"))
    restarted = await anext(stream)
    assert isinstance(restarted, AnswerRestarted)
    assert (restarted.from_agent, restarted.to_agent, restarted.discarded_chars) == ("ollama", "llamacpp", 16)
    assert "went away" in restarted.reason
    second = connection.jobs()[1]
    assert second.assistant_prefix is None and second.attempt == 1  # a new answer, not a continuation
    answer(coordinator, "llamacpp", second.request_id, ["In a land", " far away."],
           stats=ResultStats(output_tokens=7, finish_reason="stop", tokens_counted_by="agent"))
    events = await rest(stream)
    final = events[-1]
    assert isinstance(final, QueryFinished)
    assert final.text == "In a land far away." == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert final.failovers == 1 and final.agents == ["ollama", "llamacpp"]
    assert final.stats is not None and final.stats.output_tokens == 7 and final.stats.finish_reason == "stop"
    assert final.stats.tokens_counted_by == "agent"
    assert coordinator.metrics.registry.get_sample_value("slb_answer_restarts_total") == 1


async def test_failover_with_tools_restarts_the_call_even_where_the_next_runtime_could_continue() -> None:
    """Runtimes parse tool calls from their whole output: a continued half call would be spliced, never parsed."""
    coordinator, connection = await offline_coordinator(stall_first_token_s=5, stall_between_chunks_s=5)
    ready_agent(coordinator, "a", 100, continues=True)
    ready_agent(coordinator, "b", 90, continues=True)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    stream = coordinator.query(ask("weather in Paris?", tools=tools))
    assert (await anext(stream)).agents == ["a"]  # type: ignore[union-attr]
    first = connection.jobs()[0]
    assert first.tools and first.tools[0]["function"]["name"] == "get_weather"
    deliver(coordinator, coordinator.topics.result("a"), Result(request_id=first.request_id, seq=0,
                                                                delta='{"name": "get_wea'))
    assert isinstance(await anext(stream), TextDelta)
    deliver(coordinator, coordinator.topics.status("a"), Status(state="offline"))
    restarted = await anext(stream)
    assert isinstance(restarted, AnswerRestarted) and restarted.to_agent == "b"
    second = connection.jobs()[1]
    assert second.assistant_prefix is None and second.attempt == 1 and second.tools == first.tools
    answer(coordinator, "b", second.request_id, ["It is sunny."],
           stats=ResultStats(output_tokens=4, finish_reason="stop"))
    final = (await rest(stream))[-1]
    assert isinstance(final, QueryFinished) and final.text == "It is sunny." and final.agents == ["a", "b"]


async def test_a_partial_answer_prefers_an_agent_that_continues_it() -> None:
    coordinator, connection = await offline_coordinator(stall_first_token_s=5, stall_between_chunks_s=0.2)
    ready_agent(coordinator, "a", 100, continues=True)
    ready_agent(coordinator, "fast-restarter", 90, continues=False, kind="llama-cpp-python")
    ready_agent(coordinator, "slow-continuer", 5, continues=True)
    stream = coordinator.query(ask())
    assert (await anext(stream)).agents == ["a"]  # type: ignore[union-attr]
    deliver(coordinator, coordinator.topics.result("a"), Result(request_id=connection.jobs()[0].request_id, seq=0,
                                                                delta="The answer"))
    await anext(stream)
    switched = await anext(stream)  # a stalls: no tokens for 0.2 s
    assert isinstance(switched, AgentSwitched) and switched.to_agent == "slow-continuer"
    assert "stalled: no tokens for 0.2 s after 10 characters" in switched.reason
    job = connection.jobs()[1]
    assert job.assistant_prefix == "The answer"
    answer(coordinator, "slow-continuer", job.request_id, [" is 42."],
           stats=ResultStats(output_tokens=3, finish_reason="length", tokens_counted_by="runtime"))
    final = (await rest(stream))[-1]
    assert isinstance(final, QueryFinished) and final.text == "The answer is 42."
    assert final.stats is not None and final.stats.finish_reason == "length"


async def test_unknown_runtime_never_continues_but_a_failure_before_any_text_just_switches() -> None:
    coordinator, connection = await offline_coordinator(stall_first_token_s=0.2)
    ready_agent(coordinator, "a", 100, continues=None)  # profile not probed: treated as not continuing
    ready_agent(coordinator, "b", 5, continues=None)
    stream = coordinator.query(ask())
    await anext(stream)
    switched = await anext(stream)  # no first token: nothing to discard, a plain switch
    assert isinstance(switched, AgentSwitched) and "no first token within 0 s" in switched.reason
    job = connection.jobs()[1]
    answer(coordinator, "b", job.request_id, ["fine"])
    assert (await rest(stream))[-1].text == "fine"  # type: ignore[union-attr]


async def test_a_truncated_answer_is_a_failure_not_a_result() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 100, continues=False, kind="llama-cpp-python")
    ready_agent(coordinator, "b", 5, continues=False, kind="llama-cpp-python")
    stream = coordinator.query(ask())
    await anext(stream)
    first = connection.jobs()[0]
    answer(coordinator, "a", first.request_id, ["Half an ans", "wer"], error="the stream ended without a finish "
           "reason (cut short)", error_code="truncated")
    events: list[QueryEvent] = []
    while not any(isinstance(e, AnswerRestarted) for e in events):
        events.append(await anext(stream))
    restarted = events[-1]
    assert isinstance(restarted, AnswerRestarted) and restarted.reason.startswith("a: truncated")
    assert restarted.discarded_chars == len("Half an answer")
    answer(coordinator, "b", connection.jobs()[1].request_id, ["A whole answer."],
           stats=ResultStats(output_tokens=4, finish_reason="stop", tokens_counted_by="runtime"))
    final = (await rest(stream))[-1]
    assert isinstance(final, QueryFinished) and final.text == "A whole answer."
    assert coordinator.metrics.registry.get_sample_value("slb_failovers_total", {"reason": "truncated"}) == 1


async def test_runtime_finish_reason_and_counts_pass_through() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 100)
    stream = coordinator.query(ask())
    await anext(stream)
    answer(coordinator, "a", connection.jobs()[0].request_id, ["one", " two"], stats=ResultStats(
        prompt_tokens=9, output_tokens=2, finish_reason="length", tokens_counted_by="runtime", queue_s=0.5))
    final = (await rest(stream))[-1]
    assert isinstance(final, QueryFinished) and final.stats is not None
    stats = final.stats
    assert (stats.prompt_tokens, stats.output_tokens, stats.finish_reason, stats.tokens_counted_by, stats.queue_s) \
        == (9, 2, "length", "runtime", 0.5)


async def test_the_query_deadline_ends_a_long_answer_with_a_clear_message() -> None:
    coordinator, connection = await offline_coordinator(stall_between_chunks_s=5)
    ready_agent(coordinator, "a", 100)
    ready_agent(coordinator, "b", 100)
    stream = coordinator.query(ask(timeout_s=0.4))
    await anext(stream)
    job = connection.jobs()[0]
    for seq in range(3):
        deliver(coordinator, coordinator.topics.result("a"), Result(request_id=job.request_id, seq=seq, delta="ab"))
        await asyncio.sleep(0.05)
    events = await rest(stream)
    failed = events[-1]
    assert isinstance(failed, QueryFailed) and failed.code == "timeout"
    assert failed.error.startswith("the query's deadline of 0.4 s passed after 6 characters from a")
    assert failed.partial_text == "ababab"
    assert len(connection.jobs()) == 1  # no failover for the caller's own deadline
    assert job.deadline - job.ts < 1.0  # the agent drops the job at the query's deadline, not 120 s later


# ---------------------------------------------------------------- slots and queues


async def test_capacity_is_the_runtime_slots_not_the_declared_parallelism() -> None:
    coordinator, connection = await offline_coordinator(agent_queue_limit=0, admission_wait_s=0.2)
    ready_agent(coordinator, "a", 50, slots=1, max_parallel=4)  # declared 4, measured 1
    assert coordinator.snapshot().agents[0].slots == 1
    first = coordinator.query(ask("one"))
    assert isinstance(await anext(first), QueryStarted)
    busy = await rest(coordinator.query(ask("two")))
    assert isinstance(busy[-1], QueryFailed) and busy[-1].code == "busy"
    assert "(1 jobs for 1 places)" in busy[-1].error
    await first.aclose()


async def test_a_queued_job_gets_time_for_the_jobs_ahead_of_it() -> None:
    coordinator, connection = await offline_coordinator(agent_queue_limit=4, stall_first_token_s=1.0,
                                                        expected_output_tokens=100)
    ready_agent(coordinator, "pi", 10, slots=1)  # 10 tok/s: each answer ~10 s
    streams = [coordinator.query(ask(f"q{n}")) for n in range(3)]
    for stream in streams:
        await anext(stream)
    ledger = coordinator._ledger
    attempts = sorted((attempt for run in ledger.runs() for attempt in ledger.attempts_of(run)),
                      key=lambda attempt: attempt.started_at)
    assert attempts[0].first_chunk_s is None  # nothing ahead: the configured wait
    assert attempts[1].first_chunk_s is not None and attempts[1].first_chunk_s > 20  # one answer ahead (~10 s) × 2
    assert attempts[2].first_chunk_s is not None and attempts[2].first_chunk_s > attempts[1].first_chunk_s
    assert "2 job(s) queued ahead on 1 slot(s)" in attempts[2].first_chunk_note
    for stream in streams:
        await stream.aclose()


# ---------------------------------------------------------------- every model the machines have


async def test_any_model_an_agent_has_is_servable_under_the_agents_own_name() -> None:
    coordinator, connection = await offline_coordinator()
    # llama-cpp-python cannot pull the catalog's model: the assignment failed, but it serves its own model.
    ready_agent(coordinator, "cpp", 30, continues=False, kind="llama-cpp-python", model="llama3.2:1b",
                state="failed", local=["smollm2"])
    ready_agent(coordinator, "ollama", 30, local=["llama3.2:3b", "qwen2.5:0.5b", "nomic-embed-text:latest"])
    assert coordinator.model_names() == ["llama3.2:3b", "nomic-embed-text:latest", "qwen2.5:0.5b", "smollm2"]
    assert coordinator.model_names(chat_only=True) == ["llama3.2:3b", "qwen2.5:0.5b", "smollm2"]
    models = {model.name: model for model in coordinator.models()}
    assert [(h.agent_id, h.state) for h in models["smollm2"].holders] == [("cpp", "loaded")]
    assert [(h.agent_id, h.state) for h in models["llama3.2:3b"].holders] == [("ollama", "ready")]
    assert models["qwen2.5:0.5b"].holders[0].state == "local" and models["qwen2.5:0.5b"].context_length == 32768
    assert models["nomic-embed-text:latest"].embedding
    view = {agent.id: agent for agent in coordinator.snapshot().agents}
    assert view["cpp"].runtime["kind"] == "llama-cpp-python" and view["cpp"].available_models == {"smollm2": "loaded"}
    assert coordinator.snapshot().servable_models == coordinator.model_names()

    # A request for the runtime's own id, spelled the Ollama way, routes to it with the agent's spelling.
    stream = coordinator.query(ask(mode="smollm2:latest"))
    started = await anext(stream)
    assert isinstance(started, QueryStarted) and started.agents == ["cpp"] and started.models == ["smollm2"]
    job = connection.jobs()[-1]
    assert job.model == "smollm2"
    answer(coordinator, "cpp", job.request_id, ["hello"])
    assert isinstance((await rest(stream))[-1], QueryFinished)


async def test_auto_uses_the_best_model_an_agent_has_when_its_assignment_is_missing() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "cpp", 30, continues=False, kind="llama-cpp-python", model="llama3.2:1b",
                state="failed", local=["smollm2"])
    stream = coordinator.query(ask())
    started = await anext(stream)
    assert isinstance(started, QueryStarted) and started.models == ["smollm2"]
    answer(coordinator, "cpp", connection.jobs()[-1].request_id, ["hi"])
    assert isinstance((await rest(stream))[-1], QueryFinished)


async def test_a_model_nobody_has_names_what_is_available() -> None:
    coordinator, _ = await offline_coordinator()
    ready_agent(coordinator, "a", 30, local=["qwen2.5:0.5b"])
    failed = (await rest(coordinator.query(ask(mode="mistral:7b"))))[-1]
    assert isinstance(failed, QueryFailed) and failed.code == "no_agent"
    assert "no online agent has it" in failed.error and "llama3.2:3b, qwen2.5:0.5b" in failed.error


async def test_loaded_models_lists_what_is_in_memory_where() -> None:
    coordinator, _ = await offline_coordinator()
    ready_agent(coordinator, "a", 30, local=["llama3.2:3b", "qwen2.5:0.5b"])
    deliver(coordinator, coordinator.topics.model("a"), ModelState(
        model="llama3.2:3b", state="ready", local_models=["llama3.2:3b", "qwen2.5:0.5b"],
        loaded_models=["qwen2.5:0.5b"]))
    loaded = {(m.agent_id, m.name): m for m in coordinator.loaded_models()}
    assert set(loaded) == {("a", "qwen2.5:0.5b"), ("a", "llama3.2:3b")}
    assert loaded[("a", "llama3.2:3b")].assigned and loaded[("a", "llama3.2:3b")].ready
    assert not loaded[("a", "qwen2.5:0.5b")].assigned and loaded[("a", "qwen2.5:0.5b")].memory_gb == 0.9


# ---------------------------------------------------------------- model management


def manages(connection: RecordingConnection) -> list[tuple[str, Manage]]:
    return [(topic, decode(Manage, payload)) for topic, payload in connection.published if topic.endswith("/manage")]


async def test_pull_goes_where_asked_and_streams_the_agents_progress() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 30)
    ready_agent(coordinator, "b", 30)
    stream = coordinator.manage("pull", "qwen2.5:0.5b", agents=["b"], request_id="pull-1")
    started = await anext(stream)
    assert isinstance(started, ManageStarted) and started.agents == ["b"]
    ((topic, message),) = manages(connection)
    assert topic == coordinator.topics.manage("b") and (message.action, message.model) == ("pull", "qwen2.5:0.5b")
    # A reply from another agent for b's request is ignored; b's progress arrives in order.
    deliver(coordinator, coordinator.topics.operation("a"), Operation(
        request_id=message.request_id, action="pull", model="qwen2.5:0.5b", status="success", done=True))
    deliver(coordinator, coordinator.topics.operation("b"), Operation(
        request_id=message.request_id, action="pull", model="qwen2.5:0.5b", status="downloading",
        completed_bytes=10, total_bytes=100))
    deliver(coordinator, coordinator.topics.operation("b"), Operation(
        request_id=message.request_id, action="pull", model="qwen2.5:0.5b", status="success", done=True))
    events = [event async for event in stream]
    progress = [e for e in events if isinstance(e, ManageProgress)]
    assert [(e.agent_id, e.operation.status) for e in progress] == [("b", "downloading"), ("b", "success")]
    final = events[-1]
    assert isinstance(final, ManageFinished) and final.ok and final.results == {"b": None}


async def test_manage_targets_come_from_the_plan_and_the_agents_models() -> None:
    coordinator, _ = await offline_coordinator()
    ready_agent(coordinator, "a", 30, local=["llama3.2:3b", "qwen2.5:0.5b"])
    ready_agent(coordinator, "b", 30, local=["llama3.2:3b"])
    ready_agent(coordinator, "cpp", 30, continues=False, kind="llama-cpp-python", model="smollm2",
                local=["smollm2"])
    assert coordinator.manage_targets("delete", "qwen2.5:0.5b")[0] == ["a"]
    assert coordinator.manage_targets("unload", "llama3.2:3b")[0] == ["a", "b"]
    targets, reason = coordinator.manage_targets("pull", "llama3.2:3b")
    assert targets == ["a", "b"] and "assigned" in reason  # not cpp: its runtime cannot pull
    targets, reason = coordinator.manage_targets("pull", "qwen2.5:7b")
    assert len(targets) == 1 and targets[0] in ("a", "b") and "fits" in reason
    assert coordinator.manage_targets("pull", "llama3.3:70b") == (
        [], "llama3.3:70b (about 48 GB) does not fit the free memory of any online agent that can pull; name an "
            "agent to pull it anyway")


async def test_an_agent_that_leaves_or_stays_silent_ends_the_operation_with_an_error() -> None:
    coordinator, connection = await offline_coordinator()
    ready_agent(coordinator, "a", 30, local=["qwen2.5:0.5b"])
    ready_agent(coordinator, "b", 30, local=["qwen2.5:0.5b"])
    stream = coordinator.manage("delete", "qwen2.5:0.5b", timeout_s=0.3)
    assert isinstance(await anext(stream), ManageStarted)
    deliver(coordinator, coordinator.topics.status("a"), Status(state="offline"))
    final = [event async for event in stream][-1]
    assert isinstance(final, ManageFinished) and not final.ok
    assert "went away" in (final.results["a"] or "") and final.results["b"] == "no reply from b for 0.3 s"
    nothing = [event async for event in coordinator.manage("unload", "mistral:7b")]
    assert isinstance(nothing[-1], ManageFinished) and nothing[-1].error == "no online agent has mistral:7b loaded"
    bad = [event async for event in coordinator.manage("copy", "x")]
    assert "unknown action 'copy'" in (bad[-1].error or "")  # type: ignore[union-attr]

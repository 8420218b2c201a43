"""The registry is a pure function of messages and time."""

from __future__ import annotations

import pytest

from broker.protocol import Assign, Hardware, ModelState, ResultStats, RuntimeProfile, Status, Telemetry
from broker.scheduling.registry import (
    AgentExpired,
    AnswerMeasured,
    AssignmentSeen,
    ClusterState,
    HardwareReceived,
    ModelStateReceived,
    StatusReceived,
    TelemetryReceived,
    apply,
    find_expired,
)

ONLINE = Status(state="online", agent_version="1", backend="simulated", simulated=True)


def joined(agent_id: str = "a", now: float = 0.0, model: str | None = "llama3.2:1b") -> ClusterState:
    state = apply(ClusterState(), StatusReceived(agent_id, ONLINE), now)
    state = apply(state, HardwareReceived(agent_id, Hardware(ram_total_gb=8)), now)
    if model:
        state = apply(state, ModelStateReceived(agent_id, ModelState(model=model, state="ready")), now)
    return state


def test_online_agent_with_ready_model() -> None:
    state = joined()
    record = state.agents["a"]
    assert record.online and record.simulated
    assert record.ready_model == "llama3.2:1b"
    assert state.ready_models() == ["llama3.2:1b"]


def test_apply_never_mutates_the_old_state() -> None:
    before = joined()
    after = apply(before, StatusReceived("a", Status(state="offline")), 1.0)
    assert before.agents["a"].online and not after.agents["a"].online
    assert after.version > before.version


def test_last_will_takes_the_agent_offline_and_its_model_out_of_routing() -> None:
    state = apply(joined(), StatusReceived("a", Status(state="offline")), 1.0)
    assert not state.agents["a"].online
    assert state.agents["a"].ready_model is None
    assert state.ready_models() == []


def test_cleared_status_forgets_the_agent() -> None:
    state = apply(joined(), StatusReceived("a", None), 1.0)
    assert "a" not in state.agents


def test_missing_telemetry_expires_the_agent_explicitly() -> None:
    state = apply(joined(now=0.0), TelemetryReceived("a", Telemetry(interval_s=1.0)), 0.0)
    assert find_expired(state, 2.9, factor=3.0) == []
    events = find_expired(state, 3.5, factor=3.0)
    assert events == [AgentExpired("a", 3.5, 3.0)]
    state = apply(state, events[0], 3.5)
    assert not state.agents["a"].online and state.agents["a"].expired
    assert find_expired(state, 10.0, factor=3.0) == []  # already gone: no second event
    state = apply(state, TelemetryReceived("a", Telemetry(interval_s=1.0)), 11.0)
    assert state.agents["a"].online  # it spoke again


def test_agent_without_telemetry_expires_on_the_default_interval() -> None:
    state = joined(now=0.0)
    assert find_expired(state, 5.0, factor=3.0) == []
    assert [e.agent_id for e in find_expired(state, 6.5, factor=3.0)] == ["a"]


def test_only_silence_while_listening_expires_an_agent() -> None:
    state = apply(joined(now=0.0), TelemetryReceived("a", Telemetry(interval_s=1.0)), 0.0)
    assert find_expired(state, 10.0, factor=3.0, listening_since=None) == []  # the coordinator is offline
    assert find_expired(state, 10.0, factor=3.0, listening_since=8.0) == []  # reconnected 2 s ago, limit 3 s
    assert [e.agent_id for e in find_expired(state, 10.0, factor=3.0, listening_since=7.0)] == ["a"]


def test_backend_down_means_no_ready_model() -> None:
    state = apply(joined(), TelemetryReceived("a", Telemetry(backend_reachable=False)), 1.0)
    assert state.agents["a"].online and state.agents["a"].ready_model is None


def test_failed_model_is_remembered_until_it_works() -> None:
    state = apply(joined(model=None), ModelStateReceived("a", ModelState(model="big", state="failed",
                                                                         error="out of memory")), 5.0)
    assert state.agents["a"].failed_models["big"].error == "out of memory"
    state = apply(state, ModelStateReceived("a", ModelState(model="big", state="ready")), 9.0)
    assert "big" not in state.agents["a"].failed_models


def test_assignment_read_back_is_the_current_model() -> None:
    state = apply(joined(model=None), AssignmentSeen("a", Assign(model="llama3.1:8b", assignment_id="x1")), 1.0)
    assert state.agents["a"].current_model == "llama3.1:8b"
    state = apply(state, AssignmentSeen("a", None), 2.0)
    assert state.agents["a"].current_model is None


def test_observed_speed_is_a_moving_average() -> None:
    state = joined()
    for speed in (10.0, 20.0, 20.0):
        state = apply(state, AnswerMeasured("a", "llama3.2:1b", ResultStats(tokens_per_s=speed, ttft_s=0.5)), 1.0)
    estimate = state.agents["a"].observed["llama3.2:1b"]
    assert estimate.samples == 3
    assert 10.0 < estimate.tokens_per_s < 20.0  # type: ignore[operator]
    assert estimate.ttft_s == pytest.approx(0.5)


def test_queue_wait_at_the_agent_is_not_learned_as_time_to_first_token() -> None:
    """Routing adds the queue wait itself; the agent's queue inside ttft_s must not count twice."""
    stats = ResultStats(tokens_per_s=30.0, ttft_s=2.3, queue_s=2.0)
    state = apply(joined(), AnswerMeasured("a", "llama3.2:1b", stats), 1.0)
    assert state.agents["a"].observed["llama3.2:1b"].ttft_s == pytest.approx(0.3)


def test_restart_rebuilds_the_same_picture_from_retained_messages() -> None:
    """A new coordinator that receives the retained topics again sees the same cluster."""
    retained = [
        StatusReceived("a", ONLINE),
        HardwareReceived("a", Hardware(cpu_physical_cores=8, ram_total_gb=32)),
        ModelStateReceived("a", ModelState(model="llama3.2:3b", state="ready")),
        AssignmentSeen("a", Assign(model="llama3.2:3b", assignment_id="x")),
        StatusReceived("b", Status(state="offline")),
    ]
    first = second = ClusterState()
    for event in retained:
        first = apply(first, event, 0.0)
    for event in reversed(retained):  # arrival order does not matter
        second = apply(second, event, 100.0)
    for agent_id in ("a", "b"):
        one, two = first.agents[agent_id], second.agents[agent_id]
        assert (one.online, one.ready_model, one.current_model, one.hardware) == (
            two.online, two.ready_model, two.current_model, two.hardware)


def test_max_parallel_from_telemetry_or_status() -> None:
    state = joined()
    assert state.agents["a"].max_parallel == 1
    state = apply(state, StatusReceived("a", ONLINE.model_copy(update={"max_parallel": 3})), 1.0)
    assert state.agents["a"].max_parallel == 3
    state = apply(state, TelemetryReceived("a", Telemetry(max_parallel=4)), 1.0)
    assert state.agents["a"].max_parallel == 4


def test_runtime_profile_slots_and_what_an_agent_offers() -> None:
    profile = RuntimeProfile(kind="llama-cpp-python", slots=1, slots_source="measured", continues_prefill=False)
    status = Status(state="online", backend="openai", max_parallel=4, runtime=profile)
    state = apply(ClusterState(), StatusReceived("cpp", status), 0.0)
    state = apply(state, ModelStateReceived("cpp", ModelState(model="llama3.2:1b", state="failed",
                                                              local_models=["smollm2"])), 0.0)
    record = state.agents["cpp"]
    assert record.runtime == profile and record.slots == 1 and record.max_parallel == 4
    assert not record.can_pull and not record.continues_prefill
    assert record.loaded_models == ("smollm2",)  # a single-model server holds what it lists
    assert [(offer.name, offer.state) for offer in record.offers()] == [("smollm2", "loaded")]
    state = apply(state, TelemetryReceived("cpp", Telemetry(backend_reachable=False)), 1.0)
    assert state.agents["cpp"].offers() == ()  # an unreachable runtime offers nothing


def test_ollama_offers_ready_then_loaded_then_local_and_older_agents_can_pull() -> None:
    state = apply(ClusterState(), StatusReceived("o", Status(state="online", backend="ollama")), 0.0)
    state = apply(state, ModelStateReceived("o", ModelState(
        model="llama3.2:3b", state="ready", local_models=["llama3.2:3b", "qwen2.5:0.5b", "gemma3:1b"],
        loaded_models=["gemma3:1b"])), 0.0)
    record = state.agents["o"]
    assert [(offer.name, offer.state) for offer in record.offers()] == [
        ("llama3.2:3b", "ready"), ("gemma3:1b", "loaded"), ("qwen2.5:0.5b", "local")]
    assert record.can_pull and not record.continues_prefill and record.slots == 1  # no profile yet
    assert joined().agents["a"].continues_prefill  # the simulated backend continues by construction


def test_an_agent_delivering_results_is_alive_though_its_telemetry_is_late() -> None:
    state = apply(joined(now=0.0), TelemetryReceived("a", Telemetry(interval_s=1.0)), 0.0)
    assert [event.agent_id for event in find_expired(state, 3.5, factor=3.0)] == ["a"]
    assert find_expired(state, 3.5, factor=3.0, heard={"a": 3.0}) == []
    assert [event.agent_id for event in find_expired(state, 7.0, factor=3.0, heard={"a": 3.0})] == ["a"]

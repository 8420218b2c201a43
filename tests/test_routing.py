"""Routing: expected completion time from queues and measured speeds; baselines; circuit breaker."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from broker.protocol import Hardware, ModelState, ResultStats, RuntimeProfile, Status, Telemetry
from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
from broker.scheduling.registry import (
    AnswerMeasured,
    ClusterState,
    HardwareReceived,
    ModelStateReceived,
    StatusReceived,
    TelemetryReceived,
    apply,
)
from broker.scheduling.routing import CircuitBreaker, RouteCandidate, Router, largest_model, route_candidates

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
CATALOG = load_catalog(DEFAULT_CATALOG)


def candidate(agent_id: str, tokens_per_s: float, outstanding: int = 0, slots: int = 1, ttft_s: float = 0.2,
              model: str = "m", cooling: bool = False) -> RouteCandidate:
    return RouteCandidate(agent_id, model, outstanding, slots, tokens_per_s, ttft_s, "observed", cooling)


def ready_agent(state: ClusterState, agent_id: str, machine: str, model: str) -> ClusterState:
    state = apply(state, StatusReceived(agent_id, Status(state="online")), 0.0)
    hardware = Hardware.model_validate(json.loads((FIXTURES / f"{machine}.json").read_text()))
    state = apply(state, HardwareReceived(agent_id, hardware), 0.0)
    return apply(state, ModelStateReceived(agent_id, ModelState(model=model, state="ready")), 0.0)


def test_expected_completion_time_adds_queue_wait_ttft_and_generation() -> None:
    idle = candidate("a", tokens_per_s=50, ttft_s=0.5)
    assert idle.expected_completion_s(100) == pytest.approx(0.5 + 2.0)
    queued = candidate("a", tokens_per_s=50, ttft_s=0.5, outstanding=2)
    assert queued.expected_completion_s(100) == pytest.approx(3 * 2.5)
    parallel = candidate("a", tokens_per_s=50, ttft_s=0.5, outstanding=1, slots=4)
    assert 2.5 < parallel.expected_completion_s(100) < queued.expected_completion_s(100)


def test_auto_picks_the_fast_agent_until_its_queue_makes_the_slow_one_faster() -> None:
    router = Router("expected_completion")
    fast_busy = candidate("fast", tokens_per_s=100, outstanding=3)
    slow_idle = candidate("slow", tokens_per_s=10)
    assert router.choose([fast_busy, slow_idle], 256).candidate.agent_id == "fast"
    very_busy = candidate("fast", tokens_per_s=100, outstanding=20)
    route = router.choose([very_busy, slow_idle], 256)
    assert route.candidate.agent_id == "slow"
    assert "lowest expected completion" in route.reason and "fast" in route.reason


def test_auto_uses_measured_speed_not_the_static_score() -> None:
    """The GPU desktop outscores the laptop, but it measured slow (another app hogs the GPU)."""
    state = ready_agent(ClusterState(), "desktop", "desktop_ryzen9_rtx4090_24g", "llama3.2:3b")
    state = ready_agent(state, "laptop", "laptop_i7_iris_16g", "llama3.2:3b")
    found = route_candidates(state, CATALOG, model=None, own_inflight={}, external={}, cooling={})
    # cold start: hardware prior
    assert Router("expected_completion").choose(found, 256).candidate.agent_id == "desktop"
    for _ in range(5):
        state = apply(state, AnswerMeasured("desktop", "llama3.2:3b", ResultStats(tokens_per_s=3, ttft_s=2)), 1.0)
        state = apply(state, AnswerMeasured("laptop", "llama3.2:3b", ResultStats(tokens_per_s=15, ttft_s=0.4)), 1.0)
    found = route_candidates(state, CATALOG, model=None, own_inflight={}, external={}, cooling={})
    assert {c.agent_id: c.speed_source for c in found} == {"desktop": "observed", "laptop": "observed"}
    assert Router("expected_completion").choose(found, 256).candidate.agent_id == "laptop"


def test_telemetry_speed_is_used_before_any_observation() -> None:
    state = ready_agent(ClusterState(), "pi", "raspberry_pi5_8g", "llama3.2:1b")
    state = apply(state, TelemetryReceived("pi", Telemetry(tokens_per_s=42.0, ttft_s=0.1)), 0.0)
    (found,) = route_candidates(state, CATALOG, model=None, own_inflight={}, external={}, cooling={})
    assert (found.tokens_per_s, found.ttft_s, found.speed_source) == (42.0, 0.1, "telemetry")


def test_candidates_count_own_and_external_jobs_and_filter_by_model() -> None:
    state = ready_agent(ClusterState(), "a", "laptop_i7_iris_16g", "llama3.2:3b")
    state = ready_agent(state, "b", "raspberry_pi5_8g", "llama3.2:1b")
    state = apply(state, StatusReceived("c", Status(state="offline")), 0.0)
    found = route_candidates(state, CATALOG, model=None, own_inflight={"a": 2}, external={"a": 1}, cooling={})
    assert [(c.agent_id, c.outstanding) for c in found] == [("a", 3), ("b", 0)]
    named = route_candidates(state, CATALOG, model="llama3.2:1b", own_inflight={}, external={}, cooling={})
    assert [c.agent_id for c in named] == ["b"]
    excluded = route_candidates(state, CATALOG, model=None, own_inflight={}, external={}, cooling={},
                                exclude=frozenset({"a"}))
    assert [c.agent_id for c in excluded] == ["b"]


def test_quality_is_the_largest_ready_model() -> None:
    found = [candidate("a", 10, model="llama3.2:1b"), candidate("b", 5, model="llama3.1:8b"),
             candidate("c", 50, model="llama3.2:3b")]
    assert largest_model(found, CATALOG) == "llama3.1:8b"
    assert largest_model([], CATALOG) is None


def test_equal_agents_share_the_load() -> None:
    router = Router("expected_completion")
    pool = [candidate(name, tokens_per_s=20) for name in "abc"]
    picks = Counter(router.choose(pool, 100).candidate.agent_id for _ in range(30))
    assert picks == {"a": 10, "b": 10, "c": 10}


def test_round_robin_cycles_regardless_of_speed() -> None:
    router = Router("round_robin")
    pool = [candidate("a", 1000), candidate("b", 1, outstanding=5)]
    assert [router.choose(pool, 100).candidate.agent_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_random_is_seeded_and_uses_everyone() -> None:
    router = Router("random", rng=random.Random(7))
    pool = [candidate(name, 10) for name in "abcd"]
    assert set(router.choose(pool, 100).candidate.agent_id for _ in range(100)) == set("abcd")


def test_least_outstanding_ignores_speed() -> None:
    router = Router("least_outstanding")
    pool = [candidate("fast", 1000, outstanding=2), candidate("slow", 1, outstanding=1)]
    assert router.choose(pool, 100).candidate.agent_id == "slow"
    per_slot = [candidate("wide", 10, outstanding=3, slots=4), candidate("narrow", 10, outstanding=1)]
    assert router.choose(per_slot, 100).candidate.agent_id == "wide"


def test_cooling_agents_are_a_last_resort() -> None:
    router = Router("expected_completion")
    pool = [candidate("fast", 1000, cooling=True), candidate("slow", 1)]
    assert router.choose(pool, 100).candidate.agent_id == "slow"
    route = router.choose([candidate("fast", 1000, cooling=True)], 100)
    assert route.candidate.agent_id == "fast" and "cooling down" in route.reason


def test_circuit_breaker_opens_after_repeated_failures_and_closes_after_cooldown() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=60)
    assert not breaker.record_failure("a", 0.0)
    assert not breaker.record_failure("a", 1.0)
    assert breaker.record_failure("a", 2.0)
    assert breaker.cooling_down("a", 30.0) and breaker.cooling(30.0) == {"a": True}
    assert not breaker.cooling_down("a", 62.5)
    breaker.record_failure("b", 0.0)
    breaker.record_success("b")
    breaker.record_failure("b", 1.0)
    breaker.record_failure("b", 2.0)
    assert not breaker.cooling_down("b", 3.0)  # the success reset the count


def test_choose_needs_candidates() -> None:
    with pytest.raises(ValueError):
        Router().choose([], 100)


# ---------------------------------------------------------------- issue 12: any model an agent has, real slots


def runtime_agent(state: ClusterState, agent_id: str, machine: str, *, model: str | None, model_state: str,
                  local: list[str], loaded: list[str] | None = None, slots: int = 1,
                  kind: str = "ollama") -> ClusterState:
    profile = RuntimeProfile(kind=kind, slots=slots, slots_source="measured")  # type: ignore[arg-type]
    state = apply(state, StatusReceived(agent_id, Status(state="online", max_parallel=8, runtime=profile)), 0.0)
    hardware = Hardware.model_validate(json.loads((FIXTURES / f"{machine}.json").read_text()))
    state = apply(state, HardwareReceived(agent_id, hardware), 0.0)
    return apply(state, ModelStateReceived(agent_id, ModelState(
        model=model, state=model_state, local_models=local, loaded_models=loaded or [])), 0.0)  # type: ignore[arg-type]


def test_a_named_model_routes_to_every_agent_that_has_it_preferring_one_with_it_in_memory() -> None:
    state = runtime_agent(ClusterState(), "disk", "desktop_ryzen9_rtx4090_24g", model="llama3.1:8b",
                          model_state="ready", local=["llama3.1:8b", "qwen2.5:0.5b"])
    state = runtime_agent(state, "memory", "laptop_i7_iris_16g", model="llama3.2:3b", model_state="ready",
                          local=["llama3.2:3b", "Qwen2.5:0.5B"], loaded=["Qwen2.5:0.5B"])
    found = route_candidates(state, CATALOG, model="qwen2.5:0.5b", own_inflight={}, external={}, cooling={})
    by_agent = {c.agent_id: c for c in found}
    assert by_agent["disk"].availability == "local" and by_agent["memory"].availability == "loaded"
    assert by_agent["memory"].model == "Qwen2.5:0.5B"  # each agent's own spelling goes into its job
    assert by_agent["disk"].ttft_s > by_agent["memory"].ttft_s + 1.0  # loading from disk costs time
    assert Router().choose(found, 64).candidate.agent_id == "memory"


def test_auto_falls_back_to_the_largest_model_that_fits_when_the_assignment_failed() -> None:
    state = runtime_agent(ClusterState(), "pi", "raspberry_pi5_8g", model="llama3.2:1b", model_state="failed",
                          local=["qwen2.5:32b", "smollm2:360m", "smollm2:135m", "nomic-embed-text:latest"])
    (found,) = route_candidates(state, CATALOG, model=None, own_inflight={}, external={}, cooling={})
    assert found.model == "smollm2:360m"  # the 32B does not fit 8 GB; embeddings never answer a chat
    pulling = runtime_agent(ClusterState(), "pi", "raspberry_pi5_8g", model="llama3.2:1b", model_state="pulling",
                            local=["smollm2:135m"])
    assert [c.model for c in route_candidates(pulling, CATALOG, model=None, own_inflight={}, external={},
                                              cooling={})] == ["smollm2:135m"]
    loading = runtime_agent(ClusterState(), "pi", "raspberry_pi5_8g", model="llama3.2:1b", model_state="loading",
                            local=["smollm2:135m", "llama3.2:1b"])
    assert route_candidates(loading, CATALOG, model=None, own_inflight={}, external={}, cooling={}) == []


def test_capacity_and_queue_wait_come_from_the_runtimes_real_slots() -> None:
    state = runtime_agent(ClusterState(), "cpp", "laptop_i7_iris_16g", model="smollm2", model_state="ready",
                          local=["smollm2"], slots=1, kind="llama-cpp-python")
    (found,) = route_candidates(state, CATALOG, model=None, own_inflight={"cpp": 2}, external={}, cooling={})
    assert found.slots == 1 and found.availability == "ready" and not found.continues_prefill
    assert found.queue_wait_s(100) == pytest.approx(2 * (found.ttft_s + 100 / found.tokens_per_s))

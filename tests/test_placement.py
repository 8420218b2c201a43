"""Placement: tiers, fit, fall-back, hysteresis, stagger, mix and reasons — pure, on hardware fixtures."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol import Assign, GpuInfo, Hardware, ModelState, ResultStats, RuntimeProfile, Status, Telemetry
from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
from broker.scheduling.placement import PlacementSettings, Plan, plan_placement
from broker.scheduling.registry import (
    AnswerMeasured,
    AssignmentSeen,
    ClusterState,
    HardwareReceived,
    ModelStateReceived,
    StatusReceived,
    TelemetryReceived,
    apply,
)
from broker.scheduling.scoring import Score

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
CATALOG = load_catalog(DEFAULT_CATALOG)
DEFAULTS = PlacementSettings()
ONE_MODEL_EACH = replace(DEFAULTS, extra_models=0)
"""For tests of model moves alone: extra models beside the main one are tested on their own."""


def hardware(name: str) -> Hardware:
    return Hardware.model_validate(json.loads((FIXTURES / f"{name}.json").read_text()))


def add(
    state: ClusterState,
    agent_id: str,
    machine: str | Hardware,
    *,
    current: str | None = None,
    model_state: str | None = None,
    telemetry: Telemetry | None = None,
    online: bool = True,
) -> ClusterState:
    status = Status(state="online" if online else "offline")
    state = apply(state, StatusReceived(agent_id, status), 0.0)
    state = apply(state, HardwareReceived(agent_id, hardware(machine) if isinstance(machine, str) else machine), 0.0)
    if current is not None:
        state = apply(state, AssignmentSeen(agent_id, Assign(model=current, assignment_id="old")), 0.0)
        if model_state is not None:
            state = apply(state, ModelStateReceived(agent_id, ModelState(model=current, state=model_state)), 0.0)
    if telemetry is not None:
        state = apply(state, TelemetryReceived(agent_id, telemetry), 0.0)
    return state


def targets(plan: Plan) -> dict[str, str]:
    return {entry.agent_id: entry.target_model for entry in plan.entries}


def applied(state: ClusterState, plan: Plan, ready: bool = True) -> ClusterState:
    """The registry after the plan's assignments went out and the agents made their models ready."""
    for entry in plan.changes:
        assign = Assign(model=entry.target_model, assignment_id="n", also=list(entry.also))
        state = apply(state, AssignmentSeen(entry.agent_id, assign), 1.0)
        if ready:
            state = apply(state, ModelStateReceived(entry.agent_id, ModelState(model=entry.target_model,
                                                                               state="ready")), 1.0)
    return state


def demo_cluster() -> ClusterState:
    state = ClusterState()
    state = add(state, "gpu-desktop", "desktop_ryzen9_rtx4090_24g")
    state = add(state, "laptop", "laptop_i7_iris_16g")
    return add(state, "raspberry-pi", "raspberry_pi5_8g")


def test_three_demo_machines_get_the_three_default_tiers() -> None:
    plan = plan_placement(demo_cluster(), CATALOG, DEFAULTS, now=1.0)
    assert targets(plan) == {"gpu-desktop": "llama3.1:8b", "laptop": "llama3.2:3b", "raspberry-pi": "llama3.2:1b"}
    assert [e.agent_id for e in plan.entries] == ["gpu-desktop", "laptop", "raspberry-pi"]  # by score
    assert all(entry.change and not entry.deferred for entry in plan.entries)
    assert "score 100.0 → large" in plan.entries[0].reason
    assert plan.excluded == {}


def test_a_plan_of_the_applied_plan_changes_nothing() -> None:
    state = demo_cluster()
    first = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    second = plan_placement(applied(state, first), CATALOG, DEFAULTS, now=2.0)
    assert second.changes == [] and second.deferred == []
    assert targets(second) == targets(first)


def test_model_that_does_not_fit_falls_back_with_the_reason() -> None:
    state = add(ClusterState(), "desktop", "desktop_ryzen9_rtx4090_24g",
                telemetry=Telemetry(vram_free_gb=5.0, ram_free_gb=50))
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    entry = plan.entries[0]
    assert entry.target_model == "llama3.2:3b"
    assert "llama3.1:8b needs 6.2 + 1 GB headroom, 5.0 GB VRAM free" in entry.reason
    assert "falls back to llama3.2:3b" in entry.reason


def test_small_vram_card_gets_what_fits_in_vram_not_ram() -> None:
    """The GTX 1650 has 4 GB of VRAM (and 16 GB of RAM): the tier's primary does not fit, a smaller 3B model does."""
    plan = plan_placement(add(ClusterState(), "old", "desktop_i5_gtx1650_4g"), CATALOG, DEFAULTS, now=1.0)
    assert targets(plan) == {"old": "qwen2.5:3b"}
    assert "llama3.2:3b needs 3.4 + 1 GB headroom, 4.0 GB VRAM free" in plan.entries[0].reason


def test_the_model_already_loaded_counts_as_free_memory() -> None:
    """An agent serving the 8B model has little VRAM free, and that must not push the model out."""
    state = add(ClusterState(), "desktop", "desktop_ryzen9_rtx4090_24g", current="llama3.1:8b",
                model_state="ready", telemetry=Telemetry(vram_free_gb=17.5))
    plan = plan_placement(state, CATALOG, ONE_MODEL_EACH, now=1.0)
    assert plan.changes == [] and targets(plan) == {"desktop": "llama3.1:8b"}


def test_simulated_agents_are_judged_on_declared_totals() -> None:
    state = apply(ClusterState(), StatusReceived("sim", Status(state="online", simulated=True)), 0.0)
    state = apply(state, HardwareReceived("sim", hardware("laptop_i7_iris_16g")), 0.0)
    state = apply(state, TelemetryReceived("sim", Telemetry(ram_free_gb=0.5, simulated=True)), 0.0)
    assert targets(plan_placement(state, CATALOG, DEFAULTS, now=1.0)) == {"sim": "llama3.2:3b"}


def test_nothing_fits_excludes_the_agent_with_the_reason() -> None:
    tiny = Hardware(cpu_physical_cores=1, cpu_max_ghz=1.0, ram_total_gb=1.0)
    plan = plan_placement(add(ClusterState(), "tiny", tiny), CATALOG, DEFAULTS, now=1.0)
    assert plan.entries == ()
    assert plan.excluded["tiny"].startswith("no catalog model fits")
    assert "llama3.2:1b needs 2.2 + 1 GB headroom, 1.0 GB RAM free" in plan.excluded["tiny"]


def test_a_small_machine_gets_the_largest_small_model_that_fits() -> None:
    """2 GB of RAM: the 1B class's primary does not fit, a sub-1B model of the catalog does."""
    tiny = Hardware(cpu_physical_cores=1, cpu_max_ghz=1.0, ram_total_gb=2.0)
    plan = plan_placement(add(ClusterState(), "tiny", tiny), CATALOG, DEFAULTS, now=1.0)
    assert targets(plan) == {"tiny": "qwen2.5:0.5b"}
    assert "llama3.2:1b needs 2.2 + 1 GB headroom, 2.0 GB RAM free" in plan.entries[0].reason


def test_offline_and_silent_agents_are_excluded_with_reasons() -> None:
    state = add(demo_cluster(), "gone", "laptop_i7_iris_16g", online=False)
    state = apply(state, StatusReceived("mute", Status(state="online")), 0.0)
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    assert plan.excluded == {"gone": "offline", "mute": "has not reported its hardware yet"}
    assert len(plan.entries) == 3


def test_failed_model_is_not_offered_again_for_a_while() -> None:
    state = add(ClusterState(), "desktop", "desktop_ryzen9_rtx4090_24g")
    state = apply(state, ModelStateReceived("desktop", ModelState(model="llama3.1:8b", state="failed",
                                                                  error="pull failed: disk full")), 0.0)
    plan = plan_placement(state, CATALOG, DEFAULTS, now=10.0)
    assert targets(plan) == {"desktop": "qwen2.5:7b"}  # the next model of its tier
    assert "disk full" in plan.entries[0].reason
    later = plan_placement(state, CATALOG, DEFAULTS, now=10.0 + DEFAULTS.failed_retry_s)
    assert targets(later) == {"desktop": "llama3.1:8b"}


def _scored(state: ClusterState, **scores: float) -> dict[str, Score]:
    return {agent_id: Score(value, ()) for agent_id, value in scores.items()}


def test_hysteresis_small_score_changes_reassign_nothing() -> None:
    state = add(ClusterState(), "laptop", "laptop_i7_iris_16g", current="llama3.2:3b", model_state="ready")
    for score in (56.0, 62.0, 79.0, 82.0, 84.9):
        plan = plan_placement(state, CATALOG, ONE_MODEL_EACH, now=1.0, scores=_scored(state, laptop=score))
        assert plan.changes == [], score
        assert "hysteresis" in plan.entries[0].reason or score < 80
    up = plan_placement(state, CATALOG, DEFAULTS, now=1.0, scores=_scored(state, laptop=85.0))
    down = plan_placement(state, CATALOG, DEFAULTS, now=1.0, scores=_scored(state, laptop=54.9))
    assert targets(up) == {"laptop": "llama3.1:8b"} and targets(down) == {"laptop": "llama3.2:1b"}


def test_stagger_moves_ready_agents_a_few_at_a_time_and_keeps_one_ready() -> None:
    state = ClusterState()
    for n in range(4):
        state = add(state, f"d{n}", "desktop_ryzen9_rtx4090_24g", current="llama3.2:1b", model_state="ready")
    plan = plan_placement(state, CATALOG, PlacementSettings(mix=False), now=1.0)
    assert len(plan.changes) == 1 and len(plan.deferred) == 3
    assert all("deferred" in entry.reason for entry in plan.deferred)
    # The mover is pulling now: nobody else may leave until it is ready.
    moving = applied(state, plan, ready=False)
    moving = apply(moving, ModelStateReceived(plan.changes[0].agent_id,
                                              ModelState(model="llama3.1:8b", state="pulling")), 2.0)
    assert plan_placement(moving, CATALOG, PlacementSettings(mix=False), now=2.0).changes == []
    # Once it is ready the next one goes; eventually all moved.
    for _ in range(4):
        plan = plan_placement(state, CATALOG, PlacementSettings(mix=False), now=3.0)
        state = applied(state, plan)
    assert set(targets(plan_placement(state, CATALOG, PlacementSettings(mix=False), now=4.0)).values()) == {
        "llama3.1:8b"}


def test_the_only_ready_agent_waits_while_the_others_load() -> None:
    state = add(ClusterState(), "a", "desktop_ryzen9_rtx4090_24g", current="llama3.2:1b", model_state="ready")
    state = add(state, "b", "raspberry_pi5_8g", current="llama3.2:1b", model_state="pulling")
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    assert plan.changes == [] and [e.agent_id for e in plan.deferred] == ["a"]


def test_fresh_agents_all_get_models_at_once() -> None:
    state = ClusterState()
    for n in range(5):
        state = add(state, f"d{n}", "laptop_i7_iris_16g")
    assert len(plan_placement(state, CATALOG, DEFAULTS, now=1.0).changes) == 5


def test_mix_serves_every_tier_a_machine_qualifies_for() -> None:
    state = ClusterState()
    for n in range(3):
        state = add(state, f"d{n}", "desktop_ryzen9_rtx4090_24g")
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    assert sorted(targets(plan).values()) == ["llama3.1:8b", "llama3.2:1b", "llama3.2:3b"]
    assert any("mix: no agent served medium" in entry.reason for entry in plan.entries)
    without = plan_placement(state, CATALOG, PlacementSettings(mix=False), now=1.0)
    assert set(targets(without).values()) == {"llama3.1:8b"}


def test_mix_never_promotes_and_never_takes_the_last_of_a_tier() -> None:
    state = ClusterState()
    for n in range(3):
        state = add(state, f"pi{n}", "raspberry_pi5_8g")
    assert set(targets(plan_placement(state, CATALOG, DEFAULTS, now=1.0)).values()) == {"llama3.2:1b"}
    two = add(add(ClusterState(), "desk", "desktop_ryzen9_rtx4090_24g"), "pi", "raspberry_pi5_8g")
    assert targets(plan_placement(two, CATALOG, DEFAULTS, now=1.0)) == {"desk": "llama3.1:8b", "pi": "llama3.2:1b"}


def test_mix_is_stable_across_replans() -> None:
    """The agent already serving a tier keeps it, even when another agent's score dips below its own."""
    state = ClusterState()
    for n in range(3):
        state = add(state, f"d{n}", "desktop_ryzen9_rtx4090_24g")
    first = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    state = applied(state, first)
    holders = targets(first)
    shuffled = {agent_id: 100.0 - 0.5 * n for n, agent_id in enumerate(reversed(sorted(holders)))}
    again = plan_placement(state, CATALOG, DEFAULTS, now=2.0, scores=_scored(state, **shuffled))
    assert again.changes == [] and targets(again) == holders


def test_catalog_order_within_a_tier_and_current_model_kept() -> None:
    """Several models in one tier: placement assigns the first, but an agent on another keeps it."""
    catalog = CATALOG
    assert catalog.tier_of("qwen2.5:7b") == "large" and catalog.primary("large").name == "llama3.1:8b"
    state = add(ClusterState(), "a", "desktop_ryzen9_rtx4090_24g", current="qwen2.5:7b", model_state="ready")
    state = add(state, "b", "desktop_ryzen9_rtx4090_24g")
    plan = plan_placement(state, catalog, PlacementSettings(mix=False), now=1.0)
    assert targets(plan) == {"a": "qwen2.5:7b", "b": "llama3.1:8b"}


@settings(max_examples=200, deadline=None)
@given(
    vram=st.one_of(st.none(), st.floats(min_value=0.5, max_value=48)),
    vram_free=st.one_of(st.none(), st.floats(min_value=0.0, max_value=48)),
    ram=st.floats(min_value=1, max_value=128),
    ram_free=st.one_of(st.none(), st.floats(min_value=0.0, max_value=128)),
    cores=st.integers(min_value=1, max_value=64),
)
def test_never_assigns_a_model_that_does_not_fit(
    vram: float | None, vram_free: float | None, ram: float, ram_free: float | None, cores: int
) -> None:
    gpus = [GpuInfo(name="card", vendor="nvidia", vram_total_gb=vram)] if vram else []
    machine = Hardware(cpu_physical_cores=cores, cpu_max_ghz=3.0, ram_total_gb=ram, gpus=gpus)
    state = add(ClusterState(), "x", machine, telemetry=Telemetry(vram_free_gb=vram_free, ram_free_gb=ram_free))
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    for entry in plan.entries:
        model = CATALOG.model(entry.target_model)
        assert model is not None
        pool_total = vram if vram and vram >= 1.0 else ram
        pool_free = vram_free if vram and vram >= 1.0 else ram_free
        room = min(pool_total, pool_free) if pool_free is not None else pool_total
        assert model.memory_gb + DEFAULTS.headroom_gb <= room + 1e-9


def test_placement_of_a_thousand_agents_is_fast() -> None:
    machines = ["desktop_ryzen9_rtx4090_24g", "laptop_i7_iris_16g", "raspberry_pi5_8g", "mac_m2_16g",
                "server_nogpu_64g", "desktop_i5_gtx1650_4g"]
    state = ClusterState()
    for n in range(1000):
        state = add(state, f"agent{n:04d}", machines[n % len(machines)], telemetry=Telemetry(ram_free_gb=6))
    started = time.perf_counter()
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    elapsed = time.perf_counter() - started
    assert len(plan.entries) + len(plan.excluded) == 1000
    assert elapsed < 2.0, f"placement of 1,000 agents took {elapsed:.3f} s"


# ---------------------------------------------------------------- issue 12: real runtimes, real catalogs


def _runtime_agent(state: ClusterState, agent_id: str, machine: str, *, backend: str, kind: str,
                   local: list[str], current: str | None = None, model_state: str = "absent") -> ClusterState:
    profile = RuntimeProfile(kind=kind, slots=1)  # type: ignore[arg-type]
    state = apply(state, StatusReceived(agent_id, Status(state="online", backend=backend, runtime=profile)), 0.0)
    state = apply(state, HardwareReceived(agent_id, hardware(machine)), 0.0)
    if current is not None:
        state = apply(state, AssignmentSeen(agent_id, Assign(model=current, assignment_id="old")), 0.0)
    return apply(state, ModelStateReceived(agent_id, ModelState(model=current, state=model_state,  # type: ignore[arg-type]
                                                                local_models=local)), 0.0)


def test_a_runtime_that_cannot_pull_gets_the_largest_of_its_own_models_that_fits() -> None:
    state = _runtime_agent(ClusterState(), "cpp", "laptop_i7_iris_16g", backend="openai", kind="llama-cpp-python",
                           local=["smollm2", "/models/Qwen2.5-14B-Instruct-Q4_K_M.gguf", "/models/phi-3.8b.gguf",
                                  "nomic-embed-text"])
    state = apply(state, TelemetryReceived("cpp", Telemetry(ram_free_gb=6.0)), 0.0)
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    (entry,) = plan.entries
    assert entry.target_model == "/models/phi-3.8b.gguf" and entry.local_only  # the 14B needs ~10 GB
    assert "llama-cpp-python cannot pull models" in entry.reason and "Qwen2.5-14B" in entry.reason
    # Applied and ready: a re-plan changes nothing.
    again = plan_placement(applied(state, plan), CATALOG, DEFAULTS, now=2.0)
    assert again.changes == []


def test_a_runtime_that_cannot_pull_and_has_no_chat_model_is_excluded() -> None:
    state = _runtime_agent(ClusterState(), "cpp", "laptop_i7_iris_16g", backend="openai", kind="llama.cpp",
                           local=["nomic-embed-text"])
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0)
    assert plan.entries == () and "llama.cpp cannot pull models" in plan.excluded["cpp"]
    # An Ollama server behind the OpenAI API cannot pull through it either.
    proxied = _runtime_agent(ClusterState(), "o", "laptop_i7_iris_16g", backend="openai", kind="ollama",
                             local=["smollm2:latest"])
    assert targets(plan_placement(proxied, CATALOG, DEFAULTS, now=1.0)) == {"o": "smollm2:latest"}


def test_a_model_already_on_the_machine_is_preferred_to_a_download() -> None:
    state = _runtime_agent(ClusterState(), "o", "desktop_ryzen9_rtx4090_24g", backend="ollama", kind="ollama",
                           local=["qwen2.5:7b", "deepseek-r1:8b"])
    assert targets(plan_placement(state, CATALOG, DEFAULTS, now=1.0)) == {"o": "qwen2.5:7b"}
    thinking = _runtime_agent(ClusterState(), "o", "desktop_ryzen9_rtx4090_24g", backend="ollama", kind="ollama",
                              local=["deepseek-r1:8b"])
    assert targets(plan_placement(thinking, CATALOG, DEFAULTS, now=1.0)) == {"o": "llama3.1:8b"}  # not a reasoner


def test_a_machine_measured_too_slow_for_its_tier_gets_a_smaller_model() -> None:
    state = add(ClusterState(), "mac", "mac_m2_16g", current="llama3.1:8b", model_state="ready")
    for _ in range(3):
        state = apply(state, AnswerMeasured("mac", "llama3.1:8b", ResultStats(tokens_per_s=2.0)), 0.0)
    plan = plan_placement(state, CATALOG, DEFAULTS, now=1.0,
                          scores={"mac": Score(85.0, ())})  # keep it in the large tier by score
    (entry,) = plan.entries
    assert CATALOG.tier_of(entry.target_model) == "medium"
    assert "would run at 2.0 tok/s (observed), below the large tier's 4" in entry.reason


def test_a_user_tier_places_larger_models_on_machines_that_qualify(tmp_path: Path) -> None:
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"tiers": [{"name": "xl", "min_score": 95, "max_parameters_b": 35,
                                           "min_tokens_per_s": 10}]}))
    catalog = load_catalog(DEFAULT_CATALOG, user)
    state = add(ClusterState(), "desk", "desktop_ryzen9_rtx4090_24g")
    state = add(state, "mac", "mac_m2_16g")
    assert targets(plan_placement(state, catalog, PlacementSettings(mix=False), now=1.0)) == {
        "desk": "qwen2.5:14b", "mac": "llama3.1:8b"}
    assert targets(plan_placement(state, CATALOG, PlacementSettings(mix=False), now=1.0)) == {
        "desk": "llama3.1:8b", "mac": "llama3.1:8b"}  # the shipped default: nothing above the 8B class


def test_embedding_models_are_never_placed_for_chat() -> None:
    state = ClusterState()
    for n, machine in enumerate(["desktop_ryzen9_rtx4090_24g", "laptop_i7_iris_16g", "raspberry_pi5_8g"]):
        state = add(state, f"m{n}", machine)
    for entry in plan_placement(state, CATALOG, DEFAULTS, now=1.0).entries:
        assert not CATALOG.estimate(entry.target_model).embedding


def test_big_machines_also_keep_a_smaller_model_that_fits_beside_the_main_one() -> None:
    plan = plan_placement(demo_cluster(), CATALOG, DEFAULTS, now=1.0)
    by_agent = {entry.agent_id: entry for entry in plan.entries}
    desktop = by_agent["gpu-desktop"]
    assert desktop.target_model == "llama3.1:8b" and desktop.also, "24 GB of VRAM holds an 8B and a 3B model"
    main = CATALOG.model(desktop.target_model)
    extras = [CATALOG.model(name) for name in desktop.also]
    assert main is not None and all(extra is not None for extra in extras)
    assert main.memory_gb + sum(extra.memory_gb for extra in extras) + DEFAULTS.headroom_gb <= 24
    assert by_agent["raspberry-pi"].also == (), "8 GB holds one small model, nothing beside it"
    without = plan_placement(demo_cluster(), CATALOG, replace(DEFAULTS, extra_models=0), now=1.0)
    assert all(entry.also == () for entry in without.entries)


def test_a_change_of_extras_alone_is_published_but_moves_no_model() -> None:
    state = demo_cluster()
    first = plan_placement(state, CATALOG, replace(DEFAULTS, extra_models=0), now=1.0)
    state = applied(state, first)
    second = plan_placement(state, CATALOG, DEFAULTS, now=2.0)
    extras_only = [entry for entry in second.changes if entry.extras_change]
    assert extras_only and all(not entry.change for entry in extras_only)
    assert [entry.agent_id for entry in second.entries if entry.change] == []
    third = plan_placement(applied(state, second), CATALOG, DEFAULTS, now=3.0)
    assert third.changes == []

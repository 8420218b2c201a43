"""Golden plans: placement on seeded mixed clusters must not change when placement is made faster.

``tests/fixtures/placement_golden.json`` holds the plans the code gave when it was recorded: every entry
(target, tier, reason, deferral, extras) and every exclusion, for clusters of 100 agents (in full) and
1,000 agents (a digest of the same canonical form), each planned twice: once fresh, and again after the
first plan's changes were applied and a tenth of the agents changed (telemetry, failures, departures,
new agents), with several placement settings. A speed-up that changes any plan fails here.

Re-record (only for a deliberate change of placement's rules):
``python -m tests.test_placement_golden --record``
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from broker.protocol import (
    Assign,
    Hardware,
    ModelState,
    ResultStats,
    RuntimeProfile,
    Status,
    Telemetry,
)
from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
from broker.scheduling.estimates import agent_score
from broker.scheduling.placement import PlacementSettings, Plan, plan_placement
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
)

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "placement_golden.json"
MACHINES = sorted(path.stem for path in (FIXTURES / "hardware").glob("*.json"))
CHAT_MODELS = ["llama3.1:8b", "qwen2.5:7b", "mistral:7b", "qwen3:8b", "deepseek-r1:8b", "llama3.2:3b", "qwen2.5:3b",
               "gemma3:4b", "phi4-mini", "llama3.2:1b", "qwen2.5:1.5b", "qwen2.5:0.5b", "gemma3:1b", "smollm2:135m",
               "Llama3.2:latest", "/models/SmolLM2-135M-Instruct-Q4_1.gguf", "mystery-model", "tinyllama:1.1b"]
SETTINGS = {
    "defaults": PlacementSettings(),
    "embedding_two_extras": PlacementSettings(extra_models=2, embedding_model="nomic-embed-text"),
    "no_mix_no_extras": PlacementSettings(mix=False, extra_models=0, hysteresis=0.0, move_fraction=0.5),
}
CASES = [(seed, count, name, "mixed") for count in (100, 1000) for seed in (1, 2) for name in SETTINGS] + [
    (3, 8, "defaults", "mix"), (3, 8, "embedding_two_extras", "mix")]
BIG_MACHINE = "desktop_ryzen9_rtx4090_24g"
"""The ``mix`` clusters: strong machines whose natural tier is the top one, so mix has to serve the one below."""
FULL_UP_TO = 100
"""Clusters up to this size are stored entry by entry (readable diffs); larger ones as a digest."""


def _hardware(rng: random.Random, index: int, machines: list[str]) -> Hardware:
    data = json.loads((FIXTURES / "hardware" / f"{machines[index % len(machines)]}.json").read_text())
    if data.get("cpu_physical_cores"):
        data["cpu_physical_cores"] = max(2, data["cpu_physical_cores"] + rng.randint(-2, 4))
    if data.get("cpu_max_ghz"):
        data["cpu_max_ghz"] = round(data["cpu_max_ghz"] * rng.uniform(0.85, 1.1), 2)
    if data.get("ram_total_gb"):
        data["ram_total_gb"] = round(data["ram_total_gb"] * rng.choice([0.25, 0.5, 1, 1, 2]), 1)
    for gpu in data.get("gpus", []):
        if gpu.get("vram_total_gb"):
            gpu["vram_total_gb"] = round(gpu["vram_total_gb"] * rng.choice([0.5, 1, 1, 1.5]), 1)
    if rng.random() < 0.1:
        data["benchmark"] = {"model": rng.choice(CHAT_MODELS[:10]), "tokens_per_s": round(rng.uniform(1, 90), 1),
                             "measured_at": 0.0}
    return Hardware.model_validate(data)


def _status(rng: random.Random) -> Status:
    kind = rng.random()
    if kind < 0.1:  # a runtime that cannot pull
        runtime = RuntimeProfile(kind=rng.choice(["llama.cpp", "vllm", "llama-cpp-python"]), slots=rng.randint(1, 4))
        return Status(state="online", backend="openai", backend_url="http://127.0.0.1:8080", runtime=runtime)
    if kind < 0.25:
        return Status(state="online", backend="simulated", simulated=True, max_parallel=2)
    if kind < 0.3:
        return Status(state="online")  # an older agent that names no backend
    return Status(state="online", backend="ollama", max_parallel=rng.randint(1, 4))


def _telemetry(rng: random.Random) -> Telemetry:
    return Telemetry(ram_free_gb=round(rng.uniform(0.5, 60), 1),
                     vram_free_gb=round(rng.uniform(0.5, 24), 1) if rng.random() < 0.5 else None,
                     tokens_per_s=round(rng.uniform(0.5, 80), 1) if rng.random() < 0.3 else None,
                     backend_reachable=rng.random() > 0.03, interval_s=1.0)


def _model_state(rng: random.Random, model: str | None) -> ModelState:
    local = rng.sample(CHAT_MODELS, rng.randint(0, 4)) + (["nomic-embed-text"] if rng.random() < 0.2 else [])
    state = rng.choices(["ready", "pulling", "loading", "failed", "absent"], [70, 8, 7, 8, 7])[0]
    return ModelState(model=model, state=state, local_models=local,
                      error="out of memory" if state == "failed" else None)


def _add_agent(state: ClusterState, rng: random.Random, index: int, now: float,
               machines: list[str] = MACHINES) -> ClusterState:
    agent_id = f"agent-{index:05d}"
    state = apply(state, StatusReceived(agent_id, _status(rng)), now)
    if rng.random() < 0.97:
        state = apply(state, HardwareReceived(agent_id, _hardware(rng, index, machines)), now)
    if rng.random() < 0.9:
        state = apply(state, TelemetryReceived(agent_id, _telemetry(rng)), now)
    current = rng.choice(CHAT_MODELS) if rng.random() < 0.7 else None
    if current is not None and rng.random() < 0.8:
        also = rng.sample(["llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text"], rng.randint(0, 2))
        state = apply(state, AssignmentSeen(agent_id, Assign(model=current, assignment_id="a", also=also)), now)
    if rng.random() < 0.85:
        state = apply(state, ModelStateReceived(agent_id, _model_state(rng, current)), now)
    if rng.random() < 0.1:
        stats = ResultStats(tokens_per_s=round(rng.uniform(0.5, 60), 1), ttft_s=0.3)
        state = apply(state, AnswerMeasured(agent_id, rng.choice(CHAT_MODELS[:12]), stats), now)
    if rng.random() < 0.03:
        state = apply(state, StatusReceived(agent_id, Status(state="offline")), now)
    if rng.random() < 0.03:
        state = apply(state, AgentExpired(agent_id, 30.0, 3.0), now)
    return state


def cluster(seed: int, count: int, kind: str) -> tuple[ClusterState, dict[str, str]]:
    """A seeded mixed cluster, and the agents in quarantine."""
    rng = random.Random(seed * 7919 + count)
    state = ClusterState()
    for index in range(count):
        if kind == "mixed":
            state = _add_agent(state, rng, index, 10.0)
        if kind == "mix":  # one strong machine with room to spare, a few times, and one Raspberry Pi
            agent_id = f"agent-{index:05d}"
            machine = "raspberry_pi5_8g" if index == 0 else BIG_MACHINE
            state = apply(state, StatusReceived(agent_id, Status(state="online", backend="ollama")), 10.0)
            state = apply(state, HardwareReceived(agent_id, Hardware.model_validate_json(
                (FIXTURES / "hardware" / f"{machine}.json").read_text())), 10.0)
            state = apply(state, TelemetryReceived(agent_id, Telemetry(ram_free_gb=60.0, interval_s=1.0)), 10.0)
    quarantined = {agent_id: "answers faster than its hardware" for agent_id in sorted(state.agents)
                   if rng.random() < 0.02}
    return state, quarantined


def evolve(state: ClusterState, plan: Plan, seed: int, count: int) -> ClusterState:
    """The registry after ``plan`` went out (most movers ready, some still pulling) and a tenth changed."""
    rng = random.Random(seed * 104_729 + count)
    for entry in plan.changes:
        assign = Assign(model=entry.target_model, assignment_id="b", also=list(entry.also))
        state = apply(state, AssignmentSeen(entry.agent_id, assign), 150.0)
        ready = rng.random() < 0.8
        record = state.agents[entry.agent_id]
        local = list(record.model_state.local_models) if record.model_state is not None else []
        state = apply(state, ModelStateReceived(entry.agent_id, ModelState(
            model=entry.target_model, state="ready" if ready else "pulling", local_models=local)), 150.0)
    for agent_id in sorted(state.agents):
        roll = rng.random()
        if roll < 0.04:
            state = apply(state, TelemetryReceived(agent_id, _telemetry(rng)), 160.0)
        elif roll < 0.09:
            record = state.agents[agent_id]
            model = record.current_model or "llama3.2:1b"
            state = apply(state, ModelStateReceived(agent_id, ModelState(model=model, state="failed",
                                                                         error="pull failed")), 170.0)
        elif roll < 0.10:
            state = apply(state, StatusReceived(agent_id, Status(state="offline")), 170.0)
        elif roll < 0.11:
            state = apply(state, StatusReceived(agent_id, None), 170.0)  # removed
        elif roll < 0.13:
            stats = ResultStats(tokens_per_s=round(rng.uniform(0.5, 60), 1))
            state = apply(state, AnswerMeasured(agent_id, rng.choice(CHAT_MODELS[:12]), stats), 170.0)
    for index in range(count, count + max(1, count // 50)):
        state = _add_agent(state, rng, index, 180.0)
    return state


def canonical(plan: Plan) -> dict[str, Any]:
    return {"entries": [asdict(entry) for entry in plan.entries], "excluded": dict(sorted(plan.excluded.items())),
            "created_at": plan.created_at}


def digest(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(canonical(plan), sort_keys=True).encode()).hexdigest()


def plans(seed: int, count: int, setting: str, kind: str) -> Iterator[tuple[str, Plan]]:
    """The two plans of one case, with a fresh catalog (empty memo) as a coordinator starts with; the second
    plan runs with every score computed on events beforehand (as the coordinator does)."""
    catalog = load_catalog(DEFAULT_CATALOG)
    settings = SETTINGS[setting]
    state, quarantined = cluster(seed, count, kind)
    first = plan_placement(state, catalog, settings, 200.0, 1.0, quarantined=quarantined)
    yield "first", first
    state = evolve(state, first, seed, count)
    for record in state.agents.values():
        if record.hardware is not None:
            agent_score(record, catalog)
    second = plan_placement(state, catalog, settings, 400.0, 2.0, quarantined=quarantined)
    yield "second", second
    yield "second_again", plan_placement(state, catalog, settings, 400.0, 2.0, quarantined=quarantined)


def record() -> dict[str, Any]:
    golden: dict[str, Any] = {}
    for seed, count, setting, kind in CASES:
        for step, plan in plans(seed, count, setting, kind):
            golden[f"{seed}/{count}/{setting}/{kind}/{step}"] = canonical(plan) if count <= FULL_UP_TO else digest(plan)
    return golden


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize(("seed", "count", "setting", "kind"), CASES)
def test_plans_match_the_recorded_ones(golden: dict[str, Any], seed: int, count: int, setting: str, kind: str) -> None:
    for step, plan in plans(seed, count, setting, kind):
        key = f"{seed}/{count}/{setting}/{kind}/{step}"
        expected = golden[key]
        if count <= FULL_UP_TO:
            actual = json.loads(json.dumps(canonical(plan)))  # tuples → lists, as recorded
            assert actual["excluded"] == expected["excluded"], key
            for got, want in zip(actual["entries"], expected["entries"], strict=True):
                assert got == want, key
            assert actual == expected, key
        else:
            assert digest(plan) == expected, key


def _jiggle(state: ClusterState, rng: random.Random, now: float) -> ClusterState:
    """A second of a live cluster: every agent's telemetry again, most with free memory a little different (as
    a real machine reports it), some far off, a few with a new speed or model state."""
    for agent_id in sorted(state.agents):
        record = state.agents[agent_id]
        old = record.telemetry
        if old is None:
            continue
        roll = rng.random()
        changes: dict[str, Any] = {"cpu_percent": round(rng.uniform(0, 100), 1)}
        if roll < 0.7 and old.ram_free_gb is not None:
            changes["ram_free_gb"] = max(0.0, round(old.ram_free_gb + rng.uniform(-0.08, 0.08), 2))
            if old.vram_free_gb is not None:
                changes["vram_free_gb"] = max(0.0, round(old.vram_free_gb + rng.uniform(-0.08, 0.08), 2))
        elif roll < 0.8:
            changes["ram_free_gb"] = round(rng.uniform(0.5, 60), 2)
        elif roll < 0.83:
            changes["tokens_per_s"] = round(rng.uniform(0.5, 80), 1)
        state = apply(state, TelemetryReceived(agent_id, old.model_copy(update=changes)), now)
        if rng.random() < 0.02:
            state = apply(state, ModelStateReceived(agent_id, _model_state(rng, record.current_model)), now)
    return state


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_plans_scored_on_events_equal_fresh_plans(setting: str) -> None:
    """A coordinator keeps each agent's decision between plans and decides again only where the inputs changed
    materially. Over rounds of live telemetry (free memory moving a little or a lot, speeds, model states, the
    plan's own moves) each plan equals the one a fresh catalog (nothing kept) gives, and most decisions are
    kept (the cache is really used)."""
    settings = SETTINGS[setting]
    kept_catalog = load_catalog(DEFAULT_CATALOG)
    state, quarantined = cluster(5, 400, "mixed")
    rng = random.Random(11)
    now = 200.0
    kept_total = 0
    for _ in range(6):
        plan = plan_placement(state, kept_catalog, settings, now, 1.0, quarantined=quarantined)
        fresh = plan_placement(state, load_catalog(DEFAULT_CATALOG), settings, now, 1.0, quarantined=quarantined)
        assert canonical(plan) == canonical(fresh)
        before = dict(kept_catalog.derived[("placement_decisions", settings)])  # type: ignore[call-overload]
        for entry in plan.changes[: len(plan.changes) // 2]:
            state = apply(state, AssignmentSeen(entry.agent_id, Assign(model=entry.target_model, assignment_id="c",
                                                                        also=list(entry.also))), now)
        now += 30.0
        state = _jiggle(state, rng, now)
        plan_placement(state, kept_catalog, settings, now, 1.0, quarantined=quarantined)
        after = kept_catalog.derived[("placement_decisions", settings)]  # type: ignore[index]
        kept_total += sum(1 for agent_id, decided in after.items() if before.get(agent_id) is decided)
    assert kept_total > 6 * 400 * 0.4, kept_total


def test_a_plan_overlapping_another_decides_afresh_and_keeps_nothing() -> None:
    """A what-if from a UI thread while a re-plan runs: it must not read decisions the other plan updates."""
    from broker.scheduling import placement

    settings = SETTINGS["defaults"]
    catalog = load_catalog(DEFAULT_CATALOG)
    state, quarantined = cluster(6, 100, "mixed")
    expected = canonical(plan_placement(state, load_catalog(DEFAULT_CATALOG), settings, 200.0, 1.0,
                                        quarantined=quarantined))
    with placement._KEPT_DECISIONS:  # another plan is running
        overlapping = plan_placement(state, catalog, settings, 200.0, 1.0, quarantined=quarantined)
    assert canonical(overlapping) == expected
    assert ("placement_decisions", settings) not in catalog.derived
    assert canonical(plan_placement(state, catalog, settings, 200.0, 1.0, quarantined=quarantined)) == expected
    assert ("placement_decisions", settings) in catalog.derived


def test_the_golden_clusters_exercise_every_rule(golden: dict[str, Any]) -> None:
    """The recorded plans hold what they are meant to guard: changes, deferrals, local runtimes, extras, mix
    and several kinds of exclusion (so a golden of trivial plans cannot pass for a check)."""
    text = json.dumps({key: value for key, value in golden.items() if isinstance(value, dict)})
    for needle in ("deferred: ", "cannot pull models", "mix: no agent served", "hysteresis", "falls back to",
                   "in quarantine", "has not reported its hardware", "gone: no telemetry", "offline",
                   "failed here", "nomic-embed-text"):
        assert needle in text, needle
    entries = [entry for key, value in golden.items() if isinstance(value, dict) for entry in value["entries"]]
    assert any(entry["target_model"] != entry["current_model"] for entry in entries)
    assert any(entry["also"] for entry in entries) and any(entry["local_only"] for entry in entries)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    GOLDEN.write_text(json.dumps(record(), sort_keys=True, separators=(",", ":")) + "\n")

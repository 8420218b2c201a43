"""Agents that lie or flood (issue 13.1, 13.7), against the real secure Mosquitto and a real coordinator.

* A lying agent — 8 × H100, a benchmark of 100,000 tok/s, ``max_parallel`` 1000, a ready model it was never
  assigned, every job answered at once with an empty ``done`` — beside two honest agent processes. Before:
  it took 20 of 20 questions and the callers got empty answers. Now every caller gets a real answer from an
  honest agent, the liar ends quarantined with the reason in the cluster view, and gets no job after that.
* A flood of 300 × 900 kB chunks for one job (and the same behind a gap at seq 0). Before: the coordinator
  grew by hundreds of MB and held the gap's chunks until the first-token stall (20 s). Now the attempt is
  cut at the answer limit (or the reorder buffer's), memory stays bounded, the caller gets a clear error.

The misbehaving agents are child processes (``tests/scripted_agents.py``) logged in with real accounts,
publishing only on their own topics, as the ACL allows any agent machine.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.backends.simulated import simulated_text
from broker.coordinator.contract import QueryEvent, QueryFailed, QueryFinished, QueryRequest
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.local_broker import RunningBroker
from broker.protocol import ChatMessage
from tests.scripted_agents import FLOOD_MODEL
from tests.support.brokers import COORDINATOR_LISTENER, start_secure_broker
from tests.support.processes import AgentProcess, ChildProcess, spawn
from tests.support.processes import wait_until_async as wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "agent" / "profiles"
USERS = {"coordinator": "coord-pw", "honest-a": "pw-a", "honest-b": "pw-b", "liar": "pw-liar",
         "flooder": "pw-flood"}
HONEST = ("honest-a", "honest-b")
ANSWER_TOKENS = 16


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """mosquitto.secure.conf as shipped, with an account per agent (the liar's is as valid as any)."""
    running = start_secure_broker(tmp_path_factory.mktemp("untrusted"), USERS,
                                  coordinator_users={"coordinator": USERS["coordinator"]})
    yield running
    running.stop()


def honest_agent(broker: RunningBroker, agent_id: str, folder: Path) -> AgentProcess:
    return spawn(agent_id, [
        "-m", "agent", "--broker-url", broker.url, "--agent-id", agent_id, "--mqtt-password", USERS[agent_id],
        "--backend", "simulated", "--hardware-profile", str(PROFILES / "laptop.json"), "--sim-tokens-per-s", "150",
        "--sim-ttft-ms", "20", "--sim-pull-s", "0.1", "--telemetry-interval-s", "0.5", "--benchmark-tokens", "4",
        "--max-parallel", "4", "--chunk-interval-ms", "20", "--data-dir", str(folder / agent_id),
    ], folder, kind=AgentProcess)


def scripted(broker: RunningBroker, mode: str, agent_id: str, folder: Path, *extra: str) -> ChildProcess:
    return spawn(agent_id, ["-m", "tests.scripted_agents", mode, "--broker-url", broker.url, "--agent-id", agent_id,
                            "--password", USERS[agent_id], *extra], folder)


async def start_coordinator(broker: RunningBroker, folder: Path, **overrides: Any) -> Coordinator:
    values: dict[str, Any] = dict(
        broker_url=broker.listener_url(COORDINATOR_LISTENER), topic_prefix="slb/v1", mqtt_username="coordinator",
        mqtt_password=USERS["coordinator"], data_dir=folder / "coordinator", replan_debounce_s=0.3,
        expected_output_tokens=ANSWER_TOKENS, stall_first_token_s=5.0, stall_between_chunks_s=3.0,
        admission_wait_s=20.0, cooldown_s=5.0)
    values.update(overrides)
    coordinator = Coordinator(CoordinatorSettings(**values))
    await coordinator.start()
    assert await coordinator.wait_connected(10)
    return coordinator


def jobs_received(process: ChildProcess) -> int:
    return len(re.findall(r"^job ", process.log(None), flags=re.MULTILINE))


def ask(text: str, mode: str) -> QueryRequest:
    return QueryRequest(messages=[ChatMessage(role="user", content=text)], mode=mode,
                        options={"num_predict": ANSWER_TOKENS}, timeout_s=60)


async def collect(coordinator: Coordinator, request: QueryRequest) -> list[QueryEvent]:
    return [event async for event in coordinator.query(request)]


def check_honest_answer(request: QueryRequest, events: list[QueryEvent]) -> None:
    """A non-empty answer, exactly the one the honest agent's model gives, from an honest agent."""
    final = events[-1]
    assert isinstance(final, QueryFinished), f"{request.mode}: {final}"
    assert final.agents[-1] in HONEST, final
    expected = "".join(simulated_text(final.models[-1], request.messages, ANSWER_TOKENS))
    assert final.text.strip() and final.text == expected, (final.text, expected)


@pytest.mark.timeout(240)
async def test_a_lying_agent_beside_two_honest_ones_serves_nobody_and_is_quarantined(
        broker: RunningBroker, tmp_path: Path) -> None:
    agents = [honest_agent(broker, agent_id, tmp_path) for agent_id in HONEST]
    liar = scripted(broker, "liar", "liar", tmp_path)
    coordinator = await start_coordinator(broker, tmp_path)
    try:
        await wait_until(lambda: {a.id for a in coordinator.snapshot().agents if a.online and a.model_state == "ready"}
                         >= {*HONEST, "liar"}, 60, "two honest agents and the liar ready",
                         lambda: "\n".join(a.log(800) for a in (*agents, liar)))
        # 8 concurrent questions first (the liar is untested: the most it can capture), then 12 one by one.
        first = [ask(f"Concurrent question {index}?", "auto" if index % 2 else "quality") for index in range(8)]
        for request, events in zip(first, await asyncio.gather(*(collect(coordinator, r) for r in first)),
                                   strict=True):
            check_honest_answer(request, events)
        for index in range(12):
            request = ask(f"Question number {index}, please?", "quality" if index % 3 == 0 else "auto")
            check_honest_answer(request, await collect(coordinator, request))

        view = next(agent for agent in coordinator.snapshot().agents if agent.id == "liar")
        assert view.quarantined and view.quarantine_reason and view.strikes >= 1, view
        assert "empty answer" in view.quarantine_reason, view.quarantine_reason
        assert view.slots is not None and view.slots <= 64
        for agent in coordinator.snapshot().agents:
            if agent.id in HONEST:
                assert not agent.quarantined and agent.strikes == 0, agent
        captured = jobs_received(liar)
        for index in range(6):
            request = ask(f"After the quarantine {index}?", ("auto", "quality", "llama3.2:3b")[index % 3])
            check_honest_answer(request, await collect(coordinator, request))
        await asyncio.sleep(0.5)
        assert jobs_received(liar) == captured, "a quarantined agent got a job"
        print(f"liar received {captured} of 20 jobs before quarantine: {view.quarantine_reason}")
    finally:
        await coordinator.stop()
        for process in (*agents, liar):
            process.stop()


def peak_rss_reset() -> None:
    """Start measuring this process's peak resident memory afresh (Linux: VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) / 1024


def rss_mb() -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) / 1024


@pytest.mark.timeout(240)
@pytest.mark.parametrize("gap", [False, True], ids=["flood", "gap-at-seq-0"])
async def test_a_flood_of_huge_chunks_is_cut_with_a_clear_error_and_bounded_memory(
        broker: RunningBroker, tmp_path: Path, gap: bool) -> None:
    """300 × 900 kB for one job: the coordinator (this process) stays small, the caller gets a clear error."""
    flooder = scripted(broker, "flood", "flooder", tmp_path, "--chunks", "300", "--chunk-chars", "900000",
                       *(["--gap"] if gap else []))
    coordinator = await start_coordinator(broker, tmp_path, stall_first_token_s=20.0, stall_between_chunks_s=10.0)
    try:
        await wait_until(lambda: any(a.id == "flooder" and a.model_state == "ready" and a.online
                                     for a in coordinator.snapshot().agents), 30, "the flooder ready",
                         lambda: flooder.log())
        baseline = rss_mb()
        peak_rss_reset()
        started = time.monotonic()
        events = await collect(coordinator, QueryRequest(messages=[ChatMessage(role="user", content="Flood me")],
                                                         mode=FLOOD_MODEL, timeout_s=120))
        took = time.monotonic() - started
        final = events[-1]
        await wait_until(lambda: "flood sent" in flooder.log(None), 60, "the whole flood sent", flooder.log)
        late = coordinator.metrics.registry.get_sample_value("slb_result_chunks_total", {"kind": "late"}) or 0
        await wait_until(lambda: (coordinator.metrics.registry.get_sample_value(
            "slb_result_chunks_total", {"kind": "late"}) or 0) + (coordinator.metrics.registry.get_sample_value(
                "slb_result_chunks_total", {"kind": "ok"}) or 0) >= 300, 60, "the flood drained")
        await asyncio.sleep(1.0)
        growth = peak_rss_mb() - baseline
        streamed = sum(len(getattr(event, "text", "")) for event in events if type(event).__name__ == "TextDelta")
        print(f"gap={gap}: took {took:.1f} s, peak RSS growth {growth:.0f} MB, streamed {streamed:,} characters, "
              f"late chunks {late:.0f}, final {str(final)[:300]}")
        assert isinstance(final, QueryFailed), final
        assert final.code == "failed" and "internal error" not in final.error, final
        assert ("limit" in final.error) if not gap else ("never arrived" in final.error), final.error
        assert streamed <= 400_000 and len(final.partial_text) <= 400_000
        assert took < 10, f"the attempt was held {took:.1f} s"
        assert growth < 120, f"the coordinator grew by {growth:.0f} MB during the flood"
    finally:
        await coordinator.stop()
        flooder.stop()

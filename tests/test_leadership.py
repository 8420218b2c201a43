"""Placement leadership among several coordinators on one broker (issue 16.1, docs/protocol.md "Leadership").

Unit tests drive :class:`LeaseState` with explicit times; the agent's epoch fence is tested on
:class:`ModelManager`; the integration test runs two real ``python -m broker`` processes and two real simulated
agents on the real Mosquitto, kills the leader with SIGKILL and watches the other take over.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.models import ModelManager
from broker.coordinator.leadership import Claim, Lead, LeaseState, Reassert, Role, StepDown, better, next_epoch
from broker.mqtt.client import InboundMessage, MqttConnection
from broker.mqtt.settings import MqttSettings
from broker.protocol import Assign, LeaderRecord, ModelState, Topics, decode
from tests.support.processes import AgentProcess, spawn, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "agent" / "profiles"
WINDOW = 0.5


def leader(name: str, epoch: int) -> LeaderRecord:
    return LeaderRecord(state="leader", coordinator_id=name, epoch=epoch, since=1.0, ts=0.0)


def vacant(name: str, epoch: int) -> LeaderRecord:
    return LeaderRecord(state="vacant", coordinator_id=name, epoch=epoch, ts=0.0)


def claim(name: str, epoch: int) -> LeaderRecord:
    return LeaderRecord(state="claim", coordinator_id=name, epoch=epoch, ts=0.0)


def lease(name: str, unix: float = 1000.0) -> LeaseState:
    state = LeaseState(name, WINDOW, clock=lambda: unix)
    state.on_connected(0.0)
    return state


def run_until_settled(state: LeaseState, start: float, end: float) -> list[Any]:
    actions: list[Any] = []
    now = start
    while now <= end:
        actions += state.tick(now)
        now += 0.05
    return actions


# ---------------------------------------------------------------- lease state machine


def test_alone_on_a_fresh_broker_it_claims_after_listening_and_leads() -> None:
    state = lease("b")
    assert state.tick(0.2) == []  # still listening for a retained record
    assert state.tick(WINDOW) == [Claim(1_000_000)]  # epoch = Unix milliseconds
    assert state.role is Role.CLAIMING and state.tick(WINDOW + 0.2) == []
    assert state.tick(2 * WINDOW) == [Lead(1_000_000)]
    assert state.leading and state.current_epoch() == 1_000_000
    assert state.record().state == "leader" and state.record("vacant").epoch == 1_000_000


def test_a_retained_leader_record_keeps_it_standing_by() -> None:
    state = lease("b")
    state.on_record(leader("a", 7), 0.01)
    assert run_until_settled(state, 0.0, 5.0) == []
    assert state.role is Role.STANDBY and state.holder == leader("a", 7) and state.current_epoch() == 7


def test_the_holders_vacancy_starts_a_claim_above_its_epoch() -> None:
    state = lease("b", unix=0.0)  # a clock far behind: the epoch still goes above the one seen
    state.on_record(leader("a", 7), 0.01)
    state.on_record(vacant("a", 7), 1.0)
    assert state.tick(1.05) == [Claim(8)]
    assert run_until_settled(state, 1.1, 1.1 + WINDOW) == [Lead(8)]


def test_a_vacancy_of_someone_not_holding_the_seat_is_ignored() -> None:
    state = lease("b")
    state.on_record(leader("a", 7), 0.01)
    state.on_record(vacant("c", 3), 0.5)  # a standby's stale will, or the previous leader's
    state.on_record(vacant("a", 6), 0.6)  # the holder's will of an older term
    assert run_until_settled(state, 0.6, 3.0) == []
    assert state.holder == leader("a", 7)


def test_simultaneous_claims_same_epoch_lowest_id_wins_on_both_sides() -> None:
    first, second = lease("coord.a"), lease("coord.b")
    for state in (first, second):
        state.on_record(leader("old", 5), 0.01)
        state.on_record(vacant("old", 5), 1.0)
    [claim_a] = first.tick(1.0)
    [claim_b] = second.tick(1.0)
    assert claim_a == claim_b == Claim(1_000_000)
    # both hear both bids, in opposite orders
    first.on_record(claim("coord.b", 1_000_000), 1.1)
    first.on_record(claim("coord.a", 1_000_000), 1.1)
    second.on_record(claim("coord.a", 1_000_000), 1.1)
    second.on_record(claim("coord.b", 1_000_000), 1.1)
    assert run_until_settled(first, 1.1, 1.0 + WINDOW + 0.05) == [Lead(1_000_000)]
    assert run_until_settled(second, 1.1, 1.0 + WINDOW + 0.05) == []
    assert second.role is Role.STANDBY
    second.on_record(leader("coord.a", 1_000_000), 1.6)  # the winner's lease birth
    assert second.holder == leader("coord.a", 1_000_000)
    assert run_until_settled(second, 1.6, 4.0) == []


def test_the_highest_epoch_beats_a_lower_id() -> None:
    assert better(9, "z", 8, "a") and better(8, "a", 8, "b") and not better(8, "b", 8, "a")
    state = lease("a", unix=1.0)
    state.on_record(vacant("old", 5), 0.01)
    assert state.tick(0.05) == [Claim(1000)]
    state.on_record(claim("z", 1001), 0.1)
    assert run_until_settled(state, 0.1, 0.1 + WINDOW) == []
    assert state.role is Role.STANDBY


def test_a_winner_that_never_leads_is_bid_over_again() -> None:
    state = lease("b", unix=1.0)
    state.on_record(vacant("old", 5), 0.01)
    state.tick(0.05)
    state.on_record(claim("a", 1000), 0.1)  # a better bid, whose owner dies before it leads
    assert run_until_settled(state, 0.1, 0.6) == []
    actions = run_until_settled(state, 0.65, 0.65 + 3 * WINDOW + 0.1)
    assert actions[0] == Claim(1001) and actions[-1] == Lead(1001)


def test_a_leader_reasserts_on_claims_stale_records_and_foreign_wills() -> None:
    state = lease("a", unix=1.0)
    run_until_settled(state, 0.0, 1.1)
    assert state.leading
    epoch = state.epoch
    assert state.on_record(leader("a", epoch), 1.2) == []  # our own birth
    assert state.on_record(claim("newcomer", epoch + 1), 1.3) == [Reassert()]
    assert state.on_record(leader("deposed", epoch - 1), 1.4) == [Reassert()]
    assert state.on_record(vacant("standby", 0), 1.5) == [Reassert()]
    assert state.leading


def test_a_leader_steps_down_for_a_better_record_and_on_losing_its_lease() -> None:
    state = lease("b", unix=1.0)
    run_until_settled(state, 0.0, 1.1)
    epoch = state.epoch
    assert state.on_record(leader("a", epoch), 1.2) == [StepDown(f"a leads with epoch {epoch}")]
    assert state.role is Role.STANDBY and state.current_epoch() == epoch
    other = lease("c", unix=1.0)
    run_until_settled(other, 0.0, 1.1)
    lost_epoch = other.epoch
    assert other.on_record(vacant("c", lost_epoch), 1.2) == [StepDown("lease connection lost")]
    assert other.tick(1.3) == [Claim(lost_epoch + 1)]  # it may bid again like everyone else


def test_a_claim_is_withdrawn_when_the_holder_comes_back() -> None:
    state = lease("b")
    state.on_record(leader("a", 7), 0.01)
    state.on_record(vacant("a", 7), 0.5)
    assert state.tick(0.55) != []
    state.on_record(leader("a", 7), 0.6)  # its lease reconnected: it was a blip
    assert state.role is Role.STANDBY and run_until_settled(state, 0.6, 3.0) == []


def test_epochs_grow_past_a_broker_that_forgot_the_record() -> None:
    assert next_epoch(0, 1795680000.0) == 1795680000000
    assert next_epoch(1795680000000, 1.0) == 1795680000001
    assert next_epoch(2**53, 1.0) == 2**53


def test_old_messages_without_an_epoch_parse_as_epoch_zero() -> None:
    old = json.dumps({"v": 1, "ts": 0, "model": "m", "assignment_id": "a-1"}).encode()
    assert decode(Assign, old).epoch == 0
    with pytest.raises(Exception, match="epoch"):
        decode(LeaderRecord, json.dumps({"v": 1, "ts": 0, "state": "leader", "coordinator_id": "x",
                                         "epoch": -1}).encode())


# ---------------------------------------------------------------- the agent's fence


class _Backend:
    """Enough of a backend for ModelManager: the model is on disk, warming and measuring are instant."""

    def __init__(self) -> None:
        self.warmed: list[str] = []

    async def list_models(self) -> list[str]:
        return ["m1", "m2"]

    async def warm(self, model: str, keep_alive: str | None) -> None:
        self.warmed.append(model)

    async def chat(self, *args: object, **kwargs: object):  # pragma: no cover - benchmark_tokens=0
        raise AssertionError("no benchmark expected")
        yield


async def test_the_fence_refuses_a_deposed_leaders_assignment_and_a_new_epoch_changes_nothing() -> None:
    backend = _Backend()
    published: list[Any] = []

    async def never() -> None:
        await asyncio.Event().wait()

    manager = ModelManager(backend, publish=published.append, wait_backend_up=never,  # type: ignore[arg-type]
                           report_unreachable=lambda error: None, benchmark_tokens=0)
    manager.handle_assign(Assign(model="m1", assignment_id="a-1", epoch=5))
    for _ in range(100):
        if manager.state.state == "ready":
            break
        await asyncio.sleep(0.01)
    assert manager.state.state == "ready" and backend.warmed == ["m1"]
    states = len(published)
    manager.handle_assign(Assign(model="m1", assignment_id="a-1", epoch=9))  # a new leader re-publishes
    assert manager.fence.highest == 9 and len(published) == states and not manager.busy
    manager.handle_assign(Assign(model="m2", assignment_id="a-2", epoch=5))  # the deposed leader, late
    assert manager.assignment is not None and manager.assignment.model == "m1" and not manager.busy
    assert len(published) == states and backend.warmed == ["m1"]
    manager.handle_assign(Assign(model="m2", assignment_id="a-3", epoch=9))  # the leader moves it: accepted
    assert manager.assignment is not None and manager.assignment.assignment_id == "a-3"
    for task in manager.cancel_all():
        await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------- two coordinators, two agents, one kill -9


class Watcher:
    """Records every leader record and assignment on the broker (a test-side subscriber)."""

    def __init__(self, settings: MqttSettings) -> None:
        self.topics = Topics(settings.topic_prefix)
        self.lock = threading.Lock()
        self.leaders: list[tuple[float, LeaderRecord]] = []
        self.assigns: list[tuple[float, str, Assign]] = []
        self.models: list[tuple[float, str, ModelState]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.connection = MqttConnection(
            settings, f"watcher-{time.monotonic_ns()}", on_message=self._on_message, loop=self.loop,
            subscriptions=[(self.topics.coordinator_leader(), 1), (f"{self.topics.prefix}/control/+/assign", 1),
                           (f"{self.topics.prefix}/agent/+/model", 1)])
        self.connection.start()
        assert self.connection.wait_connected(10)

    def _on_message(self, message: InboundMessage) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None or not message.payload:
            return
        kind, agent_id = parsed
        with self.lock:
            if kind.spec.model is LeaderRecord:
                self.leaders.append((time.monotonic(), decode(LeaderRecord, message.payload)))
            elif kind.spec.model is Assign and agent_id is not None:
                self.assigns.append((time.monotonic(), agent_id, decode(Assign, message.payload)))
            elif kind.spec.model is ModelState and agent_id is not None:
                self.models.append((time.monotonic(), agent_id, decode(ModelState, message.payload)))

    def current_leader(self) -> LeaderRecord | None:
        with self.lock:
            records = [record for _, record in self.leaders if record.state != "claim"]
        return records[-1] if records else None

    def close(self) -> None:
        self.connection.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Broker:
    """``python -m broker`` with its console on a pipe: prompts in, answers out."""

    def __init__(self, name: str, settings: MqttSettings, folder: Path, keepalive: int) -> None:
        self.name = name
        self.process = spawn(name, [
            "-m", "broker", "--broker-url", settings.broker_url, "--topic-prefix",
            settings.topic_prefix, "--coordinator-id", name, "--mqtt-keepalive", str(keepalive),
            "--replan-debounce-s", "0.2", "--leader-claim-window-s", "0.3", "--log-level", "INFO",
            "--data-dir", str(folder / name)], folder, stdin=subprocess.PIPE, log_name=f"{name}.log")

    def ask(self, prompt: str) -> None:
        assert self.process.process.stdin is not None
        self.process.process.stdin.write(prompt.encode() + b"\n")
        self.process.process.stdin.flush()

    def log(self, tail: int | None = None) -> str:
        return self.process.log(tail)


def start_agent(name: str, profile: str, settings: MqttSettings, folder: Path) -> AgentProcess:
    handle = spawn(name, [
        "-m", "agent", "--broker-url", settings.broker_url, "--topic-prefix", settings.topic_prefix,
        "--agent-id", name, "--backend", "simulated", "--hardware-profile", str(PROFILES / f"{profile}.json"),
        "--sim-tokens-per-s", "200", "--sim-ttft-ms", "20", "--sim-pull-s", "0.2", "--telemetry-interval-s", "0.5",
        "--benchmark-tokens", "4", "--data-dir", str(folder / name), "--log-level", "INFO"], folder,
        log_name=f"{name}.log")
    return AgentProcess(name, handle.process, handle.log_path)


KEEPALIVE = 2


def finished(log: str) -> int:
    """Answers the console finished (its closing line: ``[0.12 s, first token …]``)."""
    return len(re.findall(r"^\[\d+\.\d+ s", log, flags=re.MULTILINE))


def latest_model_states(watcher: Watcher, since: float) -> dict[str, list[ModelState]]:
    with watcher.lock:
        seen = [(agent, state) for at, agent, state in watcher.models if at >= since]
    out: dict[str, list[ModelState]] = {}
    for agent, state in seen:
        out.setdefault(agent, []).append(state)
    return out


@pytest.mark.slow
def test_two_coordinators_one_leads_and_the_other_takes_over_after_kill_9(mqtt_settings: MqttSettings,
                                                                          tmp_path: Path) -> None:
    watcher = Watcher(mqtt_settings)
    agents = [start_agent("gpu-desktop", "gpu-desktop", mqtt_settings, tmp_path),
              start_agent("laptop", "laptop", mqtt_settings, tmp_path)]
    brokers = {name: Broker(name, mqtt_settings, tmp_path, KEEPALIVE) for name in ("coord-a", "coord-b")}
    names = [agent.agent_id for agent in agents]

    def describe() -> str:
        return "\n".join(f"--- {name}\n{broker.log(3000)}" for name, broker in brokers.items())

    def ready_models() -> dict[str, tuple[str | None, str | None]]:
        latest: dict[str, ModelState] = {}
        with watcher.lock:
            for _, agent, state in watcher.models:
                latest[agent] = state
        return {agent: (state.model, state.assignment_id) for agent, state in latest.items()
                if state.state == "ready" and state.assignment_id}

    try:
        wait_until(lambda: set(ready_models()) == set(names), 30, "both agents ready with an assignment",
                   describe=describe)
        record = watcher.current_leader()
        assert record is not None and record.state == "leader"
        leader_name = record.coordinator_id.split(".")[0]
        standby_name = next(name for name in brokers if name != leader_name)
        leader, standby = brokers[leader_name], brokers[standby_name]
        # exactly one publishes assignments: every assignment carries the leader's epoch, the standby sent none
        with watcher.lock:
            assert {assign.epoch for _, _, assign in watcher.assigns} == {record.epoch}
        assert re.search(r"assign \S+ → ", leader.log()) and not re.search(r"assign \S+ → ", standby.log())
        before = ready_models()
        # both front ends answer
        for broker in brokers.values():
            broker.ask("hello before the takeover")
        wait_until(lambda: all(finished(broker.log()) >= 1 for broker in brokers.values()), 15,
                   "both coordinators to answer", describe=describe)

        killed_at = leader.process.kill()
        wait_until(lambda: (current := watcher.current_leader()) is not None and current.state == "leader"
                   and current.coordinator_id.startswith(standby_name + "."), 2 * KEEPALIVE + 2,
                   "the standby to lead", describe=describe)
        with watcher.lock:
            took_over_at, new_record = next((at, r) for at, r in watcher.leaders
                                            if r.state == "leader" and r.coordinator_id.startswith(standby_name))
        assert took_over_at - killed_at < 2 * KEEPALIVE, f"takeover took {took_over_at - killed_at:.2f} s"
        assert new_record.epoch > record.epoch
        time.sleep(1.0)  # past the new leader's debounced plan
        # no assignment change for agents whose model stays: the same ids again under the new epoch at most
        with watcher.lock:
            after = [(agent, assign) for at, agent, assign in watcher.assigns if at >= killed_at]
        assert after, "the new leader re-stamps the current assignments with its epoch"
        for agent, assign in after:
            assert (assign.model, assign.assignment_id) == before[agent] and assign.epoch == new_record.epoch
        states = latest_model_states(watcher, killed_at)
        assert all(state.state == "ready" for changes in states.values() for state in changes), states
        assert ready_models() == before
        standby.ask("hello after the takeover")
        wait_until(lambda: finished(standby.log()) >= 2, 15, "the new leader to answer", describe=describe)

        # the deposed leader's late publish (its queued assignment arrives after the takeover): fenced and repaired
        stale = Assign(model="llama3.2:1b", assignment_id="stale-1", reason="deposed", epoch=record.epoch)
        probe = watcher.connection.publish_and_wait(watcher.topics.assign("laptop"), stale, qos=1, retain=True)
        assert probe == 0
        wait_until(lambda: any(at > killed_at and agent == "laptop" and assign.assignment_id == before["laptop"][1]
                               and assign.epoch == new_record.epoch
                               for at, agent, assign in watcher.assigns[-3:]), 5,
                   "the leader to write the current assignment back over the stale one", describe=describe)
        time.sleep(0.5)
        assert ready_models()["laptop"] == before["laptop"]
        assert "from a deposed coordinator" in next(a for a in agents if a.agent_id == "laptop").log(None)
    finally:
        for broker in brokers.values():
            broker.process.stop(timeout=5)
        for agent in agents:
            agent.stop(timeout=5)
        watcher.close()

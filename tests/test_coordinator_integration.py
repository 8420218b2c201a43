"""The coordinator against the real Mosquitto and real agent processes (simulated backend).

Agents run as ``python -m agent --backend simulated --hardware-profile ...`` with
short telemetry intervals, so joins, kills (SIGKILL → last will), freezes
(SIGSTOP → stalls and expiry) and restarts behave as on a real network.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.backends.simulated import simulated_text
from broker.coordinator.contract import (
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.settings import MqttSettings
from broker.protocol import Cancel, ChatMessage, TopicKind, Topics, decode
from tests.support.processes import AgentProcess
from tests.support.processes import wait_until_async as wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "agent" / "profiles"
TELEMETRY_S = 0.5


@pytest.fixture()
def spawn(mqtt_settings: MqttSettings, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start real agent processes; all are stopped at teardown."""
    started: list[AgentProcess] = []

    def factory(agent_id: str, profile: str, *, tokens_per_s: float = 50, ttft_ms: float = 50,
                max_parallel: int | None = None) -> AgentProcess:
        log = tmp_path / f"{agent_id}.log"
        command = [
            sys.executable, "-m", "agent", "--broker-url", mqtt_settings.broker_url,
            "--topic-prefix", mqtt_settings.topic_prefix, "--agent-id", agent_id, "--backend", "simulated",
            "--hardware-profile", str(PROFILES / f"{profile}.json"), "--sim-tokens-per-s", str(tokens_per_s),
            "--sim-ttft-ms", str(ttft_ms), "--sim-pull-s", "0.2", "--telemetry-interval-s", str(TELEMETRY_S),
            "--benchmark-tokens", "4", "--chunk-interval-ms", "0", "--chunk-max-tokens", "1",
            "--data-dir", str(tmp_path / agent_id), "--log-level", "INFO",
        ]
        if max_parallel is not None:
            command += ["--max-parallel", str(max_parallel)]
        with log.open("wb") as output:
            process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        handle = AgentProcess(agent_id, process, log)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.signal(signal.SIGCONT)
        handle.signal(signal.SIGTERM)
    for handle in started:
        try:
            handle.process.wait(5)
        except subprocess.TimeoutExpired:
            handle.kill()


@pytest.fixture()
async def coordinators(mqtt_settings: MqttSettings) -> AsyncIterator[Callable[..., Any]]:
    """Start coordinators on this test's prefix with short, test-friendly timings."""
    made: list[Coordinator] = []

    async def factory(**overrides: Any) -> Coordinator:
        values: dict[str, Any] = dict(
            broker_url=mqtt_settings.broker_url, topic_prefix=mqtt_settings.topic_prefix,
            data_dir=mqtt_settings.data_dir, replan_debounce_s=0.3, expected_output_tokens=48,
            stall_first_token_s=5.0, stall_between_chunks_s=1.5, admission_wait_s=5.0, cooldown_s=5.0,
        )
        values.update(overrides)
        coordinator = Coordinator(CoordinatorSettings(**values))
        await coordinator.start()
        assert await coordinator.wait_connected(10)
        made.append(coordinator)
        return coordinator

    yield factory
    for coordinator in made:
        if coordinator.connected:
            await coordinator.stop()


def models_of(coordinator: Coordinator) -> dict[str, tuple[str | None, str | None]]:
    return {agent.id: (agent.model, agent.model_state) for agent in coordinator.snapshot().agents if agent.online}


async def ready(coordinator: Coordinator, count: int, timeout: float = 20.0) -> None:
    await wait_until(lambda: sum(1 for a in coordinator.snapshot().agents if a.online and a.model_state == "ready"
                                 and a.model is not None) >= count, timeout, f"{count} ready agent(s)")


def ask(text: str, mode: str = "auto", **kwargs: Any) -> QueryRequest:
    return QueryRequest(messages=[ChatMessage(role="user", content=text)], mode=mode, **kwargs)


async def collect(coordinator: Coordinator, request: QueryRequest) -> list[QueryEvent]:
    return [event async for event in coordinator.query(request)]


def counter(coordinator: Coordinator, name: str, **labels: str) -> float:
    value = coordinator.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


# ---------------------------------------------------------------- placement


async def test_demo_cluster_places_three_tiers_and_answers_every_mode(spawn, coordinators) -> None:
    spawn("gpu-desktop", "gpu-desktop", tokens_per_s=120)
    spawn("laptop", "laptop", tokens_per_s=40)
    spawn("raspberry-pi", "raspberry-pi", tokens_per_s=30)
    coordinator = await coordinators()
    await ready(coordinator, 3)
    assert models_of(coordinator) == {"gpu-desktop": ("llama3.1:8b", "ready"), "laptop": ("llama3.2:3b", "ready"),
                                      "raspberry-pi": ("llama3.2:1b", "ready")}
    assert coordinator.model_names() == ["llama3.1:8b", "llama3.2:1b", "llama3.2:3b"]
    scores = {agent.id: agent.score for agent in coordinator.snapshot().agents}
    assert scores["gpu-desktop"] > scores["laptop"] > scores["raspberry-pi"]  # type: ignore[operator]

    # On demand: nothing to change, nothing published.
    assignments = counter(coordinator, "slb_assignments_total")
    view = await coordinator.reassign()
    assert view.applied and not any(entry.change for entry in view.entries)
    assert counter(coordinator, "slb_assignments_total") == assignments

    events = await collect(coordinator, ask("What is MQTT?"))
    started, finished = events[0], events[-1]
    assert isinstance(started, QueryStarted) and started.agents == ["gpu-desktop"]
    assert "lowest expected completion" in started.reason
    assert isinstance(finished, QueryFinished)
    assert finished.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert finished.text == "".join(simulated_text("llama3.1:8b", [ChatMessage(role="user", content="What is MQTT?")]))

    quality = await collect(coordinator, ask("Which model?", "quality"))
    assert isinstance(quality[-1], QueryFinished) and quality[-1].models == ["llama3.1:8b"]
    named = await collect(coordinator, ask("Small please", "llama3.2:1b"))
    assert isinstance(named[-1], QueryFinished) and named[-1].agents == ["raspberry-pi"]

    short = {"num_predict": 16}
    fan = await collect(coordinator, ask("Tell me about clusters", "all", options=short))
    final = fan[-1]
    assert isinstance(final, QueryFinished) and final.aggregation == "consensus"
    assert sorted(answer.agent_id for answer in final.answers) == ["gpu-desktop", "laptop", "raspberry-pi"]
    assert all(answer.error is None and answer.text and answer.simulated for answer in final.answers)
    assert final.agreement is not None and 0 < final.agreement <= 1
    assert final.text in [answer.text for answer in final.answers]
    deltas = {e.agent_id for e in fan if isinstance(e, AgentDelta)}
    assert deltas == {"gpu-desktop", "laptop", "raspberry-pi"}

    synthesis = await collect(coordinator, ask("Tell me about clusters", "all", aggregation="synthesize",
                                               options=short))
    final = synthesis[-1]
    assert isinstance(final, QueryFinished) and final.combined_by and "gpu-desktop" in final.combined_by
    assert final.text.startswith("[simulated llama3.1:8b]") and "Question:" in final.text

    first = await collect(coordinator, ask("Quick!", "all", aggregation="first", options=short))
    final = first[-1]
    assert isinstance(final, QueryFinished) and "(first)" in (final.combined_by or "")
    assert any(answer.error and "another answer came first" in answer.error for answer in final.answers)


async def test_replan_on_schedule_does_not_churn(spawn, coordinators) -> None:
    spawn("gpu-desktop", "gpu-desktop")
    spawn("laptop", "laptop")
    coordinator = await coordinators(replan_interval_s=0.4)
    await ready(coordinator, 2)
    before = models_of(coordinator)
    assignments = counter(coordinator, "slb_assignments_total")
    scheduled = counter(coordinator, "slb_replans_total", trigger="schedule")
    await wait_until(lambda: counter(coordinator, "slb_replans_total", trigger="schedule") >= scheduled + 3, 5,
                     "three scheduled re-plans")
    assert counter(coordinator, "slb_assignments_total") == assignments
    assert models_of(coordinator) == before


async def test_join_and_leave(spawn, coordinators) -> None:
    desktop = spawn("gpu-desktop", "gpu-desktop")
    pi = spawn("raspberry-pi", "raspberry-pi")
    coordinator = await coordinators()
    await ready(coordinator, 2)
    pi.kill()
    await wait_until(lambda: not next(a for a in coordinator.snapshot().agents if a.id == "raspberry-pi").online,
                     3, "the last will to take the Pi offline")
    assert coordinator.plan().excluded == {"raspberry-pi": "offline"}
    spawn("laptop", "laptop")
    await wait_until(lambda: models_of(coordinator).get("laptop") == ("llama3.2:3b", "ready"), 20,
                     "the new laptop to get its model")
    assert models_of(coordinator)["gpu-desktop"] == ("llama3.1:8b", "ready")
    assert desktop.process.poll() is None


async def test_silent_agent_expires_and_comes_back(spawn, coordinators) -> None:
    laptop = spawn("laptop", "laptop")
    coordinator = await coordinators(expiry_factor=3.0)
    await ready(coordinator, 1)
    laptop.signal(signal.SIGSTOP)
    try:
        await wait_until(lambda: counter(coordinator, "slb_agent_expiries_total") == 1, 5, "telemetry expiry")
        assert not coordinator.snapshot().agents[0].online
        assert coordinator.model_names() == []
    finally:
        laptop.signal(signal.SIGCONT)
    await wait_until(lambda: coordinator.snapshot().agents[0].online, 5, "the agent to come back")


async def test_coordinator_restart_rebuilds_the_picture_without_reassigning(spawn, coordinators) -> None:
    spawn("gpu-desktop", "gpu-desktop")
    spawn("laptop", "laptop")
    spawn("raspberry-pi", "raspberry-pi")
    first = await coordinators()
    await ready(first, 3)
    picture = {a.id: (a.online, a.model, a.model_state, a.score_breakdown["cpu"]) for a in first.snapshot().agents}
    await first.stop()
    restarted = time.monotonic()
    second = await coordinators()
    await wait_until(lambda: {a.id: (a.online, a.model, a.model_state, a.score_breakdown.get("cpu"))
                              for a in second.snapshot().agents} == picture and
                     all(a.jobs_running is not None and a.last_seen_s is not None for a in second.snapshot().agents),
                     5, "the restarted coordinator to see the same cluster")
    assert time.monotonic() - restarted < 2 * TELEMETRY_S + 1.0
    assert not any(entry.change for entry in second.plan().entries)
    await asyncio.sleep(0.6)  # past the join debounce: the re-plan ran and published nothing
    assert counter(second, "slb_replans_total", trigger="agent_joined") >= 1
    assert counter(second, "slb_assignments_total") == 0
    events = await collect(second, ask("still there?"))
    assert isinstance(events[-1], QueryFinished)


# ---------------------------------------------------------------- routing


async def test_auto_goes_to_the_lowest_expected_completion_time(spawn, coordinators) -> None:
    spawn("gpu-desktop", "gpu-desktop", tokens_per_s=100, max_parallel=1)
    spawn("laptop", "laptop", tokens_per_s=30)
    coordinator = await coordinators(placement_mix=False)
    await ready(coordinator, 2)
    assert (await collect(coordinator, ask("warm up")))[0].agents == ["gpu-desktop"]  # type: ignore[union-attr]
    # Three long answers queue on the desktop (one slot): the laptop now finishes sooner.
    long = [coordinator.query(ask(f"long {n}", "llama3.1:8b", options={"num_predict": 300})) for n in range(3)]
    for stream in long:
        assert isinstance(await anext(stream), QueryStarted)
    events = await collect(coordinator, ask("who is faster now?"))
    started = events[0]
    assert isinstance(started, QueryStarted) and started.agents == ["laptop"], started
    assert "gpu-desktop" in started.reason  # the reason compares both
    for stream in long:
        await stream.aclose()


async def test_no_agent_and_busy_are_clear_errors(spawn, coordinators) -> None:
    spawn("laptop", "laptop", tokens_per_s=20, max_parallel=1)
    coordinator = await coordinators(agent_queue_limit=0, admission_wait_s=0.5)
    await ready(coordinator, 1)
    missing = await collect(coordinator, ask("hi", "mistral:7b"))
    assert isinstance(missing[-1], QueryFailed) and missing[-1].code == "no_agent"
    assert "mistral:7b" in missing[-1].error and "llama3.2:3b" in missing[-1].error
    busy_stream = coordinator.query(ask("occupy", options={"num_predict": 200}))
    assert isinstance(await anext(busy_stream), QueryStarted)
    busy = await collect(coordinator, ask("me too"))
    assert isinstance(busy[-1], QueryFailed) and busy[-1].code == "busy"
    assert "cluster busy" in busy[-1].error
    await busy_stream.aclose()


# ---------------------------------------------------------------- failure handling


async def _stream_until(stream: AsyncIterator[QueryEvent], chunks: int) -> list[QueryEvent]:
    seen: list[QueryEvent] = []
    async for event in stream:
        seen.append(event)
        if sum(1 for e in seen if isinstance(e, TextDelta)) >= chunks:
            break
    return seen


async def test_killing_the_serving_agent_mid_answer_still_finishes_it(spawn, coordinators) -> None:
    agents = {name: spawn(name, "laptop", tokens_per_s=25) for name in ("laptop-a", "laptop-b")}
    coordinator = await coordinators(placement_mix=False)
    await ready(coordinator, 2)
    request = ask("Explain failover in one long paragraph", options={"num_predict": 80})
    stream = coordinator.query(request)
    seen = await _stream_until(stream, 15)
    serving = seen[0].agents[0]  # type: ignore[union-attr]
    agents[serving].kill()
    seen += [event async for event in stream]
    switches = [e for e in seen if isinstance(e, AgentSwitched)]
    assert len(switches) == 1 and switches[0].from_agent == serving and switches[0].to_agent != serving
    final = seen[-1]
    assert isinstance(final, QueryFinished) and final.failovers == 1
    expected = "".join(simulated_text("llama3.2:3b", request.messages, 80))
    assert "".join(e.text for e in seen if isinstance(e, TextDelta)) == final.text == expected
    assert counter(coordinator, "slb_failovers_total", reason="offline") == 1


async def test_stalled_agent_is_cancelled_and_replaced(spawn, coordinators, connect, mqtt_settings) -> None:
    agents = {name: spawn(name, "laptop", tokens_per_s=25) for name in ("laptop-a", "laptop-b")}
    cancels: list[tuple[str, Cancel]] = []
    topics = Topics(mqtt_settings.topic_prefix)
    connect(mqtt_settings, subscriptions=[(topics.all_controls_of(TopicKind.CANCEL), 1)],
            on_message=lambda m: cancels.append((m.topic, decode(Cancel, m.payload))))
    coordinator = await coordinators(placement_mix=False, stall_between_chunks_s=1.0, expiry_factor=20)
    await ready(coordinator, 2)
    request = ask("A long answer that will stall", options={"num_predict": 60})
    stream = coordinator.query(request)
    seen = await _stream_until(stream, 10)
    serving = seen[0].agents[0]  # type: ignore[union-attr]
    agents[serving].signal(signal.SIGSTOP)
    try:
        seen += [event async for event in stream]
    finally:
        agents[serving].signal(signal.SIGCONT)
    switch = next(e for e in seen if isinstance(e, AgentSwitched))
    assert "stalled" in switch.reason
    final = seen[-1]
    assert isinstance(final, QueryFinished)
    assert final.text == "".join(simulated_text("llama3.2:3b", request.messages, 60))
    await wait_until(lambda: any(serving in topic for topic, _ in cancels), 3, "a Cancel to the stalled agent")


async def test_fan_out_with_an_agent_dying_returns_the_rest(spawn, coordinators) -> None:
    spawn("gpu-desktop", "gpu-desktop", tokens_per_s=150)
    spawn("laptop", "laptop", tokens_per_s=60)
    pi = spawn("raspberry-pi", "raspberry-pi", tokens_per_s=10)
    coordinator = await coordinators()
    await ready(coordinator, 3)
    seen: list[QueryEvent] = []
    async for event in coordinator.query(ask("Fan out, please", "all", options={"num_predict": 40})):
        seen.append(event)
        if isinstance(event, AgentFinished) and event.answer.agent_id == "laptop":
            pi.kill()  # the Pi is still mid-answer
    final = seen[-1]
    assert isinstance(final, QueryFinished)
    answers = {answer.agent_id: answer for answer in final.answers}
    assert answers["gpu-desktop"].error is None and answers["laptop"].error is None
    assert answers["raspberry-pi"].error and "went away" in answers["raspberry-pi"].error
    assert answers["raspberry-pi"].text  # what arrived before it died is kept
    assert final.agreement is not None and final.text in (answers["gpu-desktop"].text, answers["laptop"].text)


async def test_closing_the_stream_cancels_the_job_on_the_agent(spawn, coordinators, connect, mqtt_settings) -> None:
    spawn("laptop", "laptop", tokens_per_s=20)
    cancels: list[Cancel] = []
    topics = Topics(mqtt_settings.topic_prefix)
    connect(mqtt_settings, subscriptions=[(topics.all_controls_of(TopicKind.CANCEL), 1)],
            on_message=lambda m: cancels.append(decode(Cancel, m.payload)))
    coordinator = await coordinators()
    await ready(coordinator, 1)
    stream = coordinator.query(ask("long", options={"num_predict": 200}))
    await _stream_until(stream, 2)
    await stream.aclose()
    await wait_until(lambda: len(cancels) == 1, 3, "a Cancel after aclose()")
    request = ask("cancel me", options={"num_predict": 200})
    stream = coordinator.query(request)
    await _stream_until(stream, 2)
    assert await coordinator.cancel(request.request_id)
    rest = [event async for event in stream]
    assert isinstance(rest[-1], QueryFailed) and rest[-1].code == "cancelled"
    await wait_until(lambda: len(cancels) == 2, 3, "a Cancel after cancel()")
    assert not await coordinator.cancel("no-such-request")
    await wait_until(lambda: coordinator.snapshot().agents[0].jobs_running == 0, 3, "the agent to stop the jobs")
    # Stopping the coordinator ends open streams with "cancelled" and cancels their jobs too.
    stream = coordinator.query(ask("cut short by stop()", options={"num_predict": 200}))
    await _stream_until(stream, 2)
    await coordinator.stop()
    rest = [event async for event in stream]
    assert isinstance(rest[-1], QueryFailed) and rest[-1].code == "cancelled" and "stopping" in rest[-1].error
    await wait_until(lambda: len(cancels) == 3, 3, "a Cancel after stop()")


# ---------------------------------------------------------------- python -m broker


def _broker_command(mqtt_settings: MqttSettings, *extra: str) -> list[str]:
    return [sys.executable, "-m", "broker", "--broker-url", mqtt_settings.broker_url, "--topic-prefix",
            mqtt_settings.topic_prefix, "--replan-debounce-s", "0.3", *extra]


@pytest.mark.parametrize("stdin", ["devnull", "silent_pipe"])
def test_headless_broker_runs_until_sigterm(mqtt_settings: MqttSettings, stdin: str) -> None:
    process = subprocess.Popen(_broker_command(mqtt_settings), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL if stdin == "devnull" else subprocess.PIPE)
    try:
        time.sleep(2.0)
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        usage = _cpu_seconds(process.pid)
        time.sleep(1.0)
        assert _cpu_seconds(process.pid) - usage < 0.3  # no busy loop on end of input
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, errors.decode()
    assert b"coordinator coordinator stopped" in errors


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_console_answers_a_prompt_and_quits(spawn, mqtt_settings: MqttSettings) -> None:
    spawn("laptop", "laptop", tokens_per_s=100)
    process = subprocess.Popen(_broker_command(mqtt_settings), cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(4.0)  # agent joins, gets its model
        output, errors = process.communicate(b"stats\nhello cluster\nplan\nquit\n", timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    text = output.decode()
    assert process.returncode == 0, errors.decode()
    assert "laptop" in text and "score" in text
    assert "[laptop (llama3.2:3b)]" in text and "You asked: hello cluster" in text
    assert "what-if, not applied" in text

"""The agent as a real subprocess on a real Mosquitto, with the Ollama test double as its backend."""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.mqtt.local_broker import RunningBroker, free_port
from broker.mqtt.settings import MqttSettings
from broker.protocol import (
    Assign,
    Cancel,
    CoordinatorStatus,
    Hardware,
    ModelState,
    Result,
    Status,
    Telemetry,
    TopicKind,
)
from tests.ollama_double import OllamaDouble, reply_text
from tests.support.processes import REPO, AgentProcess
from tests.test_agent_harness import Watcher, spawn_agent

MODEL = "llama3.2:1b"
PROFILES = REPO / "agent" / "profiles"


def assert_answer(chunks: list[Result], text: str | None = None) -> Result:
    """Contiguous sequence numbers from 0, one final chunk, the expected text; returns the final chunk."""
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks))), [c.seq for c in chunks]
    assert [chunk.done for chunk in chunks].count(True) == 1 and chunks[-1].done
    if text is not None:
        assert "".join(chunk.delta for chunk in chunks) == text
    return chunks[-1]


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    """Agents started by a test; stopped (and their logs shown on failure) at teardown."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop(timeout=5)


def start_agent(agents: list[AgentProcess], broker_url: str, prefix: str, tmp_path: Path, *extra: str,
                backend_url: str | None = None, agent_id: str | None = None) -> AgentProcess:
    agent = spawn_agent(broker_url, prefix, agent_id or f"agent-{uuid.uuid4().hex[:6]}", tmp_path / "agent-data",
                        *extra, backend_url=backend_url)
    agents.append(agent)
    return agent


def wait_ready(watcher: Watcher, agent: AgentProcess, assignment_id: str, timeout: float = 15.0) -> ModelState:
    try:
        return watcher.wait_for(TopicKind.MODEL, agent.agent_id,
                                lambda m: m.assignment_id == assignment_id and m.state == "ready", timeout=timeout,
                                what=f"ready for {assignment_id}")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- agent log ---\n{agent.log()}") from None


# ---------------------------------------------------------------- one served agent shared by the job tests


class Served:
    def __init__(self, agent: AgentProcess, watcher: Watcher, double: OllamaDouble) -> None:
        self.agent = agent
        self.watcher = watcher
        self.double = double

    @property
    def agent_id(self) -> str:
        return self.agent.agent_id


@pytest.fixture(scope="module")
def served(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """An agent serving llama3.2:1b from the double (fast tokens), with a declared GPU desktop profile."""
    prefix = f"slbtest/{uuid.uuid4().hex[:10]}/v1"
    tmp_path = tmp_path_factory.mktemp("served")
    double = OllamaDouble(models=[MODEL], tokens_per_s=400, num_parallel=2).start()  # runs the agent's 2 at once
    watcher = Watcher(MqttSettings(broker_url=mosquitto.url, topic_prefix=prefix), prefix)
    agent = spawn_agent(mosquitto.url, prefix, "served-1", tmp_path, "--hardware-profile",
                        str(PROFILES / "gpu-desktop.json"), "--chunk-interval-ms", "30", "--max-parallel", "2",
                        "--max-queue", "1", backend_url=double.url)
    try:
        watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online", timeout=15)
        watcher.publish(watcher.topics.assign(agent.agent_id),
                        Assign(model=MODEL, assignment_id="s1", reason="test"), retain=True)
        wait_ready(watcher, agent, "s1")
        yield Served(agent, watcher, double)
    finally:
        agent.stop()
        watcher.close()
        double.stop()


@pytest.fixture()
def fresh(served: Served) -> Iterator[Served]:
    served.double.reset_faults()
    served.double.config.tokens_per_s = 400
    served.double.config.reply_tokens = None
    served.double.config.ttft_s = 0.0
    yield served
    assert served.agent.alive(), served.agent.log()


def test_presence_hardware_and_telemetry(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    status: Status = watcher.wait_for(TopicKind.STATUS, agent_id, lambda s: s.state == "online"
                                      and s.runtime is not None and s.runtime.slots_source == "measured")
    assert status.backend == "ollama" and status.backend_url == fresh.double.url and status.backend_reachable
    assert not status.simulated and status.agent_version
    # The double runs two requests at once and --max-parallel caps at 2: the warm-up probe measures exactly that.
    assert status.runtime is not None and status.runtime.kind == "ollama" and status.runtime.slots == 2
    assert status.max_parallel == 2 and status.runtime.continues_prefill is True
    hardware: Hardware = watcher.wait_for(TopicKind.HARDWARE, agent_id, lambda h: h.benchmark is not None)
    assert hardware.declared and hardware.cpu_brand == "AMD Ryzen 9 7950X 16-Core Processor"
    assert hardware.gpus[0].vram_total_gb == 24 and hardware.ram_total_gb == 64
    assert hardware.benchmark is not None and hardware.benchmark.model == MODEL and hardware.benchmark.tokens_per_s > 0
    since = watcher.mark()
    telemetry: Telemetry = watcher.wait_for(TopicKind.TELEMETRY, agent_id, since=since, timeout=3)
    assert telemetry.backend_reachable and telemetry.max_parallel == 2 and telemetry.interval_s == 0.5
    assert telemetry.cpu_percent is not None and telemetry.ram_free_gb and telemetry.gpu_util_percent is None
    assert not telemetry.simulated


def test_coordinator_birth_makes_it_republish_its_state(fresh: Served) -> None:
    """State recovery (docs/protocol.md): a broker that replays nothing to a new coordinator's wildcard subscription
    (RabbitMQ) still gets it the agent's status, hardware and model, a moment after the coordinator's birth."""
    watcher, agent_id = fresh.watcher, fresh.agent_id
    topic = watcher.topics.coordinator_status()
    since = watcher.mark()
    watcher.publish(topic, CoordinatorStatus(state="offline"), retain=True)  # a coordinator leaving asks nothing
    time.sleep(1.0)
    assert watcher.decoded(TopicKind.HARDWARE, agent_id, since) == []
    since = watcher.mark()
    watcher.publish(topic, CoordinatorStatus(state="online"), retain=True)
    status = watcher.wait_for(TopicKind.STATUS, agent_id, lambda s: s.state == "online", since=since, timeout=3)
    assert status.backend == "ollama"
    assert watcher.wait_for(TopicKind.HARDWARE, agent_id, since=since, timeout=3).declared
    model = watcher.wait_for(TopicKind.MODEL, agent_id, since=since, timeout=3)
    assert (model.model, model.assignment_id, model.state) == (MODEL, "s1", "ready")
    watcher.publish(topic, b"", retain=True)  # leave no retained coordinator behind for the next tests


def test_streams_first_chunk_at_once_then_batches(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    fresh.double.config.tokens_per_s = 200
    fresh.double.config.reply_tokens = 60  # 0.3 s of tokens
    since = watcher.mark()
    sent = time.monotonic()
    watcher.send_job(agent_id, "stream-1", "tell me a story")
    first: Result = watcher.wait_for(TopicKind.RESULT, None, lambda r: r.request_id == "stream-1", since=since)
    first_after = time.monotonic() - sent
    chunks = watcher.wait_answer("stream-1", since=since)
    final = assert_answer(chunks, reply_text("tell me a story", 60))
    assert first.seq == 0 and first.delta == "Echo:" and first_after < 0.5
    assert 4 <= len(chunks) <= 25, len(chunks)  # batched: far fewer messages than 60 tokens
    assert final.stats is not None and final.stats.output_tokens == 60 and final.stats.prompt_tokens == 4
    assert final.stats.ttft_s is not None and final.stats.ttft_s < 0.5 and final.stats.tokens_per_s
    assert final.stats.total_s and final.agent_id == agent_id and final.model == MODEL and final.error is None


def test_parallel_jobs_and_busy(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    fresh.double.config.tokens_per_s = 50
    fresh.double.config.reply_tokens = 25
    since = watcher.mark()
    for index in range(4):  # 2 run, 1 waits, 1 is refused
        watcher.send_job(agent_id, f"par-{index}", f"question {index}")
    busy = watcher.wait_answer("par-3", since=since)
    assert busy[-1].error_code == "busy"
    for index in range(3):
        assert_answer(watcher.wait_answer(f"par-{index}", since=since), reply_text(f"question {index}", 25))
    telemetry = watcher.decoded(TopicKind.TELEMETRY, agent_id, since)
    assert any(t.jobs_running == 2 for t in telemetry) or len(telemetry) < 2


def test_cancel_stops_the_backend_stream(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    fresh.double.config.tokens_per_s = 50
    fresh.double.config.reply_tokens = 500
    aborted = fresh.double.stats.streams_aborted_by_client
    since = watcher.mark()
    watcher.send_job(agent_id, "cancel-1", "long one")
    watcher.wait_for(TopicKind.RESULT, None, lambda r: r.request_id == "cancel-1", since=since)
    watcher.publish(watcher.topics.cancel(agent_id), Cancel(request_id="cancel-1", reason="user stop"))
    chunks = watcher.wait_answer("cancel-1", since=since, timeout=3)
    final = assert_answer(chunks)
    assert final.error_code == "cancelled" and "user stop" in (final.error or "")
    deadline = time.monotonic() + 3
    while fresh.double.stats.streams_aborted_by_client == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fresh.double.stats.streams_aborted_by_client == aborted + 1  # the HTTP stream was closed


def test_deadline_before_and_during(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    since = watcher.mark()
    watcher.send_job(agent_id, "late-1", "too late", deadline_in=-5)
    assert watcher.wait_answer("late-1", since=since)[-1].error_code == "deadline"
    fresh.double.config.tokens_per_s = 50
    fresh.double.config.reply_tokens = 500
    watcher.send_job(agent_id, "late-2", "slow", deadline_in=0.6)
    final = assert_answer(watcher.wait_answer("late-2", since=since))
    assert final.error_code == "deadline" and len(watcher.results("late-2", since)) > 2


def test_duplicate_job_is_answered_once(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    since = watcher.mark()
    job = watcher.send_job(agent_id, "dup-1", "only once")
    watcher.publish(watcher.topics.job(agent_id), job)
    assert_answer(watcher.wait_answer("dup-1", since=since), reply_text("only once"))
    watcher.send_job(agent_id, "dup-marker", "marker")  # jobs are handled in order: after this, the duplicate is past
    watcher.wait_answer("dup-marker", since=since)
    assert sum(result.done for result in watcher.results("dup-1", since)) == 1


def test_model_not_served_and_backend_errors(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    since = watcher.mark()
    watcher.send_job(agent_id, "other-1", "hi", model="mistral:7b")
    final = watcher.wait_answer("other-1", since=since)[-1]
    assert final.error_code == "model_not_served" and "llama3.2:1b" in (final.error or "")
    fresh.double.config.context_limit = 2
    watcher.send_job(agent_id, "ctx-1", "far too many words here")
    final = watcher.wait_answer("ctx-1", since=since)[-1]
    assert final.error_code == "context_too_long" and "context length" in (final.error or "")


def test_local_model_not_assigned_is_served(fresh: Served) -> None:
    fresh.double.config.models.add("qwen2.5:0.5b")
    watcher, agent_id = fresh.watcher, fresh.agent_id
    since = watcher.mark()
    # the agent learns local models on its periodic checks or on assignment; force a refresh through a job miss
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        request_id = f"local-{uuid.uuid4().hex[:6]}"
        watcher.send_job(agent_id, request_id, "small model please", model="qwen2.5:0.5b")
        final = watcher.wait_answer(request_id, since=since)[-1]
        if final.error is None:
            break
        time.sleep(0.3)
    assert final.error is None and final.model == "qwen2.5:0.5b"


def test_backend_dies_mid_stream_and_agent_survives(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    fresh.double.config.die_after_tokens = 3
    since = watcher.mark()
    watcher.send_job(agent_id, "die-1", "a b c d e f g")
    chunks = watcher.wait_answer("die-1", since=since)
    final = assert_answer(chunks)
    assert final.error_code == "backend_error" and "middle of an answer" in (final.error or "")
    assert "".join(chunk.delta for chunk in chunks) == "Echo: a b"  # the text so far, for a failover
    fresh.double.reset_faults()
    watcher.send_job(agent_id, "die-2", "still alive")
    assert_answer(watcher.wait_answer("die-2", since=since), reply_text("still alive"))


def test_assistant_prefix_is_continued(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    since = watcher.mark()
    watcher.send_job(agent_id, "prefix-1", "one two three four", assistant_prefix="Echo: one two", attempt=1)
    assert_answer(watcher.wait_answer("prefix-1", since=since), " three four")


def test_malformed_control_payloads_do_not_kill_it(fresh: Served) -> None:
    watcher, agent_id = fresh.watcher, fresh.agent_id
    topics = watcher.topics
    since = watcher.mark()
    for topic in (topics.job(agent_id), topics.cancel(agent_id)):
        for payload in (b"", b"{", b"null", b"[]", b'{"v": 1, "request_id": "x/y"}', "ünï".encode("latin-1")):
            watcher.publish(topic, payload)
    no_messages = b'{"v": 1, "ts": 0, "request_id": "bad-1", "model": "m", "deadline": 4102444800}'
    watcher.publish(topics.job(agent_id), no_messages)
    final = watcher.wait_answer("bad-1", since=since)[-1]
    assert final.error_code == "bad_job" and "messages" in (final.error or "")
    watcher.send_job(agent_id, "after-bad", "fine")
    assert_answer(watcher.wait_answer("after-bad", since=since), reply_text("fine"))
    assert fresh.agent.alive()


# ---------------------------------------------------------------- agents of their own


@contextlib.contextmanager
def pulling_agent(mqtt_settings: MqttSettings, tmp_path: Path, agents: list[AgentProcess],
                  bytes_per_s: int) -> Iterator[tuple[Watcher, OllamaDouble, AgentProcess, str]]:
    """An online agent on a runtime that has no model yet and pulls 10 MB at ``bytes_per_s``; with its
    assignment topic."""
    watcher = Watcher(mqtt_settings, mqtt_settings.topic_prefix)
    try:
        with OllamaDouble(models=[], pull_total_bytes=10_000_000, pull_bytes_per_s=bytes_per_s) as double:
            agent = start_agent(agents, mqtt_settings.broker_url, mqtt_settings.topic_prefix, tmp_path,
                                backend_url=double.url)
            watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online", timeout=15)
            yield watcher, double, agent, watcher.topics.assign(agent.agent_id)
    finally:
        watcher.close()


def test_pull_with_progress_replace_and_fail(mqtt_settings: MqttSettings, tmp_path: Path, agents) -> None:
    with pulling_agent(mqtt_settings, tmp_path, agents, 8_000_000) as (watcher, double, agent, assign_topic):
        watcher.publish(assign_topic, Assign(model=MODEL, assignment_id="a1", reason="test"), retain=True)
        wait_ready(watcher, agent, "a1")
        states: list[ModelState] = [m for m in watcher.decoded(TopicKind.MODEL, agent.agent_id)
                                    if m.assignment_id == "a1"]
        pulling = [m for m in states if m.state == "pulling"]
        assert len(pulling) >= 3 and pulling[-1].progress == 1.0
        progress = [m.progress for m in pulling]
        assert progress == sorted(progress) and any(0 < (p or 0) < 1 for p in progress)
        assert any(m.total_bytes and m.completed_bytes for m in pulling)
        stamps = [m.ts for m in pulling]
        assert len(stamps) <= 2 + 4 * (stamps[-1] - stamps[0] + 0.25)  # at most ~4 per second
        order = [m.state for m in states]
        assert order.index("loading") > order.index("pulling") and order[-1] == "ready"
        assert MODEL in states[-1].local_models

        since = watcher.mark()
        watcher.publish(assign_topic, Assign(model=MODEL, assignment_id="a1", reason="again"), retain=True)
        watcher.publish(assign_topic, Assign(model="qwen2.5:3b", assignment_id="a2", reason="bigger"), retain=True)
        watcher.wait_for(TopicKind.MODEL, agent.agent_id, lambda m: m.state == "pulling" and m.assignment_id == "a2",
                         since=since)
        watcher.publish(assign_topic, Assign(model="qwen2.5:0.5b", assignment_id="a3", reason="smaller"), retain=True)
        wait_ready(watcher, agent, "a3")
        later = watcher.decoded(TopicKind.MODEL, agent.agent_id, since)
        assert not [m for m in later if m.assignment_id == "a1"]  # same assignment again: nothing
        assert not [m for m in later if m.assignment_id == "a2" and m.state == "ready"]
        assert "qwen2.5:3b" not in double.config.models  # the replaced pull was abandoned

        watcher.publish(assign_topic, Assign(model="no-such-model:9b", assignment_id="a4", reason="typo"), retain=True)
        failed: ModelState = watcher.wait_for(TopicKind.MODEL, agent.agent_id,
                                              lambda m: m.assignment_id == "a4" and m.state == "failed")
        assert failed.error and "file does not exist" in failed.error
        assert agent.alive()


def test_the_same_model_assigned_again_while_preparing_is_not_prepared_twice(
        mqtt_settings: MqttSettings, tmp_path: Path, agents) -> None:
    """A restarted agent reads its retained assignment, then the coordinator places the same model under a new
    id while the first preparation still runs: one pull and one warm-up, ready under the newer id."""
    with pulling_agent(mqtt_settings, tmp_path, agents, 5_000_000) as (watcher, double, agent, assign_topic):
        watcher.publish(assign_topic, Assign(model=MODEL, assignment_id="r1", reason="retained"), retain=True)
        watcher.wait_for(TopicKind.MODEL, agent.agent_id, lambda m: m.state == "pulling" and m.assignment_id == "r1")
        watcher.publish(assign_topic, Assign(model=MODEL, assignment_id="r2", reason="placed again"), retain=True)
        ready = wait_ready(watcher, agent, "r2")
        assert ready.model == MODEL
        assert len(double.requests_to("/api/pull")) == 1, "the pull started over"
        pulling = [m.progress or 0.0 for m in watcher.decoded(TopicKind.MODEL, agent.agent_id)
                   if m.state == "pulling"]
        assert pulling == sorted(pulling), f"the progress went back: {pulling}"
        assert not [m for m in watcher.decoded(TopicKind.MODEL, agent.agent_id)
                    if m.assignment_id == "r1" and m.state == "ready"]


def test_backend_down_at_start_then_up(mqtt_settings: MqttSettings, tmp_path: Path, agents) -> None:
    prefix = mqtt_settings.topic_prefix
    watcher = Watcher(mqtt_settings, prefix)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    agent = start_agent(agents, mqtt_settings.broker_url, prefix, tmp_path, backend_url=url)
    status: Status = watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online", timeout=15)
    assert status.backend_reachable is False and url in (status.backend_error or "")
    telemetry: Telemetry = watcher.wait_for(TopicKind.TELEMETRY, agent.agent_id)
    assert telemetry.backend_reachable is False
    watcher.publish(watcher.topics.assign(agent.agent_id), Assign(model=MODEL, assignment_id="d1"), retain=True)
    failed: ModelState = watcher.wait_for(TopicKind.MODEL, agent.agent_id,
                                          lambda m: m.assignment_id == "d1" and m.state == "failed")
    assert url in (failed.error or "")
    watcher.send_job(agent.agent_id, "down-1", "anyone there?")
    final = watcher.wait_answer("down-1")[-1]
    assert final.error_code == "backend_down" and url in (final.error or "")
    with OllamaDouble(port=port, models=[MODEL]):
        wait_ready(watcher, agent, "d1")
        watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.backend_reachable is True)
        watcher.send_job(agent.agent_id, "down-2", "now?")
        assert_answer(watcher.wait_answer("down-2"), reply_text("now?"))
        since = watcher.mark()
    # and down again while serving: status, model state and telemetry say so
    watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.backend_reachable is False, since=since)
    watcher.wait_for(TopicKind.MODEL, agent.agent_id, lambda m: m.state == "failed", since=since)
    assert agent.alive()
    watcher.close()


def test_broker_restart_during_a_job(own_mosquitto: RunningBroker, topic_prefix: str, tmp_path: Path,
                                     agents) -> None:
    settings = MqttSettings(broker_url=own_mosquitto.url, topic_prefix=topic_prefix)
    watcher = Watcher(settings, topic_prefix)
    with OllamaDouble(models=[MODEL], tokens_per_s=40, reply_tokens=120) as double:
        agent = start_agent(agents, own_mosquitto.url, topic_prefix, tmp_path, backend_url=double.url)
        watcher.publish(watcher.topics.assign(agent.agent_id), Assign(model=MODEL, assignment_id="b1"), retain=True)
        wait_ready(watcher, agent, "b1")
        watcher.send_job(agent.agent_id, "restart-1", "keep talking", deadline_in=60)
        watcher.wait_for(TopicKind.RESULT, None, lambda r: r.request_id == "restart-1")
        own_mosquitto.kill()  # no clean shutdown: the broker forgets the retained messages
        own_mosquitto.start()
        chunks = watcher.wait_answer("restart-1", timeout=15)
        final = chunks[-1]
        assert final.error is None and final.stats is not None and final.stats.output_tokens == 120
        seqs = [chunk.seq for chunk in chunks]
        assert seqs == sorted(set(seqs))  # gaps are possible (nobody was subscribed for a moment), never repeats
        # a fresh subscriber sees the retained state again: the agent re-published it after reconnecting
        fresh = Watcher(settings, topic_prefix)
        fresh.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online")
        fresh.wait_for(TopicKind.HARDWARE, agent.agent_id)
        fresh.wait_for(TopicKind.MODEL, agent.agent_id, lambda m: m.state == "ready")
        double.config.reply_tokens = None
        fresh.send_job(agent.agent_id, "restart-2", "after the restart")
        assert_answer(fresh.wait_answer("restart-2"), reply_text("after the restart"))
        fresh.close()
    watcher.close()


def test_kill_9_leaves_offline_will_and_sigterm_says_offline(mqtt_settings: MqttSettings, tmp_path: Path,
                                                             agents) -> None:
    prefix = mqtt_settings.topic_prefix
    watcher = Watcher(mqtt_settings, prefix)
    with OllamaDouble(models=[MODEL]) as double:
        victim = start_agent(agents, mqtt_settings.broker_url, prefix, tmp_path, backend_url=double.url)
        polite = start_agent(agents, mqtt_settings.broker_url, prefix, tmp_path, backend_url=double.url)
        for agent in (victim, polite):
            watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online", timeout=15)
        since = watcher.mark()
        killed_at = time.monotonic()
        victim.process.send_signal(signal.SIGKILL)
        assert polite.stop(signal.SIGTERM) == 0
        offline: Status = watcher.wait_for(TopicKind.STATUS, polite.agent_id, lambda s: s.state == "offline",
                                           since=since, timeout=5)
        assert offline.backend == "ollama"
        watcher.wait_for(TopicKind.STATUS, victim.agent_id, lambda s: s.state == "offline", since=since, timeout=8)
        assert time.monotonic() - killed_at < 6  # keepalive 2 s: the broker notices within 3 s
    watcher.close()
    late = Watcher(mqtt_settings, prefix)  # both offline states are retained
    for agent in (victim, polite):
        late.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "offline", timeout=3)
    late.close()


def test_simulated_backend_says_so(mqtt_settings: MqttSettings, tmp_path: Path, agents) -> None:
    prefix = mqtt_settings.topic_prefix
    watcher = Watcher(mqtt_settings, prefix)
    agent = start_agent(agents, mqtt_settings.broker_url, prefix, tmp_path, "--backend", "simulated",
                        "--sim-tokens-per-s", "200", "--sim-ttft-ms", "20", "--sim-pull-s", "0.3",
                        "--hardware-profile", str(PROFILES / "raspberry-pi.json"))
    status: Status = watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online", timeout=15)
    assert status.simulated and status.backend == "simulated" and status.max_parallel == 4
    assert watcher.wait_for(TopicKind.TELEMETRY, agent.agent_id).simulated
    hardware: Hardware = watcher.wait_for(TopicKind.HARDWARE, agent.agent_id)
    assert hardware.declared and hardware.gpus == [] and hardware.arch == "aarch64"
    watcher.publish(watcher.topics.assign(agent.agent_id), Assign(model="llama3.1:8b", assignment_id="s1"),
                    retain=True)
    wait_ready(watcher, agent, "s1")
    watcher.send_job(agent.agent_id, "sim-1", "hello there", model="llama3.1:8b")
    chunks = watcher.wait_answer("sim-1")
    assert_answer(chunks)
    assert "".join(c.delta for c in chunks).startswith("[simulated llama3.1:8b] You asked: hello there")
    watcher.close()


def test_openai_backend_end_to_end(mqtt_settings: MqttSettings, tmp_path: Path, agents) -> None:
    prefix = mqtt_settings.topic_prefix
    watcher = Watcher(mqtt_settings, prefix)
    with OllamaDouble(models=[MODEL]) as double:
        agent = start_agent(agents, mqtt_settings.broker_url, prefix, tmp_path, "--backend", "openai",
                            backend_url=double.url + "/v1")
        watcher.wait_for(TopicKind.STATUS, agent.agent_id, lambda s: s.state == "online" and s.backend_reachable,
                         timeout=15)
        assign_topic = watcher.topics.assign(agent.agent_id)
        watcher.publish(assign_topic, Assign(model="qwen2.5:7b", assignment_id="o1"), retain=True)
        failed: ModelState = watcher.wait_for(TopicKind.MODEL, agent.agent_id,
                                              lambda m: m.assignment_id == "o1" and m.state == "failed")
        assert "cannot pull" in (failed.error or "") and MODEL in (failed.error or "")
        watcher.publish(assign_topic, Assign(model=MODEL, assignment_id="o2"), retain=True)
        wait_ready(watcher, agent, "o2")
        watcher.send_job(agent.agent_id, "oa-1", "via openai")
        final = assert_answer(watcher.wait_answer("oa-1"), reply_text("via openai"))
        assert final.stats is not None and final.stats.prompt_tokens == 2 and final.stats.output_tokens == 3
    watcher.close()


def test_bad_settings_exit_with_a_message(mosquitto: RunningBroker, tmp_path: Path) -> None:
    bad = spawn_agent(mosquitto.url, "slbtest/x/v1", "bad-1", tmp_path, "--hardware-profile",
                      str(tmp_path / "nope.json"))
    assert bad.process.wait(20) == 2 and "nope.json" in bad.log()


def test_secured_broker_username_defaults_to_agent_id(secure_mosquitto, tmp_path: Path, agents) -> None:
    coordinator = MqttSettings(broker_url=secure_mosquitto.url, topic_prefix="slb/v1", mqtt_username="coordinator",
                               mqtt_password=secure_mosquitto.users["coordinator"])
    watcher = Watcher(coordinator, "slb/v1")
    agent = start_agent(agents, secure_mosquitto.url, "slb/v1", tmp_path, "--backend", "simulated",
                        "--mqtt-password", secure_mosquitto.users["agent-a"], "--hardware-profile",
                        str(PROFILES / "laptop.json"), agent_id="agent-a")
    try:
        watcher.wait_for(TopicKind.STATUS, "agent-a", lambda s: s.state == "online", timeout=15)
        watcher.wait_for(TopicKind.HARDWARE, "agent-a")  # the ACL let it write its own topics
        assert agent.stop() == 0
        watcher.wait_for(TopicKind.STATUS, "agent-a", lambda s: s.state == "offline")
        wrong = start_agent(agents, secure_mosquitto.url, "slb/v1", tmp_path, "--backend", "simulated",
                            "--mqtt-password", "wrong", "--hardware-profile", str(PROFILES / "laptop.json"),
                            agent_id="agent-b")
        assert wrong.process.wait(20) == 2 and "refused client" in wrong.log()
    finally:
        for topic in (watcher.topics.status("agent-a"), watcher.topics.hardware("agent-a"),
                      watcher.topics.model("agent-a")):
            watcher.publish(topic, b"", retain=True)  # leave the shared secure broker clean
        watcher.close()

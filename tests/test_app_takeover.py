"""Two real ``python -m app`` instances on one Mosquitto (issue 16, "Done when"): exactly one publishes
assignments, both answer ``/v1``, and ``kill -9`` of the leader makes the other lead within 2 × keepalive with no
assignment change, while the survivor keeps answering. The killed one, started again, answers at once and stands
by. tests/test_leadership.py covers the lease itself with two console coordinators; bench/bench_takeover.py
measures ten kills with the helpers below.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client

from app.cluster_status import leadership_line
from app.markup import markdown_literal
from broker.coordinator.contract import ClusterSnapshot, LeadershipView, QueryFailed, QueryRequest, QueryStarted
from broker.coordinator.runtime import Coordinator
from broker.mqtt.local_broker import RunningBroker
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage, LeaderRecord
from tests.app_support import GPU_DESKTOP, RASPBERRY_PI, RunningApp, start_agent, start_app, wait_for_app
from tests.support.processes import AgentProcess, wait_until
from tests.test_coordinator_units import offline_coordinator, ready_agent
from tests.test_leadership import Watcher

KEEPALIVE = 2
"""MQTT keepalive of both instances (s): the takeover must come within twice this."""
CLAIM_WINDOW_S = 0.3
AGENTS = ("desk", "pi")
NAMES = ("app-a", "app-b")


def start_instance(name: str, folder: Path, broker: RunningBroker, prefix: str,
                   extra: list[str] | None = None) -> RunningApp:
    """One ``python -m app`` named ``name`` (its coordinator id: the stem of its instance id), own data dir and
    port; no embedding warm-up (no test here searches documents)."""
    return start_app(folder / name, broker, topic_prefix=prefix, extra=[
        "--coordinator-id", name, "--mqtt-keepalive", str(KEEPALIVE), "--leader-claim-window-s",
        str(CLAIM_WINDOW_S), "--no-rag-warm-up", *(extra or [])])


def start_agents(running: RunningApp, folder: Path) -> list[AgentProcess]:
    """Two simulated agents (a GPU desktop and a Raspberry Pi), so placement gives them different models."""
    options = ["--sim-tokens-per-s", "400", "--sim-ttft-ms", "20", "--sim-pull-s", "0.2"]
    return [start_agent(running, folder, agent_id, backend="simulated", profile=profile, extra=options)
            for agent_id, profile in zip(AGENTS, (GPU_DESKTOP, RASPBERRY_PI), strict=True)]


def ask(running: RunningApp, text: str, *, stream: bool = False, timeout: float = 30.0) -> str | None:
    """One ``/v1/chat/completions``: None when it was answered, else the error as the client saw it."""
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "stream": stream}
    url = f"{running.url}/v1/chat/completions"
    try:
        if not stream:
            response = httpx.post(url, json=body, headers=running.headers, timeout=timeout)
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:300]}"
            return None if response.json()["choices"][0]["message"]["content"] else "an empty answer"
        with httpx.stream("POST", url, json=body, headers=running.headers, timeout=timeout) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}"
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"the stream ended without [DONE]: {events[-3:]}"
        chunks = [json.loads(event) for event in events[:-1]]
        errors = [chunk["error"] for chunk in chunks if "error" in chunk]
        if errors:
            return f"stream error: {errors[0]}"
        text_out = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
        return None if text_out else "an empty streamed answer"
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return f"{type(error).__name__}: {error}"


@dataclass
class Feeder:
    """Sends queries to one instance back to back from a thread (every other one streamed) and records each:
    (sent at, seconds to the answer, None when answered or the error)."""

    running: RunningApp
    label: str
    outcomes: list[tuple[float, float, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Feeder:
        def feed() -> None:
            index = 0
            while not self._stop.is_set():
                at = time.monotonic()
                error = ask(self.running, f"{self.label} question {index}", stream=index % 2 == 1)
                self.outcomes.append((at, time.monotonic() - at, error))
                index += 1

        self._thread = threading.Thread(target=feed, daemon=True, name=f"feeder-{self.label}")
        self._thread.start()
        return self

    def stop(self) -> tuple[int, list[str]]:
        """Stop after the query in flight; returns (queries sent, errors of those that failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        return len(self.outcomes), [error for *_, error in self.outcomes if error is not None]


def leadership(running: RunningApp) -> dict[str, Any]:
    """The instance's own view of who leads placement (``/status``)."""
    return running.status()["leadership"]


def leads(watcher: Watcher, name: str) -> LeaderRecord | None:
    """The retained leader record, when it is ``name``'s."""
    record = watcher.current_leader()
    return record if record is not None and record.state == "leader" and \
        record.coordinator_id.startswith(name + ".") else None


def assignments(watcher: Watcher, since: float = 0.0) -> list[tuple[str, str, str, int]]:
    """Every assignment seen since ``since``: (agent, model, assignment id, epoch)."""
    with watcher.lock:
        return [(agent, assign.model, assign.assignment_id, assign.epoch)
                for at, agent, assign in watcher.assigns if at >= since]


def ready_models(watcher: Watcher) -> dict[str, tuple[str | None, str | None]]:
    """Each agent's latest model state, when ready with an assignment: (model, assignment id)."""
    latest = {}
    with watcher.lock:
        for _, agent, state in watcher.models:
            latest[agent] = state
    return {agent: (state.model, state.assignment_id) for agent, state in latest.items()
            if state.state == "ready" and state.assignment_id}


def placed_by(running: RunningApp) -> int:
    """How many assignments this instance's log says it made (the coordinator logs ``assign AGENT → MODEL``)."""
    return len(re.findall(r"assign \S+ → ", running.app.log(None)))


# ---------------------------------------------------------------- a front end that has just connected


async def just_connected(state_wait_s: float) -> Coordinator:
    coordinator, _ = await offline_coordinator(state_wait_s=state_wait_s)
    coordinator._on_connected()  # what the MQTT connection calls once it has subscribed
    return coordinator


async def test_a_front_end_that_has_just_connected_waits_for_the_agents_state_instead_of_failing() -> None:
    coordinator = await just_connected(2.0)
    started = time.monotonic()
    stream = coordinator.query(QueryRequest(messages=[ChatMessage(role="user", content="hi")]))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)
    assert not first.done()  # no agent known yet: it waits, it does not fail
    ready_agent(coordinator, "a", 50)  # the retained state arrives
    event = await asyncio.wait_for(first, 2)
    assert isinstance(event, QueryStarted) and event.agents == ["a"] and time.monotonic() - started < 1.5
    await stream.aclose()


async def test_the_wait_for_state_is_bounded_and_ends_in_the_usual_clear_error() -> None:
    coordinator = await just_connected(0.4)
    started = time.monotonic()
    events = [event async for event in coordinator.query(QueryRequest(
        messages=[ChatMessage(role="user", content="hi")]))]
    assert isinstance(events[-1], QueryFailed) and events[-1].code == "no_agent"
    assert "no agent is online" in events[-1].error
    assert 0.3 <= time.monotonic() - started < 1.5  # the window, not the 30 s admission wait
    coordinator._on_disconnected()  # cut off: nothing to wait for
    started = time.monotonic()
    events = [event async for event in coordinator.query(QueryRequest(
        messages=[ChatMessage(role="user", content="hi")]))]
    assert isinstance(events[-1], QueryFailed) and time.monotonic() - started < 0.3


def test_the_cluster_tab_says_which_instance_leads() -> None:
    def line(leader_id: str | None, leading: bool) -> str:
        view = LeadershipView(instance_id="app-a.1", leader_id=leader_id, leading=leading, epoch=7)
        snapshot = ClusterSnapshot(agents=[], ready_models=[], connected=True, generated_at=0.0, leadership=view)
        return leadership_line(snapshot, markdown_literal)

    assert line("app-a.1", True) == "placement: this instance leads"
    assert line("app-b.2", False) == "placement: standing by, led by " + markdown_literal("app-b.2")
    assert line(None, False) == "placement: no leader yet (standing by)"
    assert line("**b**", False).endswith(markdown_literal("**b**"))  # an instance id is data, not markup
    assert leadership_line(ClusterSnapshot(agents=[], ready_models=[], connected=True, generated_at=0.0)) == ""


# ---------------------------------------------------------------- two real apps


@pytest.mark.slow
def test_two_apps_one_leads_both_answer_and_the_survivor_takes_over_a_kill_9(mosquitto: RunningBroker,
                                                                             topic_prefix: str, postgres_url: str,
                                                                             tmp_path: Path) -> None:
    """Both instances keep their chats in one PostgreSQL database (``--database-url``), as several front ends
    must: a chat started on the leader is listed and continued on the survivor after the leader's kill -9."""
    watcher = Watcher(MqttSettings(broker_url=mosquitto.url, topic_prefix=topic_prefix))
    shared = ["--database-url", postgres_url]
    with ThreadPoolExecutor(2) as pool:
        apps = dict(zip(NAMES, pool.map(lambda name: start_instance(name, tmp_path, mosquitto, topic_prefix, shared),
                                        NAMES), strict=True))
    agents = start_agents(apps["app-a"], tmp_path)

    def describe() -> str:
        return "\n".join(running.logs() for running in apps.values())

    try:
        wait_until(lambda: set(ready_models(watcher)) == set(AGENTS), 60, "both agents ready with an assignment",
                   describe=describe)
        record = watcher.current_leader()
        assert record is not None and record.state == "leader"
        leader_name = record.coordinator_id.split(".")[0]
        survivor_name = next(name for name in NAMES if name != leader_name)
        leader, survivor = apps[leader_name], apps[survivor_name]
        # Exactly one publishes assignments: all carry the leader's epoch, and only the leader's log placed any.
        assert {epoch for *_, epoch in assignments(watcher)} == {record.epoch}
        assert placed_by(leader) >= len(AGENTS) and placed_by(survivor) == 0, describe()
        # Both say who leads (the cluster tab's summary line is built from the same view; /status may be up to
        # --cluster-refresh-s old).
        views = {name: wait_for_app(lambda running=running: (view := leadership(running))["leader_id"] and view,
                                    10, "a leader in /status", running) for name, running in apps.items()}
        assert {view["leader_id"] for view in views.values()} == {record.coordinator_id}
        assert views[leader_name]["leading"] and not views[survivor_name]["leading"]
        assert (views[leader_name]["instance_id"], views[leader_name]["epoch"]) == (record.coordinator_id, record.epoch)
        # Both answer /v1, streamed and not.
        for running in apps.values():
            assert ask(running, "hello") is None and ask(running, "hello, streamed", stream=True) is None
        before = ready_models(watcher)
        # A chat started on the leader is the survivor's too.
        chat = Client(leader.url, verbose=False).predict("remember the number 42", "", "", "", False,
                                                         api_name="/chat")
        assert chat["done"] and chat["status"] == "ok", chat
        survivor_client = Client(survivor.url, verbose=False)
        assert chat["session_id"] in [item["id"] for item in survivor_client.predict(api_name="/sessions_list")]
        assert len(survivor_client.predict(chat["session_id"], api_name="/session_history")) == 2

        feeder = Feeder(survivor, "takeover").start()
        wait_until(lambda: len(feeder.outcomes) >= 2, 15, "the survivor answering the feeder", describe=describe)
        killed_at = leader.app.kill()
        new_record = wait_until(lambda: leads(watcher, survivor_name), 2 * KEEPALIVE + 4, "the survivor to lead",
                                describe=describe)
        with watcher.lock:
            took_over_at = next(at for at, seen in watcher.leaders if seen == new_record)
        assert took_over_at - killed_at < 2 * KEEPALIVE, f"takeover took {took_over_at - killed_at:.2f} s"
        assert new_record.epoch > record.epoch
        time.sleep(1.0)  # past the new leader's debounced re-plan, still feeding
        sent, errors = feeder.stop()
        during = sum(1 for at, *_ in feeder.outcomes if at >= killed_at)
        assert during >= 1 and not errors, f"{len(errors)} of {sent} queries failed: {errors[:3]}"
        # No assignment change for agents whose model stays: the same ids again, under the new epoch only.
        after = assignments(watcher, killed_at)
        assert after, "the new leader re-stamps the current assignments with its epoch"
        for agent, model, assignment_id, epoch in after:
            assert (model, assignment_id) == before[agent] and epoch == new_record.epoch
        assert ready_models(watcher) == before
        view = wait_for_app(lambda: (seen := leadership(survivor))["leading"] and seen, 5,
                            "the survivor's /status to say it leads", survivor)
        assert view["leader_id"] == new_record.coordinator_id == view["instance_id"]
        # The chat outlives the instance it was started on.
        follow_up = survivor_client.predict("and the number again?", chat["session_id"], "", "", False,
                                            api_name="/chat")
        assert follow_up["done"] and follow_up["status"] == "ok" and follow_up["session_id"] == chat["session_id"]
        history = survivor_client.predict(chat["session_id"], api_name="/session_history")
        assert [message["content"] for message in history[::2]] == ["remember the number 42", "and the number again?"]

        # The killed one comes back: it answers as soon as it is up (it waits for the cluster's retained state
        # rather than failing), then stands by and assigns nothing.
        restarted_at = time.monotonic()
        leader.app.log_path.rename(leader.app.log_path.with_suffix(".killed.log"))  # the restart writes app.log
        apps[leader_name] = restarted = start_instance(leader_name, tmp_path, mosquitto, topic_prefix)
        assert ask(restarted, "hello from a fresh front end") is None
        assert ask(restarted, "hello from a fresh front end, streamed", stream=True) is None
        wait_until(lambda: "standing by:" in restarted.app.log(None), 10, "the restarted one to stand by",
                   describe=describe)
        view = wait_for_app(lambda: (seen := leadership(restarted))["leader_id"] and seen, 10,
                            "the restarted one to know the leader", restarted)
        assert not view["leading"] and view["leader_id"] == new_record.coordinator_id
        time.sleep(2 * CLAIM_WINDOW_S + 0.6)  # past its listening window and a re-plan debounce
        assert placed_by(restarted) == 0, describe()
        assert {epoch for *_, epoch in assignments(watcher, restarted_at)} <= {new_record.epoch}
        assert leads(watcher, survivor_name) == new_record and ready_models(watcher) == before
    finally:
        for running in apps.values():
            running.app.stop(timeout=5)
        for agent in agents:
            agent.stop(timeout=5)
        watcher.close()

"""Issue 12 through the real Mosquitto and real agent processes on the Ollama double (Ollama and OpenAI APIs).

* a runtime that cannot pull (an OpenAI-compatible server) is assigned one of its own models, and answers ``auto``
  and its own model id; an Ollama agent's other local models are servable too;
* a pull through ``Coordinator.manage`` streams the agent's progress and the model becomes servable;
* killing the answering agent, when the next runtime is not known to continue a prefill, restarts the answer with
  an ``AnswerRestarted`` event and finishes with exactly the new answer — never two answers spliced.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.coordinator.contract import (
    AnswerRestarted,
    ManageFinished,
    ManageProgress,
    ManageStarted,
    QueryEvent,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage
from broker.scheduling.names import model_key
from tests.ollama_double import OllamaDouble, reply_text
from tests.support.processes import REPO, AgentProcess, spawn
from tests.support.processes import wait_until_async as wait_until

pytestmark = pytest.mark.slow

PROFILES = REPO / "agent" / "profiles"


@pytest.fixture()
def doubles() -> Iterator[Callable[..., OllamaDouble]]:
    started: list[OllamaDouble] = []

    def factory(models: list[str], **config: Any) -> OllamaDouble:
        double = OllamaDouble(models=models, **config)
        double.__enter__()
        started.append(double)
        return double

    yield factory
    for double in started:
        double.__exit__(None, None, None)


@pytest.fixture()
def agents(mqtt_settings: MqttSettings, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def factory(agent_id: str, backend: str, url: str, *extra: str) -> AgentProcess:
        command = [
            "-m", "agent", "--broker-url", mqtt_settings.broker_url, "--topic-prefix", mqtt_settings.topic_prefix,
            "--agent-id", agent_id, "--data-dir", str(tmp_path / agent_id), "--backend", backend,
            "--backend-url", url, "--hardware-profile", str(PROFILES / "laptop.json"),
            "--telemetry-interval-s", "0.5", "--backend-check-interval-s", "1", "--benchmark-tokens", "2",
            "--log-level", "INFO", *extra,
        ]
        handle = spawn(agent_id, command, tmp_path, new_session=True, kind=AgentProcess)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.stop(timeout=5)


@pytest.fixture()
async def coordinator(mqtt_settings: MqttSettings) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(CoordinatorSettings(
        broker_url=mqtt_settings.broker_url, topic_prefix=mqtt_settings.topic_prefix, data_dir=mqtt_settings.data_dir,
        replan_debounce_s=0.3, placement_mix=False, stall_first_token_s=6.0, stall_between_chunks_s=3.0,
        admission_wait_s=10.0, expected_output_tokens=40))
    await coordinator.start()
    assert await coordinator.wait_connected(10)
    yield coordinator
    await coordinator.stop()


def ask(text: str, mode: str = "auto", **kwargs: Any) -> QueryRequest:
    return QueryRequest(messages=[ChatMessage(role="user", content=text)], mode=mode, **kwargs)


async def collect(coordinator: Coordinator, request: QueryRequest) -> list[QueryEvent]:
    return [event async for event in coordinator.query(request)]


def agent_view(coordinator: Coordinator, agent_id: str) -> Any:
    return next((agent for agent in coordinator.snapshot().agents if agent.id == agent_id), None)


def describe(coordinator: Coordinator) -> Callable[[], str]:
    def text() -> str:
        agents = [(a.id, a.online, a.model, a.model_state, a.model_error, a.runtime.get("kind"), a.available_models)
                  for a in coordinator.snapshot().agents]
        plan = coordinator.plan()
        return f"agents {agents}; plan {[(e.agent_id, e.target_model, e.reason) for e in plan.entries]} " \
               f"excluded {plan.excluded}"
    return text


def ready(coordinator: Coordinator, agent_id: str) -> bool:
    view = agent_view(coordinator, agent_id)
    return view is not None and view.online and view.model_state == "ready" and bool(view.runtime)


async def test_a_runtime_that_cannot_pull_serves_its_own_model_and_every_local_model_is_servable(
        doubles, agents, coordinator) -> None:
    ollama = doubles(["llama3.2:3b", "qwen2.5:0.5b"], tokens_per_s=200)
    openai_server = doubles(["smollm2"], tokens_per_s=200)
    agents("ollama-a", "ollama", ollama.url)
    agents("openai-b", "openai", f"{openai_server.url}/v1")
    await wait_until(lambda: ready(coordinator, "ollama-a") and ready(coordinator, "openai-b"), 60,
                     "both agents ready with a runtime profile", describe(coordinator))
    openai_view = agent_view(coordinator, "openai-b")
    # The double lists "smollm2:latest" (Ollama's spelling): the agent is assigned its own model in its own spelling.
    assert openai_view.model == "smollm2:latest" and not openai_view.can_pull
    entry = next(entry for entry in coordinator.plan().entries if entry.agent_id == "openai-b")
    assert entry.local_only and "cannot pull" in entry.reason
    assert agent_view(coordinator, "ollama-a").model == "llama3.2:3b"
    await wait_until(lambda: {"llama3.2:3b", "qwen2.5:0.5b", "smollm2"} <= {
        model_key(name) for name in coordinator.model_names()}, 10, "every local model servable")
    holders = {model_key(model.name): [(h.agent_id, h.state) for h in model.holders] for model in coordinator.models()}
    assert holders["smollm2"] == [("openai-b", "ready")]
    assert holders["qwen2.5:0.5b"] == [("ollama-a", "local")]

    own = await collect(coordinator, ask("the runtime's own model id", "smollm2"))
    assert isinstance(own[-1], QueryFinished) and own[-1].agents == ["openai-b"]
    assert own[-1].text == reply_text("the runtime's own model id")
    assert own[-1].stats is not None and own[-1].stats.finish_reason == "stop"
    local = await collect(coordinator, ask("a model nobody was assigned", "qwen2.5:0.5b"))
    assert isinstance(local[-1], QueryFinished) and local[-1].agents == ["ollama-a"]
    assert local[-1].models == ["qwen2.5:0.5b"] and local[-1].text == reply_text("a model nobody was assigned")
    capped = await collect(coordinator, ask("one two three four five six", "llama3.2:3b", options={"num_predict": 3}))
    assert isinstance(capped[-1], QueryFinished) and capped[-1].stats is not None
    assert capped[-1].stats.finish_reason == "length"  # the runtime's own reason, not "stop"


async def test_pull_through_the_cluster_streams_progress_and_the_model_becomes_servable(
        doubles, agents, coordinator) -> None:
    ollama = doubles(["llama3.2:3b"], tokens_per_s=200, pull_bytes_per_s=50_000_000)
    agents("ollama-a", "ollama", ollama.url)
    await wait_until(lambda: ready(coordinator, "ollama-a"), 60, "the agent ready")
    events = [event async for event in coordinator.manage("pull", "qwen2.5:0.5b")]
    started, final = events[0], events[-1]
    assert isinstance(started, ManageStarted) and started.agents == ["ollama-a"]
    progress = [event for event in events if isinstance(event, ManageProgress)]
    assert progress and progress[-1].operation.done
    assert any(event.operation.total_bytes for event in progress)
    assert isinstance(final, ManageFinished) and final.ok, final
    await wait_until(lambda: "qwen2.5:0.5b" in coordinator.model_names(), 10, "the pulled model servable")
    answered = await collect(coordinator, ask("freshly pulled", "qwen2.5:0.5b"))
    assert isinstance(answered[-1], QueryFinished) and answered[-1].text == reply_text("freshly pulled")


async def test_failover_without_prefill_continuation_restarts_instead_of_splicing(
        doubles, agents, coordinator) -> None:
    slow = {"tokens_per_s": 20, "reply_tokens": 60}
    handles = {name: agents(name, "ollama", doubles(["llama3.2:3b"], **slow).url, "--no-probe-runtime")
               for name in ("plain-a", "plain-b")}
    await wait_until(lambda: ready(coordinator, "plain-a") and ready(coordinator, "plain-b"), 60, "both ready")
    assert agent_view(coordinator, "plain-a").continues_prefill is False  # not probed: never trusted to continue
    request = ask("tell me a long story about failover please")
    stream = coordinator.query(request)
    seen: list[QueryEvent] = []
    async for event in stream:
        seen.append(event)
        if sum(1 for e in seen if isinstance(e, TextDelta)) >= 10:
            break
    serving = seen[0].agents[0]  # type: ignore[union-attr]
    assert isinstance(seen[0], QueryStarted)
    handles[serving].signal(signal.SIGKILL)
    seen += [event async for event in stream]
    restarts = [event for event in seen if isinstance(event, AnswerRestarted)]
    assert len(restarts) == 1 and restarts[0].from_agent == serving and restarts[0].discarded_chars > 0
    after = seen[seen.index(restarts[0]) + 1:]
    final = seen[-1]
    assert isinstance(final, QueryFinished) and final.failovers == 1
    expected = reply_text("tell me a long story about failover please", 60)
    assert final.text == expected == "".join(e.text for e in after if isinstance(e, TextDelta))

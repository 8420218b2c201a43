"""The cluster on a REAL runtime: llama-cpp-python's server on its default settings serving SmolLM2-135M.

Everything runs for real: Mosquitto, ``python -m app`` (coordinator inside), ``python -m agent --backend openai``
and ``python -m llama_cpp.server`` with its defaults — one slot, and any request to ``/v1/*`` interrupts a
running answer, which then ends with ``data: [DONE]`` and no finish reason. No catalog file is given: the cluster
must serve what the runtime has. At temperature 0 the runtime's answer is a function of the request (two server
processes give the same text), so "exactly the runtime's answer" is checked by asking the runtime directly
first and the cluster afterwards.

What a CPU box cannot show (GPUs, pulls, several slots) stays with the Ollama double (tests/test_ollama_double.py).
SmolLM2-135M runs at ~60 tokens/s on 2 cores; the whole file takes about 2 minutes on an idle 2-core machine
(3.5 with the machine's cores busy with other work).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.app_support import ARTIFACTS, RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble
from tests.support.llama_runtime import MODEL_ALIAS, LlamaServer, start_llama_server
from tests.support.openai_chat import ChatAnswer, ask, chat_body

pytestmark = pytest.mark.slow

CPU_BOX = {
    "description": "2-core test box", "cpu_brand": "test CPU", "cpu_physical_cores": 2, "cpu_logical_cores": 2,
    "cpu_max_ghz": 3.0, "ram_total_gb": 8, "os": "Linux", "arch": "x86_64", "gpus": [],
}
FIRST_AGENT = "llama-a"
SECOND_AGENT = "llama-b"
AGENT_FLAGS = ["--telemetry-interval-s", "1"]
"""Telemetry every second (production: 2 s): two runtimes and seven agents share 2 cores here, and the
coordinator expires an agent after a few silent intervals."""

SHORT_PROMPTS = [  # 11 end on their own ("stop"), 5 reach max_tokens 48 ("length") with SmolLM2-135M Q4_1
    "What is 2+2? Reply with just the number.", "Say hello.", "Name one color.", "What is the capital of France?",
    "Write a haiku about the sea.", "Explain MQTT in one sentence.", "List three fruits.",
    "Tell me a story about a cat.", "Is the sun a star? Answer yes or no.", "Translate 'good morning' to French.",
    "What is Python?", "Give me a synonym for happy.", "Count to five.", "Describe a tree.",
    "What day comes after Monday?", "Write one sentence about rain.",
]
LONG_PROMPTS = ["Tell me a story about a cat.", "Explain how computers work.", "What is Python?",
                "Write an essay about the ocean."]  # each reaches max_tokens 200 ("length")
LONG_TOKENS = 200


@dataclass
class RealCluster:
    app: RunningApp
    runtime: LlamaServer
    folder: Path

    def agent(self, agent_id: str) -> dict[str, Any]:
        return next((agent for agent in self.app.status()["agents"] if agent["id"] == agent_id), {})

    def wait_serving(self, agent_id: str, model: str = MODEL_ALIAS, timeout: float = 90) -> None:
        """Until the agent is online with its runtime reachable and reports ``model`` among its local models."""
        def serving() -> bool:
            agent = self.agent(agent_id)
            return bool(agent.get("online") and agent.get("backend_reachable")
                        and model in agent.get("local_models", []))

        wait_for_app(serving, timeout, f"{agent_id} online with {model}", self.app)


def direct(runtime: LlamaServer, body: dict[str, Any]) -> ChatAnswer:
    """The runtime's own answer, the reference: asked again when something else cut it short meanwhile.

    Any request to the runtime's /v1 ends a running answer without a finish reason, so a reference taken while
    an agent touches the runtime may be cut; that is the subject of
    :func:`test_an_idle_agent_never_interrupts_other_users_of_its_runtime`, not of the comparisons.
    """
    with httpx.Client() as client:
        for _ in range(3):
            answer = ask(client, runtime.url, body)
            assert answer.status == 200 and answer.error is None, answer.brief()
            if answer.finish_reason is not None:
                return answer
    raise AssertionError(f"the runtime's own answer was cut short three times: {answer.brief()}")


def through(app: RunningApp, body: dict[str, Any], **kwargs: Any) -> ChatAnswer:
    with httpx.Client(headers=app.headers) as client:
        return ask(client, f"{app.url}/v1", body, **kwargs)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = start_llama_server(tmp_path_factory.mktemp("llama-a"), name="llama-server-a")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(mosquitto: RunningBroker, runtime: LlamaServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """The app (no catalog file) and one agent on the real runtime."""
    folder = tmp_path_factory.mktemp("real-cluster")
    app = start_app(folder, mosquitto, topic_prefix=f"slbtest/real{uuid.uuid4().hex[:8]}/v1",
                    extra=["--no-rag-warm-up"])
    real = RealCluster(app, runtime, folder)
    try:
        start_agent(app, folder, FIRST_AGENT, backend="openai", backend_url=runtime.url, profile=CPU_BOX,
                    extra=AGENT_FLAGS)
        real.wait_serving(FIRST_AGENT)
        yield real
    finally:
        app.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "real_runtime_cluster.log").write_text(f"{app.logs()}\n--- runtime\n{runtime.child.log()}")


# ---------------------------------------------------------------- a. the runtime's model is served, no catalog


@pytest.mark.timeout(120)
def test_the_runtimes_own_model_is_listed_and_answers(cluster: RealCluster) -> None:
    app = cluster.app

    def listed() -> list[str]:
        ids = [model["id"] for model in httpx.get(f"{app.url}/v1/models", headers=app.headers).json()["data"]]
        return ids if MODEL_ALIAS in ids else []

    wait_for_app(listed, 60, f"{MODEL_ALIAS} in /v1/models", app)
    tags = [model["name"] for model in httpx.get(f"{app.url}/api/tags", headers=app.headers).json()["models"]]
    assert {MODEL_ALIAS, f"{MODEL_ALIAS}:latest"} & set(tags), tags
    for model in (MODEL_ALIAS, "auto"):
        expected = direct(cluster.runtime, chat_body(MODEL_ALIAS, "Say hello.", max_tokens=16))
        answer = through(app, chat_body(model, "Say hello.", max_tokens=16))
        assert answer.status == 200 and answer.error is None, f"model={model}: {answer.brief()}"
        assert answer.text == expected.text, f"model={model}"
        assert answer.slb is not None and answer.slb.get("agents") == [FIRST_AGENT], answer.slb


# ---------------------------------------------------------------- b. exactly the runtime's answer


@pytest.mark.timeout(180)
def test_sixteen_answers_identical_to_the_runtimes_own(cluster: RealCluster) -> None:
    expected = [direct(cluster.runtime, chat_body(MODEL_ALIAS, prompt, max_tokens=48)) for prompt in SHORT_PROMPTS]
    assert {answer.finish_reason for answer in expected} == {"stop", "length"}  # the mix this test is about
    problems = []
    for index, (prompt, want) in enumerate(zip(SHORT_PROMPTS, expected, strict=True)):
        stream = index % 2 == 1  # half streamed (the runtime sends no usage then: the agent counts)
        got = through(cluster.app, chat_body(MODEL_ALIAS, prompt, max_tokens=48, stream=stream))
        wanted = (want.text, want.finish_reason, want.completion_tokens)
        if got.error is not None or (got.text, got.finish_reason, got.completion_tokens) != wanted:
            problems.append(f"{prompt!r} (stream={stream}): got {got.brief()}; runtime said finish="
                            f"{want.finish_reason} tokens={want.completion_tokens} text={want.text[:80]!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_ollama_api_passes_done_reason_and_counts(cluster: RealCluster) -> None:
    app = cluster.app
    for prompt in ("Describe a tree.", "Say hello."):  # one "length", one "stop"
        want = direct(cluster.runtime, chat_body(MODEL_ALIAS, prompt, max_tokens=48))
        reply = httpx.post(f"{app.url}/api/chat", headers=app.headers, timeout=60, json={
            "model": MODEL_ALIAS, "stream": False, "messages": [{"role": "user", "content": prompt}],
            "options": {"temperature": 0, "num_predict": 48}})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["message"]["content"] == want.text
        assert body["done_reason"] == want.finish_reason and body["eval_count"] == want.completion_tokens, body


# ---------------------------------------------------------------- c. more jobs than the runtime's one slot


@pytest.mark.timeout(180)
def test_four_concurrent_long_answers_on_one_slot_all_complete(cluster: RealCluster) -> None:
    bodies = [chat_body(MODEL_ALIAS, prompt, max_tokens=LONG_TOKENS, stream=index % 2 == 0)
              for index, prompt in enumerate(LONG_PROMPTS)]
    expected = [direct(cluster.runtime, {**body, "stream": False, "stream_options": None}) for body in bodies]
    assert all(answer.finish_reason == "length" for answer in expected), [a.brief() for a in expected]
    answers: dict[int, ChatAnswer] = {}

    def run(index: int) -> None:
        answers[index] = through(cluster.app, bodies[index], timeout=150)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(160)
    problems = []
    for index, want in enumerate(expected):
        got = answers.get(index)
        if got is None:
            problems.append(f"{LONG_PROMPTS[index]!r}: no answer")
        elif got.error is not None or got.finish_reason != "length" or got.text != want.text \
                or got.completion_tokens != LONG_TOKENS:
            problems.append(f"{LONG_PROMPTS[index]!r}: {got.brief()} (wanted {len(want.text)} characters)")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- e. what the agent learned about its runtime


def measured_profile(cluster: RealCluster, agent_id: str = FIRST_AGENT) -> dict[str, Any]:
    """The agent's runtime profile once its warm-up probes are done (first published with the detected kind only)."""
    def measured() -> dict[str, Any] | None:
        runtime = cluster.agent(agent_id).get("runtime") or {}
        probed = runtime.get("continues_prefill") is not None and runtime.get("interrupts_running") is not None
        return runtime if probed else None

    return wait_for_app(measured, 90, f"{agent_id}'s measured runtime profile", cluster.app)


@pytest.mark.timeout(120)
def test_runtime_profile_is_published(cluster: RealCluster) -> None:
    runtime = measured_profile(cluster)
    assert runtime["kind"] == "llama-cpp-python", runtime
    assert runtime["slots"] == 1 and runtime["continues_prefill"] is False, runtime
    assert runtime["interrupts_running"] is True, runtime
    assert "openapi.json" in (runtime.get("health_check") or ""), runtime  # never GET /v1/models: it interrupts
    assert cluster.agent(FIRST_AGENT)["max_parallel"] == 1


@pytest.mark.timeout(90)
def test_an_idle_agent_never_interrupts_other_users_of_its_runtime(cluster: RealCluster) -> None:
    """A runtime is often shared (a chat UI, scripts): the agent's checks must not cut their answers short.

    For ~25 s someone else streams long answers straight from the runtime while the agent idles next to it (its
    warm-up probes done); every one must end with the runtime's own finish reason.
    """
    measured_profile(cluster)
    body = chat_body(MODEL_ALIAS, "Write an essay about the ocean.", max_tokens=LONG_TOKENS, stream=True)
    answers: list[ChatAnswer] = []
    deadline = time.monotonic() + 25
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            answers.append(ask(client, cluster.runtime.url, body))
    cut = [answer.brief() for answer in answers if answer.finish_reason is None or answer.error is not None]
    assert not cut, f"{len(cut)} of {len(answers)} answers of another user were cut short:\n" + "\n".join(cut)


# ---------------------------------------------------------------- d. kill -9 mid-answer, second runtime


@pytest.fixture(scope="module")
def second(cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A second llama-cpp-python runtime with its own agent in the same cluster."""
    server = start_llama_server(tmp_path_factory.mktemp("llama-b"), name="llama-server-b")
    try:
        start_agent(cluster.app, cluster.folder, SECOND_AGENT, backend="openai", backend_url=server.url,
                    profile=CPU_BOX, extra=AGENT_FLAGS)
        cluster.wait_serving(SECOND_AGENT)
        measured_profile(cluster, SECOND_AGENT)  # its probes use the runtime: asking it directly now would cut them
        yield server
    finally:
        agent = cluster.app.agents.pop(SECOND_AGENT, None)
        if agent is not None:
            agent.stop()
        server.stop()


def restart_agent(cluster: RealCluster, agent_id: str, url: str) -> None:
    cluster.app.agents.pop(agent_id).stop()
    start_agent(cluster.app, cluster.folder, agent_id, backend="openai", backend_url=url, profile=CPU_BOX,
                extra=AGENT_FLAGS)
    cluster.wait_serving(agent_id)
    measured_profile(cluster, agent_id)


@pytest.mark.timeout(240)
def test_kill_9_mid_answer_restarts_on_the_other_runtime_without_splicing(cluster: RealCluster,
                                                                         second: LlamaServer) -> None:
    urls = {FIRST_AGENT: cluster.runtime.url, SECOND_AGENT: second.url}
    body = chat_body(MODEL_ALIAS, "Write an essay about the ocean.", max_tokens=LONG_TOKENS, stream=True)
    want = direct(cluster.runtime, {**body, "stream": False, "stream_options": None})
    assert direct(second, {**body, "stream": False, "stream_options": None}).text == want.text  # same on both
    killed: list[str] = []

    def kill_when_flowing(answer: ChatAnswer, response: httpx.Response) -> None:
        if not killed and answer.pieces >= 20:
            victim = response.headers.get("x-slb-agents", "")
            assert victim in urls, f"serving agent unknown: {victim!r}"
            cluster.app.agents[victim].kill()
            killed.append(victim)

    streamed = through(cluster.app, body, timeout=180, on_piece=kill_when_flowing)
    assert killed, f"the answer never reached 20 pieces: {streamed.brief()}"
    assert streamed.error is None, streamed.brief()
    assert streamed.text == want.text, f"not the runtime's answer after the restart: {streamed.brief()}"
    assert len(streamed.restarts) == 1, f"expected one restart signal, got {streamed.restarts}"
    assert streamed.raw_text != want.text  # the first attempt's pieces really came before the restart
    assert streamed.finish_reason == "length" and streamed.completion_tokens == LONG_TOKENS, streamed.brief()
    assert streamed.slb is not None and killed[0] not in (streamed.slb.get("agents") or [])[-1:], streamed.slb

    restart_agent(cluster, killed[0], urls[killed[0]])
    quiet = {**body, "stream": False, "stream_options": None}
    result: dict[str, ChatAnswer] = {}
    asking = threading.Thread(target=lambda: result.setdefault("answer", through(cluster.app, quiet, timeout=180)))
    asking.start()
    victim = wait_for_app(lambda: next((agent_id for agent_id in urls
                                        if cluster.agent(agent_id).get("jobs_running")), None),
                          20, "an agent running the job", cluster.app)
    time.sleep(0.8)  # ~50 tokens into the answer
    cluster.app.agents[victim].kill()
    asking.join(180)
    answer = result.get("answer")
    assert answer is not None, "no answer within 180 s"
    assert answer.error is None, answer.brief()
    assert answer.text == want.text, f"not a complete runtime answer: {answer.brief()}"
    assert answer.finish_reason == "length" and answer.completion_tokens == LONG_TOKENS, answer.brief()
    assert answer.slb is not None and len(answer.slb.get("restarts") or []) == 1, answer.slb  # killed mid-answer
    restart_agent(cluster, victim, urls[victim])


# ---------------------------------------------------------------- f. bad runtime input


CAUSES = {"malformed-sse": "unreadable", "closes-mid-stream": "closed the connection", "http-500": "HTTP 500",
          "no-finish-reason": "truncated"}
"""What the message must say happened, per fault."""


@dataclass
class FaultyRuntime:
    name: str
    double: OllamaDouble
    fault: dict[str, Any]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.double.port}"


@pytest.fixture()
def faulty(cluster: RealCluster) -> Iterator[list[FaultyRuntime]]:
    """OpenAI-compatible runtimes (the double's /v1) that break in each way, each with its own agent and model."""
    faults = [
        ("malformed-sse", {"malformed_after_tokens": 2}),
        ("closes-mid-stream", {"die_after_tokens": 2}),
        ("http-500", {"fail_chat_status": 500}),
        ("no-finish-reason", {"interrupt_after_tokens": 2}),
    ]
    runtimes = [FaultyRuntime(name, OllamaDouble(models=[f"{name}:1b"], tokens_per_s=100).start(), fault)
                for name, fault in faults]
    empty = FaultyRuntime("lists-nothing", OllamaDouble(models=[]).start(), {})
    try:
        for runtime in [*runtimes, empty]:
            start_agent(cluster.app, cluster.folder, f"faulty-{runtime.name}", backend="openai",
                        backend_url=runtime.double.url + "/v1", profile=CPU_BOX, extra=AGENT_FLAGS)
        yield [*runtimes, empty]
    finally:
        for runtime in [*runtimes, empty]:
            agent = cluster.app.agents.pop(f"faulty-{runtime.name}", None)
            if agent is not None:
                agent.stop()
            runtime.double.stop()


def texts_of(value: Any, key: str = "") -> list[str]:
    """Every error/message string in an agent's status entry (where a runtime problem is shown)."""
    if isinstance(value, dict):
        return [text for name, item in value.items() for text in texts_of(item, name)]
    if isinstance(value, list):
        return [text for item in value for text in texts_of(item, key)]
    if isinstance(value, str) and any(word in key for word in ("error", "message", "note")):
        return [value]
    return []


@pytest.mark.timeout(180)
def test_bad_runtime_input_gives_a_coded_error_naming_the_runtime(cluster: RealCluster,
                                                                  faulty: list[FaultyRuntime]) -> None:
    *breaking, empty = faulty
    for runtime in breaking:
        cluster.wait_serving(f"faulty-{runtime.name}", f"{runtime.name}:1b")
        measured_profile(cluster, f"faulty-{runtime.name}")  # probed before the faults start
    problems = []
    for runtime in breaking:
        cause = CAUSES[runtime.name]
        for name, value in runtime.fault.items():
            setattr(runtime.double.config, name, value)
        for stream in (False, True):
            started = time.monotonic()
            answer = through(cluster.app, chat_body(f"{runtime.name}:1b", "one two three four five six",
                                                    max_tokens=32, stream=stream), timeout=90)
            took = time.monotonic() - started
            error = answer.error or {}
            message, code = str(error.get("message") or ""), error.get("code")
            if answer.finish_reason in ("stop", "length") and not answer.error:
                problems.append(f"{runtime.name} (stream={stream}): silent success {answer.brief()}")
            elif not code or runtime.address not in message or cause not in message:
                problems.append(f"{runtime.name} (stream={stream}): want a code, {runtime.address} and {cause!r} "
                                f"in the message, got {error}")
            if took > 60:
                problems.append(f"{runtime.name} (stream={stream}): took {took:.0f} s")
    no_models = wait_for_app(
        lambda: [text for text in texts_of(cluster.agent(f"faulty-{empty.name}")) if empty.address in text],
        60, "the agent on a runtime without models to say so, naming it", cluster.app)
    assert no_models, no_models
    assert not problems, "\n".join(problems)

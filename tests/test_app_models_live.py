"""Every model the machines have, the runtime's own finish reason, model management and a restarted answer —
through a running ``python -m app`` with real agents on Mosquitto.

Two runtimes: the Ollama test double behind ``desk`` (Ollama API) and another
double behind ``laptop`` spoken to as an OpenAI-compatible server (``/v1``, the
way llama.cpp, LM Studio and vLLM are). The restart test has its own cluster:
two Ollama agents started with ``--no-probe-runtime`` (so neither may continue a
partial answer), one killed with SIGKILL in the middle of an answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from gradio_client import Client

from broker.mqtt.local_broker import RunningBroker
from broker.scheduling.names import model_key
from tests.app_support import ARTIFACTS, GPU_DESKTOP, RASPBERRY_PI, RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble, reply_text

pytestmark = pytest.mark.slow

DESK, LAPTOP = "desk", "laptop"
REPLY_TOKENS = 60


def models_by_id(app: RunningApp) -> dict[str, dict[str, Any]]:
    """``/v1/models`` by model key (the double calls smollm2 ``smollm2:latest``, as Ollama does)."""
    return {model_key(item["id"]): item for item in httpx.get(f"{app.url}/v1/models", timeout=10).json()["data"]}


def tags(app: RunningApp) -> dict[str, dict[str, Any]]:
    return {model_key(item["name"]): item for item in httpx.get(f"{app.url}/api/tags", timeout=10).json()["models"]}


def loaded(app: RunningApp) -> dict[str, list[str]]:
    return {model_key(item["name"]): item["slb_agents"]
            for item in httpx.get(f"{app.url}/api/ps", timeout=10).json()["models"]}


@pytest.fixture(scope="module")
def live(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """The app, ``desk`` on an Ollama double (llama3.2:1b, qwen2.5:0.5b) and ``laptop`` on an OpenAI-speaking
    double serving ``smollm2``."""
    folder = tmp_path_factory.mktemp("models-live")
    desk_double = OllamaDouble(models=["llama3.2:1b", "qwen2.5:0.5b"], tokens_per_s=400, ttft_s=0.01,
                               num_parallel=2).start()
    laptop_double = OllamaDouble(models=["smollm2"], tokens_per_s=400, ttft_s=0.01, num_parallel=2).start()
    running = start_app(folder, mosquitto, topic_prefix=f"slbtest/models{uuid.uuid4().hex[:8]}/v1")
    running.double = desk_double
    try:
        start_agent(running, folder, DESK, backend="ollama", backend_url=desk_double.url, profile=GPU_DESKTOP)
        start_agent(running, folder, LAPTOP, backend="openai", backend_url=f"{laptop_double.url}/v1",
                    profile=RASPBERRY_PI, extra=["--runtime-kind", "openai"])

        def everything_listed() -> bool:
            """Both assignments ready (while an agent loads its assignment it offers nothing), every model listed."""
            agents = running.status()["agents"]  # /status is rebuilt at most once per refresh: it may lag
            if len(agents) < 2 or any(agent.get("model_state") != "ready" for agent in agents):
                return False
            models = models_by_id(running)
            return all(DESK in models.get(name, {}).get("slb_agents", []) for name in ("llama3.2:1b", "qwen2.5:0.5b")) \
                and models.get("smollm2", {}).get("slb_agents") == [LAPTOP]

        wait_for_app(everything_listed, 90, "both agents' models listed with their machines", running)
        running.laptop_double = laptop_double  # type: ignore[attr-defined]
        yield running
    finally:
        running.stop()
        desk_double.stop()
        laptop_double.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "app_models_live.log").write_text(running.logs())


def test_every_model_of_every_runtime_is_listed_and_answers(live: RunningApp) -> None:
    models = models_by_id(live)
    assert DESK in models["qwen2.5:0.5b"]["slb_agents"] and models["smollm2"]["slb_agents"] == [LAPTOP], \
        (models, live.status())
    listed = tags(live)
    assert listed["smollm2"]["slb_agents"] == [LAPTOP] and DESK in listed["llama3.2:1b"]["slb_agents"]
    scripted = {model_key(item["name"]): item for item in Client(live.url, verbose=False).predict(api_name="/models")}
    assert scripted["smollm2"]["agents"] == [LAPTOP] and scripted["smollm2"]["holders"][0]["state"] in (
        "ready", "loaded", "local")

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=60)
    for model, agent in (("qwen2.5:0.5b", DESK), ("smollm2", LAPTOP), ("SmolLM2:latest", LAPTOP)):
        question = f"which machine has {model}"
        reply = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": question}])
        assert reply.headers["x-slb-agents"] == agent, model
        assert reply.parse().choices[0].message.content == reply_text(question)


def test_finish_reason_and_counts_are_the_runtimes_own(live: RunningApp) -> None:
    laptop_double: OllamaDouble = live.laptop_double  # type: ignore[attr-defined]
    question = [{"role": "user", "content": "count to a hundred slowly please"}]
    direct = openai.OpenAI(base_url=f"{laptop_double.url}/v1", api_key="none", max_retries=0).chat.completions.create(
        model="smollm2", messages=question, max_tokens=3)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=60)
    through = client.chat.completions.create(model="smollm2", messages=question, max_tokens=3)
    assert direct.choices[0].finish_reason == through.choices[0].finish_reason == "length"
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert through.usage is not None and direct.usage is not None
    assert through.usage.completion_tokens == direct.usage.completion_tokens == 3
    streamed = list(client.chat.completions.create(model="smollm2", messages=question, max_tokens=3, stream=True,
                                                   stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason] == ["length"]
    assert next(c.usage for c in streamed if c.usage is not None).completion_tokens == 3
    whole = client.chat.completions.create(model="smollm2", messages=question)
    assert whole.choices[0].finish_reason == "stop" and whole.usage is not None
    assert whole.usage.completion_tokens == len(reply_text(question[0]["content"]).split())

    local = ollama.Client(host=live.url, timeout=60)
    desk_direct = ollama.Client(host=live.double.url).generate(  # type: ignore[union-attr]
        model="qwen2.5:0.5b", prompt="tell me a long story", options={"num_predict": 2})
    generated = local.generate(model="qwen2.5:0.5b", prompt="tell me a long story", options={"num_predict": 2})
    assert (generated.done_reason, generated.eval_count) == ("length", 2) == (desk_direct.done_reason,
                                                                             desk_direct.eval_count)
    assert generated.prompt_eval_count == desk_direct.prompt_eval_count
    parts = list(local.chat(model="qwen2.5:0.5b", messages=question, options={"num_predict": 4}, stream=True))
    assert (parts[-1].done_reason, parts[-1].eval_count) == ("length", 4)


def test_pull_and_delete_through_the_ollama_api(live: RunningApp) -> None:
    client = ollama.Client(host=live.url, timeout=120)
    live.double.config.pull_bytes_per_s = 20_000_000  # type: ignore[union-attr]  # a second: a few progress reports
    try:
        parts = list(client.pull("qwen2.5:1.5b", stream=True))
    finally:
        live.double.config.pull_bytes_per_s = 400_000_000  # type: ignore[union-attr]
    statuses = [part.status for part in parts]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    downloads = [part for part in parts if part.digest]
    assert len(downloads) >= 2 and all(0 <= (part.completed or 0) <= (part.total or 0) for part in downloads)
    assert downloads[-1].completed > downloads[0].completed, "the bar moves"  # type: ignore[operator]
    assert f"pulled on {DESK}" in statuses, "the only machine whose runtime can pull"
    wait_for_app(lambda: DESK in tags(live).get("qwen2.5:1.5b", {}).get("slb_agents", []), 30,
                 "the pulled model listed on desk", live)
    assert client.chat(model="qwen2.5:1.5b", messages=[{"role": "user", "content": "fresh model"}]).message.content \
        == reply_text("fresh model")

    # Out of memory first: a deleted model that is still loaded stays servable (in Ollama too) until unloaded.
    unloaded = httpx.post(f"{live.url}/api/generate", json={"model": "qwen2.5:1.5b", "keep_alive": 0}, timeout=60)
    assert unloaded.json().get("done_reason") == "unload", unloaded.text
    assert "qwen2.5:1.5b" not in live.double.loaded_models()  # type: ignore[union-attr]
    wait_for_app(lambda: "qwen2.5:1.5b" not in loaded(live), 30, "qwen2.5:1.5b out of memory", live)
    assert client.delete("qwen2.5:1.5b").status == "success"
    assert "qwen2.5:1.5b" not in live.double.config.models  # type: ignore[union-attr]
    wait_for_app(lambda: "qwen2.5:1.5b" not in tags(live), 30, "the deleted model gone from /api/tags", live)
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("qwen2.5:1.5b")
    assert missing.value.status_code == 404

    refused = [json.loads(line) for line in httpx.post(
        f"{live.url}/api/pull", json={"model": "qwen2.5:3b", "slb_agents": [LAPTOP]}, timeout=60).text.splitlines()]
    assert "error" in refused[-1] and LAPTOP in refused[-1]["error"], refused
    unknown = [json.loads(line) for line in httpx.post(
        f"{live.url}/api/pull", json={"model": "no-such-model:1b", "slb_agents": [DESK]}, timeout=60).text.splitlines()]
    assert "file does not exist" in unknown[-1]["error"]


def test_ps_reports_what_is_loaded_and_keep_alive_zero_unloads_it(live: RunningApp) -> None:
    client = ollama.Client(host=live.url, timeout=60)
    assert client.generate(model="qwen2.5:0.5b", prompt="").done_reason == "load"
    wait_for_app(lambda: DESK in loaded(live).get("qwen2.5:0.5b", []), 30, "qwen2.5:0.5b loaded on desk", live)
    assert "qwen2.5:0.5b" in live.double.loaded_models()  # type: ignore[union-attr]
    assert {model.model for model in client.ps().models} >= {"qwen2.5:0.5b"}

    unloaded = httpx.post(f"{live.url}/api/generate", json={"model": "qwen2.5:0.5b", "prompt": "", "keep_alive": 0},
                          timeout=60)
    assert unloaded.json()["done_reason"] == "unload"
    assert "qwen2.5:0.5b" not in live.double.loaded_models()  # type: ignore[union-attr]
    wait_for_app(lambda: "qwen2.5:0.5b" not in loaded(live), 30, "qwen2.5:0.5b gone from /api/ps", live)

    refused = httpx.post(f"{live.url}/api/chat", json={"model": "smollm2", "messages": [], "keep_alive": 0},
                         timeout=60)
    if LAPTOP in loaded(live).get("smollm2", []):  # an OpenAI-compatible server cannot unload on request
        assert refused.status_code == 502 and "cannot unload" in refused.json()["error"]
    else:
        assert refused.json()["done_reason"] == "unload"


def test_unserved_ollama_routes_say_what_to_do(live: RunningApp) -> None:
    for path, needle in (("/api/create", "ollama create"), ("/api/copy", "ollama cp"), ("/api/push", "ollama push")):
        response = httpx.post(f"{live.url}{path}", json={"model": "x"}, timeout=10)
        assert response.status_code == 501 and needle in response.json()["error"]
    assert httpx.get(f"{live.url}/api/nothing", timeout=10).json()["error"].startswith("/api/nothing is not part")


# ---------------------------------------------------------------------------- a failover that restarts the answer


@pytest.fixture
def restart_cluster(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """Two Ollama agents that never continue a partial answer (``--no-probe-runtime``), both with qwen2.5:0.5b."""
    folder = tmp_path_factory.mktemp("restart-live")
    doubles = [OllamaDouble(models=["qwen2.5:0.5b"], tokens_per_s=25, ttft_s=0.01, num_parallel=2).start()
               for _ in range(2)]
    for double in doubles:
        double.config.reply_tokens = REPLY_TOKENS  # 2.4 s per answer: the kill lands in the middle of it
    running = start_app(folder, mosquitto, topic_prefix=f"slbtest/restart{uuid.uuid4().hex[:8]}/v1")
    try:
        for name, double in zip(("box-a", "box-b"), doubles, strict=True):
            start_agent(running, folder, name, backend="ollama", backend_url=double.url, profile=GPU_DESKTOP,
                        extra=["--no-probe-runtime"])
        wait_for_app(lambda: len(agents := running.status()["agents"]) == 2  # /status may lag one refresh
                     and all(agent.get("model_state") == "ready" for agent in agents)
                     and set(models_by_id(running).get("qwen2.5:0.5b", {}).get("slb_agents", [])) ==
                     {"box-a", "box-b"}, 90, "both assignments ready, qwen2.5:0.5b on both agents", running)
        yield running
    finally:
        running.stop()
        for double in doubles:
            double.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "app_restart_live.log").write_text(running.logs())


def test_a_killed_agent_restarts_the_answer_and_the_stream_says_so(restart_cluster: RunningApp) -> None:
    question = "tell the whole story of the cluster"
    body = {"model": "qwen2.5:0.5b", "stream": True, "messages": [{"role": "user", "content": question}]}
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{restart_cluster.url}/v1/chat/completions", json=body, timeout=120) as response:
        first_agent = response.headers["x-slb-agents"]
        killed = False
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[len("data: "):]))
            pieces = sum(1 for event in events if event.get("choices") and event["choices"][0]["delta"].get("content"))
            if not killed and pieces >= 3:
                restart_cluster.agents[first_agent].kill()
                killed = True
    restarts = [event["slb"] for event in events if event.get("slb", {}).get("event") == "restart"]
    assert len(restarts) == 1, events
    other = ({"box-a", "box-b"} - {first_agent}).pop()
    assert (restarts[0]["from_agent"], restarts[0]["to_agent"]) == (first_agent, other)
    contents = [event["choices"][0]["delta"].get("content") or "" for event in events if event.get("choices")]
    marker_at = contents.index(restarts[0]["marker"])
    assert "".join(contents[marker_at + 1:]) == reply_text(question, REPLY_TOKENS), "the new answer, whole and alone"
    assert restarts[0]["discarded_chars"] == len("".join(contents[:marker_at])) > 0
    final = next(event for event in events if event.get("choices") and event["choices"][0]["finish_reason"])
    assert final["choices"][0]["finish_reason"] == "stop" and final["slb"]["restarts"][0]["to_agent"] == other

"""The HTTP API's promises that a real cluster shows only by chance, played through a scripted coordinator.

The web app is the real one (``create_app`` under uvicorn, real HTTP, the
``openai`` and ``ollama`` SDKs as clients); only the coordinator is scripted
(tests/app_scripted.py), so each test can have a runtime say ``length``, a
failover restart the answer, or a pull succeed on one machine and fail on
another. The same features against real agents and the Ollama double are in
tests/test_app_models_live.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from broker.coordinator.contract import (
    AnswerRestarted,
    LoadedModel,
    ManageEvent,
    ManageFinished,
    ManageProgress,
    ManageStarted,
    ModelAvailability,
    QueryEvent,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.protocol.messages import Operation, ResultStats
from tests.app_scripted import ScriptedCoordinator, ServedApp, agent, answer, holders, pull_events, serve

LLAMA_CPP_URL = "http://10.0.0.5:8080/v1"
STORY_START = ["Once upon", " a time"]
NEW_STORY = ["A new", " story", " begins."]


def scripted_answer(request: QueryRequest) -> list[QueryEvent]:
    """What the scripted cluster answers, chosen by the last user message."""
    question = next(message.content for message in reversed(request.messages) if message.role == "user")
    model = request.mode if request.mode not in ("auto", "quality", "all") else "llama3.2:1b"
    where = "laptop" if model == "smollm2" else "gpu-box"
    if question == "length":
        return answer(request, where, model, ["one", " two", " three"], latency_s=0.2, stats=ResultStats(
            prompt_tokens=7, output_tokens=3, finish_reason="length", tokens_counted_by="runtime",
            tokens_per_s=30.0, ttft_s=0.05))
    if question == "agent counted":
        return answer(request, where, model, ["a", " b", " c", " d"], stats=ResultStats(
            output_tokens=4, tokens_counted_by="agent"))
    if question == "no stats":
        return answer(request, where, model, ["x", " y", " z"])
    if question == "restart":
        request_id = request.request_id
        discarded = "".join(STORY_START)
        return [
            QueryStarted(request_id, ["gpu-box"], ["llama3.2:1b"], request.mode),
            *[TextDelta(request_id, piece, "gpu-box", "llama3.2:1b") for piece in STORY_START],
            AnswerRestarted(request_id, "gpu-box", "laptop", "smollm2",
                            "gpu-box: agent gpu-box went away (telemetry stopped)", len(discarded)),
            *[TextDelta(request_id, piece, "laptop", "smollm2") for piece in NEW_STORY],
            QueryFinished(request_id, "".join(NEW_STORY), ["gpu-box", "laptop"], ["llama3.2:1b", "smollm2"],
                          request.mode, failovers=1, stats=ResultStats(
                              prompt_tokens=5, output_tokens=3, finish_reason="stop", tokens_counted_by="agent")),
        ]
    return answer(request, where, model, ["Echo: ", question], stats=ResultStats(
        prompt_tokens=2, output_tokens=2, finish_reason="stop", tokens_counted_by="runtime"))


def manage_script(action: str, model: str, agents: list[str] | None) -> list[ManageEvent]:
    targets = agents or ["gpu-box"]
    if model == "explode:1b":
        raise RuntimeError("a bug in the coordinator")
    if action == "pull":
        if model == "nowhere:1b":
            return [ManageFinished("op1", "pull", model, {}, error="no online agent's runtime can pull models "
                                                                   "(only Ollama can)")]
        fail = {"pi": "pull model manifest: file does not exist"} if "pi" in targets else {}
        return pull_events(model, targets, fail=fail)
    if action == "delete" and model == "ghost:1b":
        return [ManageFinished("op1", "delete", model, {}, error=f"no online agent has {model}")]
    error = None
    if model == "smollm2" and action == "unload":
        error = f"the llama-cpp-python runtime at {LLAMA_CPP_URL} cannot unload a model on request: stop the server"
    return [
        ManageStarted("op1", action, model, targets),  # type: ignore[arg-type]
        *[ManageProgress("op1", target, Operation(request_id="w", action=action, model=model,  # type: ignore[arg-type]
                                                  status="failed" if error else "success", done=True, error=error))
          for target in targets],
        ManageFinished("op1", action, model, dict.fromkeys(targets, error)),  # type: ignore[arg-type]
    ]


def cluster() -> ScriptedCoordinator:
    gpu_runtime = {"kind": "ollama", "version": "0.12.3", "slots": 2, "slots_source": "measured",
                   "continues_prefill": True, "detected_by": "GET /api/version", "health_check": "GET /api/version"}
    laptop_runtime = {"kind": "llama-cpp-python", "version": "0.3.36", "slots": 1, "slots_source": "measured",
                      "continues_prefill": False, "interrupts_running": True,
                      "detected_by": "GET /openapi.json", "health_check": "GET /openapi.json while idle"}
    return ScriptedCoordinator(
        agents=[
            agent("gpu-box", model="llama3.2:1b", model_state="ready", backend="ollama",
                  backend_url="http://127.0.0.1:11434", runtime=gpu_runtime, slots=2,
                  loaded_models=["llama3.2:1b"], available_models={"llama3.2:1b": "ready", "qwen2.5:0.5b": "local"}),
            agent("laptop", backend="openai", backend_url=LLAMA_CPP_URL, runtime=laptop_runtime, slots=1,
                  can_pull=False, loaded_models=["smollm2"], available_models={"smollm2": "loaded"}),
            agent("pi", model="qwen2.5:7b", model_state="pulling", model_progress=0.4, backend="ollama"),
        ],
        available=[
            ModelAvailability("llama3.2:1b", holders(("gpu-box", "llama3.2:1b")), parameters_b=1.24,
                              memory_gb=1.3, context_length=131072, family="llama", in_catalog=True),
            ModelAvailability("qwen2.5:0.5b", holders(("gpu-box", "qwen2.5:0.5b"), state="local"),
                              parameters_b=0.5, memory_gb=0.4, context_length=32768, family="qwen2",
                              in_catalog=True),
            ModelAvailability("smollm2", holders(("laptop", "/models/SmolLM2-135M-Instruct-Q4_1.gguf"),
                                                 state="loaded"), parameters_b=0.135),
        ],
        loaded=[
            LoadedModel("gpu-box", "llama3.2:1b", "llama3.2:1b", assigned=True, ready=True, memory_gb=1.3,
                        parameters_b=1.24, context_length=131072),
            LoadedModel("laptop", "/models/SmolLM2-135M-Instruct-Q4_1.gguf", "smollm2", assigned=False,
                        ready=False),
        ],
        script=scripted_answer,
        manage_script=manage_script,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    folder: Path = tmp_path_factory.mktemp("scripted-app")
    with serve(cluster(), folder) as running:
        yield running


@pytest.fixture
def coordinator(served: ServedApp) -> Iterator[ScriptedCoordinator]:
    """The scripted coordinator, restored after each test (tests change its agents and clear its records)."""
    fresh = cluster()
    served.coordinator.__dict__.update(fresh.__dict__)
    yield served.coordinator
    served.coordinator.__dict__.update(cluster().__dict__)


def openai_client(app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="none", max_retries=0, timeout=30)


def ollama_client(app: ServedApp) -> ollama.Client:
    return ollama.Client(host=app.url, timeout=30)


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def ndjson_lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- the runtime's own answer


def test_finish_reason_and_token_counts_are_the_runtimes_own(served: ServedApp,
                                                           coordinator: ScriptedCoordinator) -> None:
    client = openai_client(served)
    completion = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "length"}])
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == \
        (7, 3, 10)
    assert (completion.model_extra or {})["slb"]["tokens_counted_by"] == "runtime"
    chunks = list(client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "length"}],
                                                 stream=True, stream_options={"include_usage": True}))
    reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert reasons == ["length"]
    usage = next(chunk.usage for chunk in chunks if chunk.usage is not None)
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)

    counted = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "agent counted"}])
    assert counted.choices[0].finish_reason == "stop", "a complete answer from a runtime that reports no reason"
    assert counted.usage is not None and counted.usage.completion_tokens == 4
    assert (counted.model_extra or {})["slb"]["tokens_counted_by"] == "agent"
    bare = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "no stats"}])
    assert bare.usage is not None and bare.usage.completion_tokens == 3, "never 0 for a non-empty answer"
    assert (bare.model_extra or {})["slb"]["tokens_counted_by"] == "app"

    local = ollama_client(served)
    chat = local.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "length"}])
    assert (chat.done_reason, chat.prompt_eval_count, chat.eval_count) == ("length", 7, 3)
    parts = list(local.generate(model="llama3.2:1b", prompt="length", stream=True))
    assert "".join(part.response for part in parts) == "one two three"
    assert (parts[-1].done, parts[-1].done_reason, parts[-1].eval_count) == (True, "length", 3)
    generated = local.generate(model="llama3.2:1b", prompt="no stats")
    assert generated.done_reason == "stop" and generated.eval_count == 3


# ---------------------------------------------------------------------------- failover that restarts


def test_a_restarted_answer_is_told_plainly_on_every_api(served: ServedApp,
                                                         coordinator: ScriptedCoordinator) -> None:
    new_answer = "".join(NEW_STORY)
    client = openai_client(served)
    whole = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "restart"}])
    assert whole.choices[0].message.content == new_answer, "only the new answer, never the discarded start"
    restarts = (whole.model_extra or {})["slb"]["restarts"]
    assert [(r["from_agent"], r["to_agent"], r["discarded_chars"]) for r in restarts] == \
        [("gpu-box", "laptop", len("".join(STORY_START)))]

    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "restart"}]}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    events = sse_events(response)
    marked = [event for event in events if "slb" in event and event["slb"].get("event") == "restart"]
    assert len(marked) == 1
    event = marked[0]["slb"]
    assert (event["from_agent"], event["to_agent"], event["reason"]) == \
        ("gpu-box", "laptop", "gpu-box: agent gpu-box went away (telemetry stopped)")
    assert marked[0]["choices"][0]["delta"]["content"] == event["marker"]
    assert "answer restarted on laptop" in event["marker"] and "void" in event["marker"]
    contents = [e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")]
    streamed = "".join(contents)
    # A plain client sees both texts with the notice between them; a client that honours slb drops what came before.
    assert streamed == "".join(STORY_START) + event["marker"] + new_answer
    after = contents[contents.index(event["marker"]) + 1:]
    assert "".join(after) == new_answer
    final = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
    assert final["slb"]["restarts"][0]["to_agent"] == "laptop"

    sdk_pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "restart"}], stream=True) if chunk.choices]
    assert "".join(sdk_pieces).endswith(new_answer) and "answer restarted on laptop" in "".join(sdk_pieces)

    for path, field in (("/api/chat", "message"), ("/api/generate", "response")):
        request = {"model": "auto", "messages": [{"role": "user", "content": "restart"}]} if field == "message" \
            else {"model": "auto", "prompt": "restart"}
        lines = ndjson_lines(httpx.post(f"{served.url}{path}", json=request, timeout=30))
        restart_lines = [line for line in lines if line.get("slb", {}).get("event") == "restart"]
        assert len(restart_lines) == 1 and restart_lines[0]["done"] is False
        text = restart_lines[0]["message"]["content"] if field == "message" else restart_lines[0]["response"]
        assert text == restart_lines[0]["slb"]["marker"]
        assert lines[-1]["done"] is True and lines[-1]["slb"]["restarts"][0]["from_agent"] == "gpu-box"
        whole_line = httpx.post(f"{served.url}{path}", json={**request, "stream": False}, timeout=30).json()
        assert (whole_line["message"]["content"] if field == "message" else whole_line["response"]) == new_answer


# ---------------------------------------------------------------------------- every model the machines have


def test_every_servable_model_is_listed_with_its_machines_and_routes(served: ServedApp,
                                                                   coordinator: ScriptedCoordinator) -> None:
    client = openai_client(served)
    items = {item.id: item.model_extra or {} for item in client.models.list()}
    assert {"auto", "quality", "all", "llama3.2:1b", "qwen2.5:0.5b", "smollm2", "qwen2.5:7b"} <= set(items)
    assert items["smollm2"]["slb_agents"] == ["laptop"]
    assert items["smollm2"]["slb_holders"][0]["name"] == "/models/SmolLM2-135M-Instruct-Q4_1.gguf"
    assert items["qwen2.5:0.5b"]["slb_holders"][0]["state"] == "local"
    assert items["qwen2.5:7b"]["slb_agents"] == [] and items["qwen2.5:7b"]["slb_coming_to"] == ["pi"]
    assert client.models.retrieve("SmolLM2:latest").id == "smollm2"

    tags = {entry.model: entry for entry in ollama_client(served).list().models}
    assert tags["qwen2.5:0.5b"].details is not None and tags["qwen2.5:0.5b"].details.parameter_size == "500M"
    raw_tags = httpx.get(f"{served.url}/api/tags").json()["models"]
    assert next(entry for entry in raw_tags if entry["name"] == "smollm2")["slb_agents"] == ["laptop"]

    # Any spelling a runtime uses routes to the model (the coordinator gets the cluster's name for it).
    reply = client.chat.completions.create(model="/models/smollm2.gguf", messages=[{"role": "user", "content": "hi"}])
    assert coordinator.queries[-1].mode == "smollm2"
    assert reply.choices[0].message.content == "Echo: hi"
    shown = ollama_client(served).show("qwen2.5:0.5b")
    assert shown.modelinfo is not None and shown.modelinfo["general.context_length"] == 32768
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="mistral:7b", messages=[{"role": "user", "content": "x"}])
    assert "smollm2" in str(missing.value), "the refusal lists what the cluster serves"


# ---------------------------------------------------------------------------- model management


def test_pull_streams_progress_in_ollamas_own_shape(served: ServedApp, coordinator: ScriptedCoordinator) -> None:
    parts = list(ollama_client(served).pull("qwen2.5:7b", stream=True))
    statuses = [part.status for part in parts]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert statuses.count("success") == 1, "one agent's step is never the cluster's 'success'"
    downloads = [part for part in parts if part.digest]
    assert downloads and downloads[-1].completed == downloads[-1].total == 1000
    assert all(part.status.startswith("downloading qwen2.5:7b") for part in downloads)
    assert coordinator.operations[-1] == ("pull", "qwen2.5:7b", None)

    body = {"model": "qwen2.5:7b", "slb_agents": ["gpu-box", "laptop"]}
    lines = ndjson_lines(httpx.post(f"{served.url}/api/pull", json=body, timeout=30))
    assert lines[0]["slb"]["agents"] == ["gpu-box", "laptop"]
    totals = [line["total"] for line in lines if "total" in line]
    assert max(totals) == 2000, "one bar over both machines"
    assert lines[-1] == {"status": "success", "slb": {"agents": ["gpu-box", "laptop"]}}
    assert coordinator.operations[-1] == ("pull", "qwen2.5:7b", ["gpu-box", "laptop"])

    single = httpx.post(f"{served.url}/api/pull", json={"name": "qwen2.5:7b", "stream": False}, timeout=30)
    assert single.status_code == 200 and single.json()["status"] == "success"

    failed = ndjson_lines(httpx.post(f"{served.url}/api/pull", json={"model": "qwen2.5:7b",
                                                                    "slb_agents": ["gpu-box", "pi"]}, timeout=30))
    assert failed[-1] == {"error": "pull qwen2.5:7b failed on pi: pull model manifest: file does not exist "
                                   "(it worked on gpu-box)"}
    with pytest.raises(ollama.ResponseError) as refused:
        list(ollama_client(served).pull("nowhere:1b", stream=True))
    assert refused.value.status_code == 400 and "only Ollama can" in refused.value.error
    assert "llama.cpp" in refused.value.error, "says how to get a model onto the other runtimes"
    unknown = httpx.post(f"{served.url}/api/pull", json={"model": "x", "slb_agents": ["nobody"]}, timeout=30)
    assert unknown.status_code == 400 and "nobody" in unknown.json()["error"]
    empty = httpx.post(f"{served.url}/api/pull", json={}, timeout=30)
    assert empty.status_code == 400 and empty.json() == {"error": "model is required"}
    broken = httpx.post(f"{served.url}/api/pull", json={"model": "explode:1b"}, timeout=30)
    assert broken.status_code == 500 and "internal error" in broken.json()["error"], "a bug too is Ollama-shaped"


def test_delete_and_ps_and_keep_alive_zero(served: ServedApp, coordinator: ScriptedCoordinator) -> None:
    client = ollama_client(served)
    assert client.delete("qwen2.5:0.5b").status == "success"
    assert coordinator.operations[-1] == ("delete", "qwen2.5:0.5b", None)
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("ghost:1b")
    assert missing.value.status_code == 404 and "ghost:1b" in missing.value.error

    loaded = {entry.model: entry for entry in client.ps().models}
    assert set(loaded) == {"llama3.2:1b", "smollm2"}
    raw = {entry["name"]: entry for entry in httpx.get(f"{served.url}/api/ps").json()["models"]}
    assert raw["smollm2"]["slb_agents"] == ["laptop"] and raw["llama3.2:1b"]["context_length"] == 131072

    # Open WebUI's unload: generate with an empty prompt and keep_alive 0.
    unloaded = httpx.post(f"{served.url}/api/generate", json={"model": "llama3.2:1b", "keep_alive": 0}, timeout=30)
    assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload"
    assert coordinator.operations[-1] == ("unload", "llama3.2:1b", ["gpu-box"])
    refused = httpx.post(f"{served.url}/api/chat", json={"model": "smollm2", "messages": [], "keep_alive": "0s"},
                         timeout=30)
    assert refused.status_code == 502 and "cannot unload" in refused.json()["error"]
    assert LLAMA_CPP_URL in refused.json()["error"]

    # A load goes to one machine, and only when no runtime holds the model in memory yet.
    operations = len(coordinator.operations)
    assert client.generate(model="llama3.2:1b", prompt="").done_reason == "load"
    assert len(coordinator.operations) == operations, "already loaded on gpu-box: nothing to do"
    assert client.generate(model="qwen2.5:0.5b", prompt="", keep_alive="5m").done_reason == "load"
    assert coordinator.operations[-1] == ("load", "qwen2.5:0.5b", ["gpu-box"])

    # keep_alive 0 with a question: answered, then unloaded where it was answered.
    reply = client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "bye"}], keep_alive=0)
    assert reply.message.content == "Echo: bye"
    for _ in range(50):
        if coordinator.operations[-1][0] == "unload":
            break
        time.sleep(0.05)
    assert coordinator.operations[-1] == ("unload", "llama3.2:1b", ["gpu-box"])


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("POST", "/api/create", 501, "ollama create"),
        ("POST", "/api/copy", 501, "ollama cp"),
        ("POST", "/api/push", 501, "ollama push"),
        ("HEAD", "/api/blobs/sha256:abc", 501, None),
        ("POST", "/api/blobs/sha256:abc", 501, "ollama create"),
        ("POST", "/api/embed", 400, "input"),  # served now (app/embeddings_api.py): the input is missing
        ("GET", "/api/embeddings", 405, "POST"),
        ("GET", "/api/whatever", 404, "/api/chat"),
        ("GET", "/api", 404, "/api/tags"),
        ("GET", "/api/chat", 405, "POST"),
        ("POST", "/api/tags", 405, "GET"),
        ("GET", "/api/delete", 405, "DELETE"),
    ],
)
def test_every_other_api_path_answers_in_ollamas_error_shape(served: ServedApp, method: str, path: str,
                                                             status: int, needle: str | None) -> None:
    response = httpx.request(method, f"{served.url}{path}", json={"model": "x"} if method == "POST" else None)
    assert response.status_code == status
    if method == "HEAD":
        return
    body = response.json()
    assert set(body) == {"error"} and "detail" not in body
    assert needle is not None and needle in body["error"]


def test_the_ollama_client_sees_the_advice(served: ServedApp) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client(served).copy("llama3.2:1b", "mine:1b")
    assert refused.value.status_code == 501 and "ollama cp" in refused.value.error


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("POST", "/v1/completions", 404, "/v1/chat/completions"),
        ("GET", "/v1/embeddings", 405, "POST"),  # served (POST) since issue 17
        ("GET", "/v1/nothing", 404, "/v1/models"),
        ("GET", "/v1/chat/completions", 405, "POST"),
    ],
)
def test_every_other_v1_path_answers_in_openais_error_shape(served: ServedApp, method: str, path: str,
                                                            status: int, needle: str) -> None:
    response = httpx.request(method, f"{served.url}{path}", json={"model": "x"} if method == "POST" else None)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]


def test_the_openai_sdk_gets_its_own_exception_for_an_unserved_endpoint(served: ServedApp) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client(served).completions.create(model="auto", prompt="hello")
    assert "/v1/chat/completions" in str(missing.value)


# ---------------------------------------------------------------------------- health and status


def test_status_carries_the_runtime_profile_and_health_names_the_runtime(served: ServedApp,
                                                                         coordinator: ScriptedCoordinator) -> None:
    agents = {item["id"]: item for item in httpx.get(f"{served.url}/status").json()["agents"]}
    assert agents["laptop"]["runtime"]["kind"] == "llama-cpp-python"
    assert agents["laptop"]["runtime"]["continues_prefill"] is False
    assert agents["gpu-box"]["slots"] == 2 and agents["laptop"]["backend_url"] == LLAMA_CPP_URL

    laptop = next(item for item in coordinator.agents if item.id == "laptop")
    coordinator.agents = [item for item in coordinator.agents if item.id != "laptop"] + [
        agent("laptop", backend="openai", backend_url=LLAMA_CPP_URL, runtime=laptop.runtime,
              backend_reachable=False, backend_error="connection refused <b>")]
    message = httpx.get(f"{served.url}/health").json()["message"]
    assert f"cannot reach its llama-cpp-python server at {LLAMA_CPP_URL} (connection refused <b>)" in message
    assert "ollama.com" not in message and "Install Ollama" not in message

"""Tool calling through the cluster (docs/api.md "Tools", docs/protocol.md "Tools"), against real parts.

One module-wide cluster: Mosquitto, ``python -m app``, an agent on llama-cpp-python's server with the
``chatml-function-calling`` chat format (SmolLM2-135M: a call forced with ``tool_choice`` is what it does
reliably), and an agent on the Ollama double serving ``llama3.2:1b`` (tools) and ``gemma3:1b`` (marked as Ollama
marks a model without tools). "Exactly as the runtime answered" is checked by asking the runtime directly first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from broker.mqtt.local_broker import RunningBroker
from broker.protocol import decode
from broker.protocol.messages import ChatMessage, Job, Result, ToolCall
from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
from broker.scheduling.routing import RouteCandidate, prefer_tools
from tests.app_support import ARTIFACTS, RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble, iter_ndjson
from tests.support.llama_runtime import MODEL_ALIAS, LlamaServer, start_llama_server

pytestmark = pytest.mark.slow

BOX = {"description": "test box", "cpu_brand": "test CPU", "cpu_physical_cores": 2, "cpu_logical_cores": 2,
       "cpu_max_ghz": 3.0, "ram_total_gb": 8, "os": "Linux", "arch": "x86_64", "gpus": []}
TOOLS_MODEL, PLAIN_MODEL = "llama3.2:1b", "gemma3:1b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FORCED = {"type": "function", "function": {"name": "get_weather"}}


def open_webui_tools(count: int = 36) -> list[dict[str, Any]]:
    """Open WebUI 0.12's native mode sends its built-in tools with every chat: ~36 definitions like these."""
    names = ["search_web", "fetch_url", "query_knowledge_files", "view_knowledge_file", "search_notes",
             "get_current_timestamp", "calculate_timestamp", "generate_image", "edit_image", "execute_code"]
    return [{"type": "function", "function": {
        "name": f"{names[index % len(names)]}_{index}", "description": f"Open WebUI built-in tool number {index}",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what"},
                                                        "count": {"type": "integer"}},
                       "required": ["query"]}}} for index in range(count)]


@dataclass
class ToolCluster:
    app: RunningApp
    runtime: LlamaServer
    double: OllamaDouble

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.app.url}{path}", json=body, headers=self.app.headers, timeout=120)


@pytest.fixture(scope="module")
def cluster(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolCluster]:
    folder: Path = tmp_path_factory.mktemp("tools")
    runtime = start_llama_server(folder, name="llama-tools", extra_args=("--chat_format", "chatml-function-calling"))
    double = OllamaDouble(models=[TOOLS_MODEL, PLAIN_MODEL], no_tools={PLAIN_MODEL}, tokens_per_s=0).start()
    app = start_app(folder, mosquitto, topic_prefix=f"slbtest/tools{uuid.uuid4().hex[:8]}/v1",
                    extra=["--no-rag-warm-up"])
    try:
        start_agent(app, folder, "llama-tools", backend="openai", backend_url=runtime.url, profile=BOX,
                    extra=["--telemetry-interval-s", "1"])
        start_agent(app, folder, "ollama-tools", backend="ollama", backend_url=double.url, profile=BOX)

        def serving() -> bool:
            agents = {agent["id"]: agent for agent in app.status()["agents"]}
            llama, ollama = agents.get("llama-tools", {}), agents.get("ollama-tools", {})
            return bool(llama.get("online") and MODEL_ALIAS in llama.get("local_models", [])
                        and ollama.get("online") and PLAIN_MODEL in ollama.get("available_models", {})
                        and TOOLS_MODEL in ollama.get("available_models", {}))

        wait_for_app(serving, 90, "both agents serving", app)
        yield ToolCluster(app, runtime, double)
    finally:
        app.stop()
        double.stop()
        runtime.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "tools_cluster.log").write_text(f"{app.logs()}\n--- runtime\n{runtime.child.log()}")


def calls_of(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """Name and arguments of each call (ids are the runtime's per answer, so they differ between two answers)."""
    return [(call["function"]["name"], call["function"]["arguments"]) for call in message.get("tool_calls") or []]


def streamed_openai(response: httpx.Response) -> tuple[list[tuple[str, str]], str | None, str]:
    """Calls (OpenAI delta tool_calls joined by index), the finish reason and the text of an SSE stream."""
    calls: dict[int, dict[str, str]] = {}
    finish, text = None, ""
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
                function = piece.get("function") or {}
                call["name"] = call["name"] or function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return [(call["name"], call["arguments"]) for _, call in sorted(calls.items())], finish, text


# ---------------------------------------------------------------- the real runtime: a forced call, exactly


@pytest.mark.timeout(180)
def test_a_forced_call_comes_back_exactly_as_the_runtime_made_it(cluster: ToolCluster) -> None:
    body = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER], "tool_choice": FORCED, "temperature": 0, "max_tokens": 40}
    direct = httpx.post(f"{cluster.runtime.url}/chat/completions", json=body, timeout=120).json()
    expected = calls_of(direct["choices"][0]["message"])
    assert expected and expected[0][0] == "get_weather", direct
    reply = cluster.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert calls_of(choice["message"]) == expected
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["id"]
    with httpx.stream("POST", f"{cluster.app.url}/v1/chat/completions", json={**body, "stream": True},
                      headers=cluster.app.headers, timeout=120) as response:
        assert response.status_code == 200
        calls, finish, _ = streamed_openai(response)
    assert calls == expected and finish == "tool_calls"


@pytest.mark.timeout(180)
def test_openai_sdk_round_trip_call_result_answer(cluster: ToolCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.app.url}/v1", api_key=cluster.app.api_key or "none")
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL_ALIAS, messages=messages, tools=[WEATHER],
                                           tool_choice=FORCED, temperature=0, max_tokens=40)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments).get("city")
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    final = client.chat.completions.create(model=MODEL_ALIAS, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=40)
    assert final.choices[0].message.content and final.choices[0].message.content.strip()
    assert not final.choices[0].message.tool_calls and final.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- the Ollama double: Ollama's dialect


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_returns_message_tool_calls_as_ollama_does(cluster: ToolCluster, stream: bool) -> None:
    body = {"model": TOOLS_MODEL, "stream": stream, "tools": [WEATHER],
            "messages": [{"role": "user", "content": "please call get_weather Paris"}]}

    def lines(base: str, headers: dict[str, str]) -> list[dict[str, Any]]:
        response = httpx.post(f"{base}/api/chat", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return list(iter_ndjson(response.content.splitlines())) if stream else [response.json()]

    want = lines(cluster.double.url, {})
    got = lines(cluster.app.url, cluster.app.headers)
    want_calls = [call for line in want for call in line["message"].get("tool_calls") or []]
    got_calls = [call for line in got for call in line["message"].get("tool_calls") or []]
    assert want_calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert got_calls == want_calls
    assert got[-1]["done"] and got[-1]["done_reason"] == want[-1]["done_reason"] == "stop"
    if stream:  # as Ollama: the calls in a chunk of their own, not on the final one
        assert not got[-1]["message"].get("tool_calls") and not got[-2]["done"]


@pytest.mark.timeout(120)
def test_openai_round_trip_on_ollama_with_tool_result(cluster: ToolCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.app.url}/v1", api_key=cluster.app.api_key or "none")
    messages: list[Any] = [{"role": "user", "content": "please call get_weather Paris"}]
    first = client.chat.completions.create(model=TOOLS_MODEL, messages=messages, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert call.function.arguments == '{"city":"Paris"}'  # compact, as Ollama's own /v1 writes it
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    final = client.chat.completions.create(model=TOOLS_MODEL, messages=messages, tools=[WEATHER], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in final if chunk.choices)
    assert text == "Echo: 18 degrees"  # the double answers the tool result
    sent = cluster.double.requests_to("/api/chat")[-1]["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert sent[2]["role"] == "tool" and sent[2]["content"] == "18 degrees"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True])
def test_a_model_without_tools_is_refused_in_ollamas_words(cluster: ToolCluster, stream: bool) -> None:
    body = {"model": PLAIN_MODEL, "stream": stream, "tools": open_webui_tools(),
            "messages": [{"role": "user", "content": "Hello there"}]}
    want = httpx.post(f"{cluster.double.url}/api/chat", json=body, timeout=60)
    got = cluster.post("/api/chat", body)
    assert want.status_code == got.status_code == 400
    assert got.json() == want.json() == {"error": f"registry.ollama.ai/library/{PLAIN_MODEL} does not support tools"}
    v1 = cluster.post("/v1/chat/completions", {**body, "stream": stream})
    assert v1.status_code == 400 and v1.json()["error"]["message"] == want.json()["error"]


@pytest.mark.timeout(120)
def test_open_webui_request_shape_gets_a_usable_answer_from_a_tool_model(cluster: ToolCluster) -> None:
    body = {"model": TOOLS_MODEL, "stream": True, "tools": open_webui_tools(), "options": {"temperature": 0.8},
            "messages": [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": "Tell me about Paris"}]}
    response = cluster.post("/api/chat", body)
    assert response.status_code == 200, response.text
    lines = list(iter_ndjson(response.content.splitlines()))
    assert "".join(line["message"]["content"] for line in lines) == "Echo: Tell me about Paris"
    assert lines[-1]["done"] and not any(line["message"].get("tool_calls") for line in lines)
    assert len(cluster.double.requests_to("/api/chat")[-1]["tools"]) == 36  # every tool reached the runtime


@pytest.mark.timeout(120)
def test_auto_routing_with_tools_never_picks_the_model_without_them(cluster: ToolCluster) -> None:
    for _ in range(3):
        reply = cluster.post("/api/chat", {"model": "auto", "stream": False, "tools": [WEATHER],
                                           "messages": [{"role": "user", "content": "Say hi"}]})
        assert reply.status_code == 200, reply.text
        assert PLAIN_MODEL not in reply.json()["model"], reply.json()


def test_bad_tools_and_fan_out_with_tools_are_clear_400s(cluster: ToolCluster) -> None:
    base = {"model": TOOLS_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    missing = cluster.post("/v1/chat/completions", {**base, "tools": [WEATHER],
                                                    "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert missing.status_code == 400 and "not among the tools" in missing.json()["error"]["message"]
    nameless = cluster.post("/v1/chat/completions", {**base, "tools": [{"type": "function", "function": {}}]})
    assert nameless.status_code == 400 and nameless.json()["error"]["param"] == "tools"
    fan_out = cluster.post("/v1/chat/completions", {**base, "model": "all", "tools": [WEATHER]})
    assert fan_out.status_code == 400 and "tools cannot be combined" in fan_out.json()["error"]["message"]


# ---------------------------------------------------------------- pure parts: wire, routing


def test_wire_extension_is_optional_and_round_trips() -> None:
    old = Job.model_validate_json('{"v": 1, "request_id": "r1", "model": "m", "deadline": 1e10, '
                                  '"messages": [{"role": "user", "content": "hi"}]}')
    assert old.tools is None and old.messages[0].tool_calls is None
    call = ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')
    job = Job(request_id="r2", model="m", deadline=1e10, tools=[WEATHER], tool_choice=FORCED, messages=[
        ChatMessage(role="assistant", content="", tool_calls=[call]),
        ChatMessage(role="tool", content="18", tool_call_id="c1", name="get_weather")])
    assert Job.model_validate_json(job.model_dump_json()) == job
    result = decode(Result, Result(request_id="r2", seq=0, done=True, tool_calls=[call]).model_dump_json().encode())
    assert result.tool_calls == [call]


def test_routing_prefers_models_with_tools() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    candidates = [RouteCandidate(agent_id=name, model=model, outstanding=0, slots=1, tokens_per_s=10, ttft_s=0.1)
                  for name, model in (("a", "gemma3:1b"), ("b", "qwen2.5:0.5b"), ("c", "some-unknown-model"))]
    assert [c.agent_id for c in prefer_tools(candidates, catalog)] == ["b"]
    assert [c.agent_id for c in prefer_tools([candidates[0], candidates[2]], catalog)] == ["c"]
    assert [c.agent_id for c in prefer_tools([candidates[0]], catalog)] == ["a"]  # its runtime answers (or refuses)

"""Structured output through the cluster (issue 17.2, docs/api.md "Structured output").

A real llama-cpp-python server (SmolLM2-135M; its grammars enforce JSON mode and schemas) answers JSON-mode and
schema requests through ``/v1`` (the ``openai`` SDK) and ``/api`` (the ``ollama`` SDK) exactly as it answers them
directly. Two Ollama doubles serve one more model: with the double's ``invalid_json`` fault on one of them the
question goes to the other and the answer is still JSON; with the fault on both, the caller gets a coded error
(``invalid_output``) — never the invalid text as a success — in each API's shape, streamed or not.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.app_support import ARTIFACTS, GPU_DESKTOP, RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble, format_reply, reply_text
from tests.support.llama_runtime import MODEL_ALIAS, LlamaServer, start_llama_server

pytestmark = pytest.mark.slow

CPU_BOX = {
    "description": "2-core test box", "cpu_brand": "test CPU", "cpu_physical_cores": 2, "cpu_logical_cores": 2,
    "cpu_max_ghz": 3.0, "ram_total_gb": 8, "os": "Linux", "arch": "x86_64", "gpus": [],
}
DOUBLE_MODEL = "jsonbox:1b"
GOOD_AGENT, BAD_AGENT = "json-good", "json-bad"
PROMPT = "Describe a person named Ann who is 30, as JSON."
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
MAX_TOKENS = 120  # SmolLM2 closes these objects within ~30 tokens: the limit never cuts the JSON


@dataclass
class JsonCluster:
    app: RunningApp
    runtime: LlamaServer
    good: OllamaDouble
    bad: OllamaDouble

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.app.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.app.url, timeout=120)


@pytest.fixture(scope="module")
def cluster(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsonCluster]:
    folder = tmp_path_factory.mktemp("structured")
    runtime = start_llama_server(folder / "llama", name="llama-json")
    good = OllamaDouble(models=[DOUBLE_MODEL], tokens_per_s=0).start()
    bad = OllamaDouble(models=[DOUBLE_MODEL], tokens_per_s=0).start()
    app = start_app(folder, mosquitto, topic_prefix=f"slbtest/json{uuid.uuid4().hex[:8]}/v1",
                    extra=["--no-rag-warm-up"])
    try:
        start_agent(app, folder, "llama-json", backend="openai", backend_url=runtime.url, profile=CPU_BOX,
                    extra=["--telemetry-interval-s", "1"])
        # the faulty one looks faster (a GPU): routing asks it first, so the failover is what gets tested
        for agent_id, double, profile in ((GOOD_AGENT, good, CPU_BOX), (BAD_AGENT, bad, GPU_DESKTOP)):
            start_agent(app, folder, agent_id, backend="ollama", backend_url=double.url, profile=profile)

        def serving() -> bool:
            agents = {agent["id"]: agent for agent in app.status()["agents"]}
            llama = agents.get("llama-json", {})
            doubles_ready = all(agents.get(name, {}).get("online") and DOUBLE_MODEL in
                                agents[name].get("local_models", []) for name in (GOOD_AGENT, BAD_AGENT))
            return bool(llama.get("online") and MODEL_ALIAS in llama.get("local_models", []) and doubles_ready)

        wait_for_app(serving, 90, "the llama-cpp-python agent and both double agents serving", app)
        yield JsonCluster(app, runtime, good, bad)
    finally:
        app.stop()
        good.stop()
        bad.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "structured_output.log").write_text(f"{app.logs()}\n--- runtime\n{runtime.child.log()}")
        runtime.stop()


def direct(runtime: LlamaServer, response_format: dict[str, Any]) -> str:
    """The runtime's own answer to the request (llama-cpp-python's dialect: a schema goes in ``json_object``)."""
    body = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "response_format": response_format}
    for _ in range(3):  # an agent's health check may interrupt the runtime; then the answer has no finish reason
        choice = httpx.post(f"{runtime.url}/chat/completions", json=body, timeout=120).json()["choices"][0]
        if choice["finish_reason"] == "stop":
            return choice["message"]["content"]
    raise AssertionError(f"the runtime's own answer did not finish three times: {choice}")


@pytest.mark.timeout(300)
def test_json_mode_through_v1_and_api_is_the_runtimes_answer(cluster: JsonCluster) -> None:
    expected = direct(cluster.runtime, {"type": "json_object"})
    assert isinstance(json.loads(expected), dict)
    messages = [{"role": "user", "content": PROMPT}]

    reply = cluster.openai().chat.completions.create(
        model=MODEL_ALIAS, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"})
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"

    streamed = cluster.openai().chat.completions.create(
        model=MODEL_ALIAS, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"}, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected

    answer = cluster.ollama().chat(model=MODEL_ALIAS, messages=messages, format="json",
                                   options={"temperature": 0, "num_predict": MAX_TOKENS}, stream=False)
    assert answer.message.content == expected


@pytest.mark.timeout(300)
def test_a_json_schema_is_the_runtimes_answer_and_fits(cluster: JsonCluster) -> None:
    expected = direct(cluster.runtime, {"type": "json_object", "schema": PERSON})
    jsonschema.validate(json.loads(expected), PERSON)
    messages = [{"role": "user", "content": PROMPT}]

    reply = cluster.openai().chat.completions.create(
        model=MODEL_ALIAS, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert reply.choices[0].message.content == expected

    answer = cluster.ollama().chat(model=MODEL_ALIAS, messages=messages, format=PERSON,
                                   options={"temperature": 0, "num_predict": MAX_TOKENS}, stream=False)
    assert answer.message.content == expected


def test_a_schema_the_cluster_cannot_use_is_a_400_naming_it(cluster: JsonCluster) -> None:
    body = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}
    response = httpx.post(f"{cluster.app.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format.json_schema.schema"
    remote = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "x"}], "stream": False,
              "format": {"$ref": "https://example.com/schema.json"}}
    response = httpx.post(f"{cluster.app.url}/api/chat", json=remote, timeout=30)
    assert response.status_code == 400 and "example.com" in response.json()["error"], response.text
    grammar = {**body, "response_format": {"type": "grammar", "grammar": "root ::= \"x\""}}
    response = httpx.post(f"{cluster.app.url}/v1/chat/completions", json=grammar, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format.type"


def prefer_the_faulty_agent(cluster: JsonCluster) -> None:
    """The model in the faulty double's memory only, so routing asks that agent first (no load to wait for)."""
    httpx.post(f"{cluster.good.url}/api/generate", json={"model": DOUBLE_MODEL, "keep_alive": 0}, timeout=10)
    httpx.post(f"{cluster.bad.url}/api/generate", json={"model": DOUBLE_MODEL}, timeout=10)

    def loaded_on_bad_only() -> bool:
        agents = {agent["id"]: agent for agent in cluster.app.status()["agents"]}
        return any(DOUBLE_MODEL in name for name in agents[BAD_AGENT].get("loaded_models", [])) and not any(
            DOUBLE_MODEL in name for name in agents[GOOD_AGENT].get("loaded_models", []))

    wait_for_app(loaded_on_bad_only, 30, f"{DOUBLE_MODEL} loaded on {BAD_AGENT} only", cluster.app)


def test_invalid_json_from_one_agent_goes_to_the_other(cluster: JsonCluster) -> None:
    """Routing asks the faulty agent first; its text is void, and the good agent answers afresh."""
    cluster.bad.config.invalid_json = True
    try:
        prefer_the_faulty_agent(cluster)
        asked = len(cluster.bad.requests_to("/api/chat"))
        answer = httpx.post(f"{cluster.app.url}/api/chat", timeout=60, json={
            "model": DOUBLE_MODEL, "messages": [{"role": "user", "content": "who answers"}], "format": "json",
            "stream": False}).json()
        assert answer["message"]["content"] == format_reply("json", reply_text("who answers"))
        assert answer["slb"]["agents"] == [BAD_AGENT, GOOD_AGENT], answer["slb"]
        assert len(cluster.bad.requests_to("/api/chat")) == asked + 1

        prefer_the_faulty_agent(cluster)
        streamed = cluster.openai().chat.completions.create(
            model=DOUBLE_MODEL, messages=[{"role": "user", "content": "streamed"}], stream=True,
            response_format={"type": "json_object"})
        chunks = list(streamed)
        restart = [chunk for chunk in chunks if (chunk.model_extra or {}).get("slb", {}).get("event") == "restart"]
        assert restart and restart[0].model_extra["slb"]["from_agent"] == BAD_AGENT, "the void text is marked"
        after = chunks[chunks.index(restart[-1]) + 1:]
        expected = format_reply("json", reply_text("streamed"))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in after if chunk.choices) == expected
    finally:
        cluster.bad.reset_faults()


def test_invalid_json_everywhere_is_a_coded_error_never_a_success(cluster: JsonCluster) -> None:
    cluster.bad.config.invalid_json = cluster.good.config.invalid_json = True
    messages = [{"role": "user", "content": "broken everywhere"}]
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            cluster.openai().chat.completions.create(model=DOUBLE_MODEL, messages=messages,
                                                     response_format={"type": "json_object"})
        assert failed.value.status_code == 502
        error = failed.value.body if isinstance(failed.value.body, dict) else {}
        assert error.get("code") == "invalid_output", failed.value.body
        assert GOOD_AGENT in error["message"] and BAD_AGENT in error["message"], "both agents were tried"
        assert "not valid JSON" in error["message"]

        with pytest.raises(ollama.ResponseError) as refused:
            cluster.ollama().chat(model=DOUBLE_MODEL, messages=messages, format="json", stream=False)
        assert refused.value.status_code == 502 and "not valid JSON" in refused.value.error

        body = {"model": DOUBLE_MODEL, "messages": messages, "stream": True,
                "response_format": {"type": "json_object"}}
        with httpx.stream("POST", f"{cluster.app.url}/v1/chat/completions", json=body, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "invalid_output", events[-1]
        assert not any(choice.get("finish_reason") for event in events for choice in event.get("choices", []))

        lines = [json.loads(line) for line in httpx.post(
            f"{cluster.app.url}/api/chat", json={"model": DOUBLE_MODEL, "messages": messages, "format": "json"},
            timeout=60).text.splitlines()]
        assert "not valid JSON" in lines[-1]["error"]
        assert not any(line.get("done") for line in lines)
    finally:
        cluster.bad.reset_faults()
        cluster.good.reset_faults()


def test_json_cut_by_the_token_limit_is_an_error_saying_so_without_trying_others(cluster: JsonCluster) -> None:
    body = {"model": DOUBLE_MODEL, "messages": [{"role": "user", "content": "cut me short please"}],
            "format": "json", "stream": False, "options": {"num_predict": 2}}
    response = httpx.post(f"{cluster.app.url}/api/chat", json=body, timeout=60)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert "token limit" in error and "num_predict" in error
    assert (GOOD_AGENT in error) != (BAD_AGENT in error), "another agent would be cut at the same place"


def test_format_and_runtime_fields_reach_the_ollama_runtime(cluster: JsonCluster) -> None:
    """``format`` (a schema), ``think: false`` and ``keep_alive`` go to an Ollama runtime in its own words."""
    seen = len(cluster.good.requests_to("/api/chat")) + len(cluster.bad.requests_to("/api/chat"))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = cluster.ollama().chat(model=DOUBLE_MODEL, messages=[{"role": "user", "content": "a city"}],
                                   format=schema, think=False, keep_alive="7m", stream=False)
    assert json.loads(answer.message.content) == {"city": reply_text("a city")}
    bodies = (cluster.good.requests_to("/api/chat") + cluster.bad.requests_to("/api/chat"))
    assert len(bodies) == seen + 1
    sent = next(body for body in bodies if body.get("messages", [{}])[-1].get("content") == "a city")
    assert sent["format"] == schema and sent["think"] is False and sent["keep_alive"] == "7m"


def test_structured_check_units() -> None:
    """The check itself: JSON that parses, schemas that fit, and the reasons given otherwise."""
    from agent.backends.simulated import simulated_json
    from app.structured import answer_problem

    assert answer_problem('{"a": 1}', "json") is None
    assert "not valid JSON" in (answer_problem('{"a": ', "json") or "")
    assert answer_problem('{"name": "Ann", "age": 30}', PERSON) is None
    problem = answer_problem('{"name": "Ann", "age": "thirty"}', PERSON) or ""
    assert "does not fit the schema" in problem and "age" in problem
    # the simulated backend (--demo) answers structured requests with JSON that passes the same check
    assert answer_problem(simulated_json(PERSON, "simulated text"), PERSON) is None
    assert answer_problem(simulated_json("json", "simulated text"), "json") is None

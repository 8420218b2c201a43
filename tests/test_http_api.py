"""The HTTP API of a running ``python -m app``: health, status, metrics, OpenAI and Ollama clients.

The cluster behind it is real (coordinator in the app, agents on Mosquitto);
the only stand-in is the Ollama test double behind one agent.
"""

from __future__ import annotations

import time

import httpx
import ollama
import openai
import pytest

from tests.app_support import OLLAMA_AGENT, SIMULATED_AGENT, RunningApp
from tests.ollama_double import reply_text

pytest_plugins = ["tests.app_fixtures"]

pytestmark = pytest.mark.slow


def _client(app: RunningApp, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key or app.api_key, max_retries=0, timeout=60)


def _ollama_model(app: RunningApp) -> str:
    agent = next(agent for agent in app.status()["agents"] if agent["id"] == OLLAMA_AGENT)
    return agent["model"]


def test_health_and_status_shapes(app_cluster: RunningApp) -> None:
    health = httpx.get(f"{app_cluster.url}/health", timeout=10).json()
    assert set(health) >= {"healthy", "connected_clients", "active_models", "message"}
    assert health["healthy"] is True
    assert health["connected_clients"] == 2
    assert _ollama_model(app_cluster) in health["active_models"]
    status = app_cluster.status()
    assert set(status) >= {"total_clients", "active_clients", "available_models", "healthy", "agents"}
    agents = {agent["id"]: agent for agent in status["agents"]}
    assert {OLLAMA_AGENT, SIMULATED_AGENT} <= set(agents)
    for agent in agents.values():
        assert set(agent) >= {"id", "online", "score", "model", "model_state", "simulated", "hardware_summary"}
    assert agents[SIMULATED_AGENT]["simulated"] is True
    assert agents[OLLAMA_AGENT]["simulated"] is False
    assert agents[OLLAMA_AGENT]["score"] > agents[SIMULATED_AGENT]["score"]


def test_openai_sdk_non_streaming(app_cluster: RunningApp) -> None:
    model = _ollama_model(app_cluster)
    completion = _client(app_cluster).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello from the openai sdk"}]
    )
    assert completion.choices[0].message.content == reply_text("hello from the openai sdk")
    assert completion.model == model
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    extra = completion.model_extra or {}
    assert extra["slb"]["agents"] == [OLLAMA_AGENT]


def test_openai_sdk_streaming_and_ttft(app_cluster: RunningApp) -> None:
    client = _client(app_cluster)
    model = _ollama_model(app_cluster)
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream these words to me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == reply_text("stream these words to me please")
    assert len(pieces) > 1, "the answer should arrive in several chunks"
    assert usage is not None and usage.completion_tokens > 0
    assert first is not None and first - started < 5


def test_openai_modes_auto_quality_all(app_cluster: RunningApp) -> None:
    client = _client(app_cluster)
    models = {item.id for item in client.models.list()}
    assert {"auto", "quality", "all", _ollama_model(app_cluster)} <= models
    auto = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "auto mode"}])
    assert auto.choices[0].message.content.startswith("Echo:") or auto.choices[0].message.content
    fan = client.chat.completions.create(
        model="all", messages=[{"role": "user", "content": "everyone answer"}], extra_body={"aggregation": "consensus"}
    )
    slb = (fan.model_extra or {})["slb"]
    assert set(slb["agents"]) == {OLLAMA_AGENT, SIMULATED_AGENT}
    assert len(slb["answers"]) == 2
    assert 0.0 <= slb["agreement"] <= 1.0
    assert SIMULATED_AGENT in slb["simulated_agents"]
    chunks = list(client.chat.completions.create(
        model="all", messages=[{"role": "user", "content": "everyone stream"}], stream=True
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text, "the combined answer arrives in the stream"
    last = next(chunk for chunk in reversed(chunks) if chunk.choices and chunk.choices[0].finish_reason)
    assert len((last.model_extra or {})["slb"]["answers"]) == 2


def test_openai_errors(app_cluster: RunningApp) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        _client(app_cluster).chat.completions.create(model="no-such:model", messages=[{"role": "user", "content": "x"}])
    assert "not served" in str(missing.value)
    with pytest.raises(openai.AuthenticationError):
        _client(app_cluster, key="wrong").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError) as too_long:
        _client(app_cluster).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "x" * 100_001}]
        )
    assert "limit" in str(too_long.value)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "auto", "messages": "hello"}, "messages"),
        ({"model": "auto", "messages": []}, "messages"),
        ({"model": "auto", "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ],
)
def test_openai_validation_is_a_clear_400(app_cluster: RunningApp, body: dict, needle: str) -> None:
    response = httpx.post(f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"


def test_bad_json_and_huge_bodies(app_cluster: RunningApp) -> None:
    url = f"{app_cluster.url}/v1/chat/completions"
    response = httpx.post(url, content=b"{not json", headers=app_cluster.headers)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    # Past the body limit (the longest prompt JSON-escaped, plus room for images): refused before it is read.
    huge = b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"x" * 2_000_000 + b'"}]}'
    response = httpx.post(url, content=huge, headers=app_cluster.headers)
    assert response.status_code == 413
    response = httpx.post(f"{app_cluster.url}/api/chat", json={"model": "auto", "messages": [{"role": "user"}],
                          "options": {"temperature": "warm"}}, headers=app_cluster.headers)
    assert response.status_code == 400 and "temperature" in response.json()["error"]


def test_api_key_enforced_on_v1_and_api_only(app_cluster: RunningApp) -> None:
    for path in ("/v1/models", "/api/tags"):
        assert httpx.get(f"{app_cluster.url}{path}").status_code == 401
        assert httpx.get(f"{app_cluster.url}{path}", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{app_cluster.url}{path}", headers=app_cluster.headers).status_code == 200
    for path in ("/health", "/status", "/metrics"):
        assert httpx.get(f"{app_cluster.url}{path}").status_code == 200


def test_cors_allows_loopback_origins_only(app_cluster: RunningApp) -> None:
    url = f"{app_cluster.url}/v1/models"
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    local = httpx.options(url, headers={"Origin": "http://localhost:3000", **preflight})
    assert local.headers.get("access-control-allow-origin") == "http://localhost:3000"
    evil = httpx.options(url, headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in evil.headers
    plain = httpx.get(f"{app_cluster.url}/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_ollama_client_chat_and_generate(app_cluster: RunningApp) -> None:
    client = ollama.Client(host=app_cluster.url, headers=app_cluster.headers)
    model = _ollama_model(app_cluster)
    names = {item.model for item in client.list().models}
    assert {"auto", "quality", "all", model} <= names
    reply = client.chat(model=model, messages=[{"role": "user", "content": "hi ollama client"}])
    assert reply.message.content == reply_text("hi ollama client")
    assert reply.done and (reply.eval_count or 0) > 0
    streamed = "".join(
        part.message.content
        for part in client.chat(model=model, messages=[{"role": "user", "content": "stream it"}], stream=True)
    )
    assert streamed == reply_text("stream it")
    generated = client.generate(model=model, prompt="generate please")
    assert generated.response == reply_text("generate please")
    parts = list(client.generate(model=model, prompt="generate streaming", stream=True))
    assert "".join(part.response for part in parts) == reply_text("generate streaming")
    assert parts[-1].done
    shown = client.show(model)
    assert shown.details is not None
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope:1b", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404
    assert httpx.get(f"{app_cluster.url}/api/version", headers=app_cluster.headers).json()["version"]


def test_metrics_has_coordinator_and_http_counters(app_cluster: RunningApp) -> None:
    _client(app_cluster).chat.completions.create(model="auto", messages=[{"role": "user", "content": "count me"}])
    text = httpx.get(f"{app_cluster.url}/metrics").text
    assert "slb_http_requests_total" in text
    assert 'route="/v1/chat/completions"' in text
    assert "slb_queries_total" in text and "slb_agents_online 2.0" in text  # the coordinator's own series

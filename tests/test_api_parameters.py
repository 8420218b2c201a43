"""Every parameter of the OpenAI and Ollama chat APIs is honoured or refused with a 400 naming it (issue 17.5).

Table-driven against the shared app cluster (tests/app_fixtures.py: the Ollama double behind one agent): each
refused parameter gets a 400 whose message and ``param`` name it, in each API's error shape; the honoured ones
arrive at the runtime in its own words (the double records every request body).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from app.api_parameters import OLLAMA_GENERATE_REFUSED, OLLAMA_REFUSED, OPENAI_REFUSED, ollama_keep_alive
from app.errors import BadRequest
from tests.app_support import OLLAMA_AGENT, RunningApp

pytest_plugins = ["tests.app_fixtures"]
pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "parameters"}]
OPENAI_REFUSED_VALUES: dict[str, Any] = {
    "n": 2, "logprobs": True, "top_logprobs": 3, "logit_bias": {"50256": -100}, "store": True,
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}, "reasoning_effort": "high",
    "verbosity": "low", "web_search_options": {}, "service_tier": "priority",
}
OLLAMA_REFUSED_VALUES: dict[str, Any] = {"think": True, "logprobs": True, "top_logprobs": 2, "truncate": False,
                                         "shift": False}
GENERATE_REFUSED_VALUES: dict[str, Any] = {"raw": True, "template": "{{ .Prompt }}", "suffix": "return x",
                                           "context": [1, 2, 3]}


def double_model(app: RunningApp) -> str:
    """A model only the agent on the Ollama double serves, so what reaches a runtime reaches the double."""
    models = httpx.get(f"{app.url}/v1/models", headers=app.headers, timeout=10).json()["data"]
    return next(item["id"] for item in models if item.get("slb_agents") == [OLLAMA_AGENT])


def test_every_refusal_has_a_value_here() -> None:
    """The tables below cover every refused parameter of app/api_parameters.py (a new one needs a test value)."""
    assert set(OPENAI_REFUSED_VALUES) == set(OPENAI_REFUSED)
    assert set(OLLAMA_REFUSED_VALUES) == set(OLLAMA_REFUSED)
    assert set(GENERATE_REFUSED_VALUES) == set(OLLAMA_GENERATE_REFUSED)


@pytest.mark.parametrize(("name", "value"), sorted(OPENAI_REFUSED_VALUES.items()))
def test_openai_refused_parameter_is_a_400_naming_it(app_cluster: RunningApp, name: str, value: Any) -> None:
    body = {"model": "auto", "messages": MESSAGES, name: value}
    response = httpx.post(f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and name in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_parameter"


@pytest.mark.parametrize(("name", "value"), sorted(OLLAMA_REFUSED_VALUES.items()))
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ollama_refused_parameter_is_a_400_naming_it(app_cluster: RunningApp, path: str, name: str,
                                                     value: Any) -> None:
    body = {"model": "auto", "messages": MESSAGES, "prompt": "parameters", "stream": False, name: value}
    response = httpx.post(f"{app_cluster.url}{path}", json=body, headers=app_cluster.headers)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and name in response.json()["error"]


@pytest.mark.parametrize(("name", "value"), sorted(GENERATE_REFUSED_VALUES.items()))
def test_generate_refused_parameter_is_a_400_naming_it(app_cluster: RunningApp, name: str, value: Any) -> None:
    body = {"model": "auto", "prompt": "parameters", "stream": False, name: value}
    response = httpx.post(f"{app_cluster.url}/api/generate", json=body, headers=app_cluster.headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{name}:")


def test_unknown_fields_openai_refuses_ollama_ignores(app_cluster: RunningApp) -> None:
    body = {"model": "auto", "messages": MESSAGES, "max_token": 5}  # a typo of max_tokens
    response = httpx.post(f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Unrecognized request argument supplied: max_token"
    assert response.json()["error"]["param"] == "max_token"
    body = {"model": "auto", "messages": MESSAGES, "stream_options": {"include_usage": True, "chunked": 1}}
    response = httpx.post(f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers)
    assert response.status_code == 400 and "stream_options.chunked" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n=1"):  # the SDK's own exception, with the reason
        openai.OpenAI(base_url=f"{app_cluster.url}/v1", api_key=app_cluster.api_key, max_retries=0).chat.completions \
            .create(model="auto", messages=MESSAGES, n=2)

    model = double_model(app_cluster)
    body = {"model": model, "messages": MESSAGES, "stream": False, "some_client_field": True}
    response = httpx.post(f"{app_cluster.url}/api/chat", json=body, headers=app_cluster.headers, timeout=60)
    assert response.status_code == 200, response.text  # as Ollama: unknown top-level fields are ignored
    body = {"model": model, "messages": MESSAGES, "stream": False, "options": {"temprature": 0.1}}
    response = httpx.post(f"{app_cluster.url}/api/chat", json=body, headers=app_cluster.headers)
    assert response.status_code == 400 and "options.temprature" in response.json()["error"]


def test_accepted_openai_parameters_without_effect_and_the_defaults_of_refused_ones(app_cluster: RunningApp) -> None:
    body = {"model": double_model(app_cluster), "messages": MESSAGES, "user": "user-1", "safety_identifier": "s",
            "metadata": {"k": "v"}, "prediction": {"type": "content", "content": "x"}, "n": 1, "logprobs": False,
            "store": False, "modalities": ["text"], "service_tier": "auto", "logit_bias": {},
            "parallel_tool_calls": True, "prompt_cache_key": "conversation-7"}
    response = httpx.post(f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers,
                          timeout=60)
    assert response.status_code == 200, response.text


def test_honoured_parameters_reach_the_runtime(app_cluster: RunningApp) -> None:
    double = app_cluster.double
    assert double is not None
    model = double_model(app_cluster)
    before = len(double.requests_to("/api/chat"))
    body = {"model": model, "messages": [{"role": "user", "content": "openai sampling"}], "temperature": 0.3,
            "top_p": 0.9, "seed": 7, "stop": ["zz"], "max_completion_tokens": 40, "presence_penalty": 0.5,
            "frequency_penalty": 0.25, "top_k": 12, "min_p": 0.05, "repeat_penalty": 1.1}
    response = httpx.post(f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers,
                          timeout=60)
    assert response.status_code == 200, response.text
    body = {"model": model, "messages": [{"role": "user", "content": "ollama options"}], "stream": False,
            "think": False, "keep_alive": "9m", "format": "json",
            "options": {"num_ctx": 2048, "repeat_last_n": 32, "use_mmap": True, "num_thread": 2}}
    response = httpx.post(f"{app_cluster.url}/api/chat", json=body, headers=app_cluster.headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"].startswith('{"answer": ')
    sent = {body["messages"][-1]["content"]: body for body in double.requests_to("/api/chat")[before:]}
    assert sent["openai sampling"]["options"] == {
        "temperature": 0.3, "top_p": 0.9, "seed": 7, "stop": ["zz"], "num_predict": 40, "presence_penalty": 0.5,
        "frequency_penalty": 0.25, "top_k": 12, "min_p": 0.05, "repeat_penalty": 1.1}
    ollama_body = sent["ollama options"]
    assert ollama_body["options"] == {"num_ctx": 2048, "repeat_last_n": 32, "use_mmap": True, "num_thread": 2}
    assert ollama_body["think"] is False and ollama_body["keep_alive"] == "9m" and ollama_body["format"] == "json"


def test_stream_obfuscation_is_added_when_asked(app_cluster: RunningApp) -> None:
    body = {"model": double_model(app_cluster), "messages": MESSAGES, "stream": True,
            "stream_options": {"include_obfuscation": True}}
    with httpx.stream("POST", f"{app_cluster.url}/v1/chat/completions", json=body, headers=app_cluster.headers,
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    with_text = [line for line in lines if '"content": "' in line and '"content": ""' not in line]
    assert with_text and all('"obfuscation": "' in line for line in with_text)


def test_keep_alive_is_checked_as_ollama_parses_it() -> None:
    assert ollama_keep_alive("10m") == "10m" and ollama_keep_alive("1h30m") == "1h30m"
    assert ollama_keep_alive(600) == 600.0 and ollama_keep_alive("-1") == -1.0 and ollama_keep_alive(None) is None
    for wrong in ("ten minutes", True, "5 m"):
        with pytest.raises(BadRequest, match="keep_alive"):
            ollama_keep_alive(wrong)

"""Any OpenAI-compatible server (llama.cpp server, llama-cpp-python, vLLM, LM Studio) over httpx with SSE.

Such servers cannot pull models: a model they do not list is a failed
assignment with a message saying so. A partial answer is sent as a trailing
assistant message with ``continue_final_message`` (vLLM's flag); whether the
server really continues it is probed (agent/runtime_profile.py), because
llama-cpp-python ignores it and starts a new turn.

The server's kind is learned from endpoints that generate nothing (docs/runtimes.md): llama-cpp-python
interrupts a running stream on any request that touches its model, ``GET /v1/models`` included, so its health
is checked with ``GET /openapi.json`` instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agent.backends.base import (
    TOOLS_REFUSAL,
    BackendError,
    BackendHealth,
    BackendUnreachable,
    ChatDelta,
    ChatDone,
    ChatEvent,
    ContextTooLong,
    ModelNotFound,
    PullProgress,
    RuntimeFacts,
    StreamBroken,
    ToolsUnsupported,
    Truncated,
    Unsupported,
    as_payload_messages,
    looks_like_context_error,
)
from agent.backends.lean_http import LeanHttp, chat_client
from broker.protocol import ChatMessage
from broker.protocol.messages import ToolCall
from broker.protocol.redaction import redact_url, split_credentials

logger = logging.getLogger(__name__)

OPTION_NAMES = {
    "num_predict": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
}
"""Ollama-style job options and their OpenAI request fields; others (num_ctx, ...) are dropped."""


def openai_response_format(wanted: str | dict[str, Any], kind: str | None) -> dict[str, Any]:
    """A job's ``format`` ("json" or a JSON schema) as the runtime's ``response_format``: OpenAI's
    ``json_object`` / ``json_schema``, except llama-cpp-python, whose server takes a schema only as
    ``{"type": "json_object", "schema": …}`` (it turns either into a grammar) and refuses ``json_schema``."""
    if not isinstance(wanted, dict):
        return {"type": "json_object"}
    if kind == "llama-cpp-python":
        return {"type": "json_object", "schema": wanted}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": wanted, "strict": True}}


HEALTH_TIMEOUT_S = 5.0
DETECT_TIMEOUT_S = 3.0
HEALTH_PATHS = {
    "llama.cpp": "/health",
    "llama-cpp-python": "/openapi.json",
    "vllm": "/health",
    "ollama": "/api/version",
}
"""Per runtime, a request that never touches the model (so never interrupts or queues behind an answer)."""
MODELS_PATH = "/v1/models"


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(response_text: str) -> str:
    try:
        body = json.loads(response_text)
    except json.JSONDecodeError:
        return response_text.strip()[:500] or "no body"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body)[:500]


def gather_tool_calls(calls: dict[int, dict[str, str]], pieces: Any) -> None:
    """Add one chunk's ``delta.tool_calls`` to the calls so far (by ``index``; ``arguments`` arrive in pieces)."""
    for piece in pieces if isinstance(pieces, list) else []:
        if not isinstance(piece, dict):
            continue
        index = piece.get("index") if isinstance(piece.get("index"), int) else len(calls)
        call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        function = piece.get("function") or {}
        if piece.get("id"):
            call["id"] = str(piece["id"])
        if function.get("name") and not call["name"]:  # sent once; a server that repeats it is not doubled
            call["name"] = str(function["name"])
        if function.get("arguments"):
            call["arguments"] += str(function["arguments"])


class OpenAIBackend:
    """An OpenAI-compatible ``/v1`` server."""

    name = "openai"
    simulated = False

    def __init__(self, url: str, *, api_key: str | None = None, connect_timeout_s: float = 5.0,
                 kind: str | None = None) -> None:
        self.declared_kind = kind
        self.kind: str | None = kind  # learned by detect(); decides the health check
        base = url.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base
        # A login in the URL goes to the client as basic auth; ``url`` is only shown (user:***@).
        base_url, auth = split_credentials(base)
        self.url = redact_url(base)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=30.0, pool=30.0)
        self._client = httpx.AsyncClient(base_url=base_url, auth=auth, headers=headers, timeout=timeout)
        # Streamed chat, on every answer's critical path, through the lean client where it can (lean_http.py).
        self._chat_client = chat_client(base_url, self._client, auth=auth, headers=headers,
                                        connect_timeout_s=connect_timeout_s)

    def _translate(self, error: BaseException, *, mid_stream: bool = False) -> BackendError:
        if isinstance(error, BackendError):
            return error
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
            return BackendUnreachable(self.url, str(error) or type(error).__name__)
        if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            where = "in the middle of an answer" if mid_stream else "unexpectedly"
            return StreamBroken(f"{self.label} closed the connection {where}: {error}")
        if isinstance(error, httpx.TimeoutException):
            return BackendError(f"{self.label} timed out: {type(error).__name__}")
        return BackendError(f"{type(error).__name__}: {error}")

    def _status_error(self, status: int, text: str, model: str | None = None) -> BackendError:
        message = _error_message(text)
        if looks_like_context_error(message):
            return ContextTooLong(message)
        if TOOLS_REFUSAL in message or ("tools" in message and "--jinja" in message):  # llama.cpp without --jinja
            return ToolsUnsupported(f"{message} ({self.label})")
        if status == 404 or "does not exist" in message or "not found" in message.lower():
            return ModelNotFound(message if model is None else f"{message} (model {model!r}, {self.label})")
        return BackendError(f"HTTP {status} from {self.label}: {message}")

    @property
    def label(self) -> str:
        """How messages name the runtime: its kind once known, and always its URL."""
        return f"the {self.kind or 'OpenAI-compatible'} runtime at {self.url}"

    @property
    def health_path(self) -> str:
        """The request health checks use; ``/v1/models`` only for runtimes not known to mind it."""
        return HEALTH_PATHS.get(self.kind or "", MODELS_PATH)

    async def health(self) -> BackendHealth:
        path = self.health_path
        try:
            response = await self._client.get(path, timeout=HEALTH_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - health never raises
            return BackendHealth(False, str(self._translate(error)))
        if response.status_code != 200:
            return BackendHealth(False, f"HTTP {response.status_code} from {self.url}{path}")
        if path != MODELS_PATH:
            return BackendHealth(True)
        try:
            data = response.json().get("data") or []
            models = tuple(sorted(str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")))
        except (ValueError, AttributeError, TypeError):
            models = None
        return BackendHealth(True, models=models)

    async def detect(self) -> RuntimeFacts:
        """Ask the endpoints each runtime has and the others lack; none of them generates or interrupts."""
        facts = await self._detect()
        self.kind = facts.kind
        return facts

    async def _get(self, path: str) -> httpx.Response | None:
        try:
            return await self._client.get(path, timeout=DETECT_TIMEOUT_S)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise BackendUnreachable(self.url, str(error) or type(error).__name__) from None
        except httpx.HTTPError:
            return None

    async def _detect(self) -> RuntimeFacts:
        if self.declared_kind:
            return RuntimeFacts(self.declared_kind, "declared (--runtime-kind)",
                                health_check=f"GET {HEALTH_PATHS.get(self.declared_kind, MODELS_PATH)}")
        response = await self._get("/api/version")
        body = _json_or_none(response) if response is not None and response.status_code == 200 else None
        if isinstance(body, dict) and isinstance(body.get("version"), str):
            return RuntimeFacts("ollama", "GET /api/version", version=body["version"],
                                health_check="GET /api/version")
        response = await self._get("/props")
        body = _json_or_none(response) if response is not None and response.status_code == 200 else None
        if isinstance(body, dict) and ("total_slots" in body or "default_generation_settings" in body):
            slots = body.get("total_slots")
            build = body.get("build_info")
            return RuntimeFacts("llama.cpp", "GET /props", version=str(build)[:100] if build else None,
                                reported_slots=slots if isinstance(slots, int) and slots > 0 else None,
                                health_check="GET /health")
        response = await self._get("/openapi.json")
        body = _json_or_none(response) if response is not None and response.status_code == 200 else None
        info = body.get("info") if isinstance(body, dict) else None
        title = str(info.get("title", "")) if isinstance(info, dict) else ""
        if "llama.cpp python" in title.lower() or "llama-cpp-python" in title.lower():
            version = info.get("version") if isinstance(info, dict) else None
            return RuntimeFacts("llama-cpp-python", "GET /openapi.json (title)",
                                version=str(version)[:100] if version else None,
                                health_check="GET /openapi.json (GET /v1/models would interrupt a running answer)")
        response = await self._get("/version")
        body = _json_or_none(response) if response is not None and response.status_code == 200 else None
        if isinstance(body, dict) and isinstance(body.get("version"), str):
            return RuntimeFacts("vllm", "GET /version", version=body["version"], health_check="GET /health")
        response = await self._get("/api/v0/models")
        if response is not None and response.status_code == 200:
            return RuntimeFacts("lm-studio", "GET /api/v0/models", health_check=f"GET {MODELS_PATH}")
        return RuntimeFacts("openai", "no runtime-specific endpoint answered", health_check=f"GET {MODELS_PATH}")

    async def list_models(self) -> list[str]:
        try:
            response = await self._client.get("/v1/models", timeout=10.0)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None
        if response.status_code != 200:
            raise self._status_error(response.status_code, response.text)
        data = response.json().get("data") or []
        return sorted(str(item["id"]) for item in data if isinstance(item, dict) and item.get("id"))

    async def pull(self, model: str) -> AsyncIterator[PullProgress]:
        served = await self.list_models()
        if model in served:
            yield PullProgress("present", None, None)
            return
        listed = ", ".join(served) or "nothing"
        raise ModelNotFound(
            f"model {model!r} is not served by {self.label} (it lists: {listed}); "
            "this backend cannot pull models: load the model on that server"
        )

    async def warm(self, model: str, keep_alive: str | None = None) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": False}
        try:
            response = await self._client.post("/v1/chat/completions", json=body)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None
        if response.status_code != 200:
            raise self._status_error(response.status_code, response.text, model)

    async def delete(self, model: str) -> None:
        raise Unsupported(f"{self.label} cannot delete models: "
                          "remove the model file on that machine and restart the server")

    async def unload(self, model: str) -> None:
        raise Unsupported(f"{self.label} cannot unload a model "
                          "on request: stop the server to free its memory")

    async def loaded_models(self) -> list[str] | None:
        return await self.list_models()  # such a server holds what it serves; called only while idle

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        options: dict[str, Any] | None = None,
        assistant_prefix: str | None = None,
        keep_alive: str | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: str | dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> AsyncIterator[ChatEvent]:
        body: dict[str, Any] = {
            "model": model,
            "messages": as_payload_messages(messages, assistant_prefix),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for key, value in (options or {}).items():
            if key in OPTION_NAMES:
                body[OPTION_NAMES[key]] = value
        if assistant_prefix:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if response_format is not None:
            body["response_format"] = openai_response_format(response_format, self.kind)
        if think is False:  # vLLM's and llama.cpp's switch for thinking models' chat templates
            body["chat_template_kwargs"] = {"enable_thinking": False}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        calls: dict[int, dict[str, str]] = {}  # OpenAI streams a call in pieces: id and name first, then arguments
        started = False
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        pieces = 0
        done = False
        try:
            async with self._chat_client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response.status_code, response.text, model)
                async for line in response.aiter_lines():
                    if done or not line.startswith("data:"):  # after [DONE]: read to the end, keep the connection
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise BackendError(_error_message(data))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content")
                        if text:
                            started = True
                            pieces += 1
                            yield ChatDelta(text)
                        if delta.get("tool_calls"):
                            started = True
                            pieces += 1
                            gather_tool_calls(calls, delta["tool_calls"])
                        finish_reason = choice.get("finish_reason") or finish_reason
                if not done and finish_reason is None:  # no [DONE] is fine after a finish reason (some omit it)
                    raise StreamBroken(f"{self.label} ended the stream without [DONE] after {pieces} piece(s)")
        except json.JSONDecodeError as error:
            raise BackendError(f"unreadable stream from {self.label}: {error}") from None
        except Exception as error:  # noqa: BLE001 - translated
            if done:  # the answer is complete; only the end of the body went wrong
                pass
            else:
                raise self._translate(error, mid_stream=started) from None
        if finish_reason is None:
            raise Truncated(
                f"{self.label} ended the answer after {pieces} piece(s) without a finish reason: it "
                "was cut short (llama-cpp-python interrupts a running answer whenever another request arrives)"
            )
        counted = usage.get("completion_tokens") is None
        yield ChatDone(
            done_reason=finish_reason,
            prompt_tokens=usage.get("prompt_tokens"),
            output_tokens=pieces if counted else usage.get("completion_tokens"),
            counted=counted,
            tool_calls=tuple(ToolCall(id=call["id"] or None, name=call["name"], arguments=call["arguments"])
                             for _, call in sorted(calls.items()) if call["name"]),
        )

    async def embed(self, model: str, inputs: list[str], keep_alive: str | None = None, *,
                    legacy: bool = False) -> Any:
        """Vectors from ``/v1/embeddings`` (agent/embeddings.py); llama-cpp-python serves it with ``--embedding``."""
        from agent.embeddings import openai_embed  # here: agent.embeddings imports this package

        try:
            return await openai_embed(self._client, lambda status, text: self._status_error(status, text, model),
                                      model, inputs, self.label)
        except BackendError:
            raise
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None

    async def close(self) -> None:
        await self._client.aclose()
        if isinstance(self._chat_client, LeanHttp):
            await self._chat_client.aclose()

"""Any OpenAI-compatible server (llama.cpp server, vLLM, LM Studio) over httpx with SSE streaming.

Such servers cannot pull models: a model they do not list is a failed
assignment with a message saying so. A partial answer is sent as a trailing
assistant message with ``continue_final_message`` (vLLM's flag; llama.cpp and
LM Studio ignore unknown fields and continue a trailing assistant message).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agent.backends.base import (
    BackendError,
    BackendHealth,
    BackendUnreachable,
    ChatDelta,
    ChatDone,
    ChatEvent,
    ContextTooLong,
    ModelNotFound,
    PullProgress,
    StreamBroken,
    as_payload_messages,
    looks_like_context_error,
)
from broker.protocol import ChatMessage

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


def _error_message(response_text: str) -> str:
    try:
        body = json.loads(response_text)
    except json.JSONDecodeError:
        return response_text.strip()[:500] or "no body"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body)[:500]


class OpenAIBackend:
    """An OpenAI-compatible ``/v1`` server."""

    name = "openai"
    simulated = False

    def __init__(self, url: str, *, api_key: str | None = None, connect_timeout_s: float = 5.0) -> None:
        base = url.rstrip("/")
        self.url = base[: -len("/v1")] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=30.0, pool=30.0)
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    def _translate(self, error: BaseException, *, mid_stream: bool = False) -> BackendError:
        if isinstance(error, BackendError):
            return error
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
            return BackendUnreachable(self.url, str(error) or type(error).__name__)
        if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            where = "in the middle of an answer" if mid_stream else "unexpectedly"
            return StreamBroken(f"backend at {self.url} closed the connection {where}: {error}")
        if isinstance(error, httpx.TimeoutException):
            return BackendError(f"backend at {self.url} timed out: {type(error).__name__}")
        return BackendError(f"{type(error).__name__}: {error}")

    def _status_error(self, status: int, text: str, model: str | None = None) -> BackendError:
        message = _error_message(text)
        if looks_like_context_error(message):
            return ContextTooLong(message)
        if status == 404 or "does not exist" in message or "not found" in message.lower():
            return ModelNotFound(message if model is None else f"{message} (model {model!r} at {self.url})")
        return BackendError(f"HTTP {status} from {self.url}: {message}")

    async def health(self) -> BackendHealth:
        try:
            response = await self._client.get("/v1/models", timeout=5.0)
        except Exception as error:  # noqa: BLE001 - health never raises
            return BackendHealth(False, str(self._translate(error)))
        if response.status_code != 200:
            return BackendHealth(False, f"HTTP {response.status_code} from {self.url}/v1/models")
        try:
            data = response.json().get("data") or []
            models = tuple(sorted(str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")))
        except (ValueError, AttributeError):
            models = None
        return BackendHealth(True, models=models)

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
            f"model {model!r} is not served by the OpenAI-compatible server at {self.url} (it lists: {listed}); "
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

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        options: dict[str, Any] | None = None,
        assistant_prefix: str | None = None,
        keep_alive: str | None = None,
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
        started = False
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        pieces = 0
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response.status_code, response.text, model)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise BackendError(_error_message(data))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            started = True
                            pieces += 1
                            yield ChatDelta(text)
                        finish_reason = choice.get("finish_reason") or finish_reason
                else:
                    raise StreamBroken(f"backend at {self.url} ended the stream without [DONE]")
        except json.JSONDecodeError as error:
            raise BackendError(f"unreadable stream from {self.url}: {error}") from None
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error, mid_stream=started) from None
        yield ChatDone(
            done_reason=finish_reason,
            prompt_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens", pieces),
        )

    async def close(self) -> None:
        await self._client.aclose()

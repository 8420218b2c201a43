"""Ollama: answers streamed with raw httpx, everything else through the official ``ollama`` client.

Ollama continues a trailing assistant message, so a partial answer from a
failed agent is sent as one and only the continuation comes back.

``chat`` reads ``/api/chat``'s JSON lines with ``json.loads`` over the lean
HTTP client (agent/backends/lean_http.py) instead of the ``ollama`` client,
which validates a pydantic object per token and goes through httpx: ~1.7 ms
sooner to the first token and cheaper per token (docs/benchmarks.md,
*Overhead*). Errors are mapped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama

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
    arguments_text,
    as_payload_messages,
    looks_like_context_error,
)
from agent.backends.lean_http import LeanHttp, chat_client
from broker.protocol import ChatMessage
from broker.protocol.messages import ToolCall
from broker.protocol.redaction import redact_url, split_credentials

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


def _seconds(nanoseconds: int | None) -> float | None:
    return nanoseconds / 1e9 if nanoseconds else None


def ollama_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> list[dict[str, Any]]:
    """The tools to offer Ollama, which has no ``tool_choice``: ``none`` offers none, a named function offers only
    that one (as close to forcing it as Ollama gets), ``auto`` and ``required`` offer all (docs/api.md "Tools")."""
    if not tools or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        named = [tool for tool in tools if (tool.get("function") or {}).get("name") == wanted]
        return named or list(tools)
    return list(tools)


def tool_calls_from_ollama(calls: Any) -> list[ToolCall]:
    """Ollama's ``message.tool_calls`` (arguments as an object) as the protocol's calls."""
    found: list[ToolCall] = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            continue
        call_id = call.get("id")
        found.append(ToolCall(id=str(call_id) if call_id else None, name=str(function["name"]),
                              arguments=arguments_text(function.get("arguments"))))
    return found


class OllamaBackend:
    """The default backend."""

    name = "ollama"
    simulated = False

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        # A login in the URL goes to the HTTP clients as basic auth; ``url`` is only shown (user:***@), so no
        # log line, error message or status message carries the password.
        self._base_url, self._auth = split_credentials(url.rstrip("/"))
        self.url = redact_url(url.rstrip("/"))
        # No read timeout: a cold model load can take minutes; the job runner watches for stalls itself.
        timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=30.0, pool=30.0)
        self._client = ollama.AsyncClient(host=self._base_url, timeout=timeout, auth=self._auth)
        self._stream_client = httpx.AsyncClient(base_url=self._base_url, timeout=timeout, auth=self._auth)
        # Streamed chat, on every answer's critical path, through the lean client where it can (lean_http.py).
        self._chat_client = chat_client(self._base_url, self._stream_client, auth=self._auth,
                                        connect_timeout_s=connect_timeout_s)

    def _translate(self, error: BaseException, *, mid_stream: bool = False) -> BackendError:
        """Map client and transport errors to the protocol's error codes, keeping Ollama's own message."""
        if isinstance(error, BackendError):
            return error
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError)):
            return BackendUnreachable(self.url, str(error) or type(error).__name__)
        if isinstance(error, ollama.ResponseError):
            message = str(error.error)
            if error.status_code == 404 or "not found" in message:
                return ModelNotFound(message)
            if looks_like_context_error(message):
                return ContextTooLong(message)
            if TOOLS_REFUSAL in message:
                return ToolsUnsupported(message)
            suffix = f" (HTTP {error.status_code})" if error.status_code and error.status_code > 0 else ""
            return BackendError(f"{message}{suffix}")
        if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            where = "in the middle of an answer" if mid_stream else "unexpectedly"
            return StreamBroken(f"backend at {self.url} closed the connection {where}: {error}")
        if isinstance(error, httpx.TimeoutException):
            return BackendError(f"backend at {self.url} timed out: {type(error).__name__}")
        if isinstance(error, httpx.HTTPError):
            return BackendError(f"HTTP error talking to {self.url}: {error}")
        return BackendError(f"{type(error).__name__}: {error}")

    async def health(self) -> BackendHealth:
        try:
            response = await asyncio.wait_for(self._client.list(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return BackendHealth(False, f"no answer from {self.url} within {HEALTH_TIMEOUT_S:.0f}s")
        except Exception as error:  # noqa: BLE001 - health never raises
            return BackendHealth(False, str(self._translate(error)))
        return BackendHealth(True, models=tuple(sorted(model.model for model in response.models if model.model)))

    async def detect(self) -> RuntimeFacts:
        try:
            async with httpx.AsyncClient(base_url=self._base_url, auth=self._auth, timeout=HEALTH_TIMEOUT_S) as client:
                response = await client.get("/api/version")  # the ollama client has no call for it
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None
        version = None
        with contextlib.suppress(ValueError, AttributeError):  # an old or odd server: the kind is still Ollama
            version = response.json().get("version")
        return RuntimeFacts("ollama", "backend ollama", version=str(version)[:100] if version else None,
                            health_check="GET /api/tags (never touches a running answer)")

    async def list_models(self) -> list[str]:
        try:
            response = await self._client.list()
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None
        return sorted(model.model for model in response.models if model.model)

    async def pull(self, model: str) -> AsyncIterator[PullProgress]:
        layers: dict[str, tuple[int, int]] = {}
        try:
            stream = await self._client.pull(model, stream=True)
            async with contextlib.aclosing(stream):
                async for part in stream:
                    if part.digest and part.total:
                        layers[part.digest] = (part.completed or 0, part.total)
                    completed = sum(done for done, _ in layers.values())
                    total = sum(size for _, size in layers.values())
                    yield PullProgress(part.status or "", completed if total else None, total or None)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None

    async def warm(self, model: str, keep_alive: str | None = None) -> None:
        try:  # Ollama's documented way to load a model: generate with an empty prompt
            await self._client.generate(model=model, prompt="", keep_alive=keep_alive)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None

    async def delete(self, model: str) -> None:
        try:
            await self._client.delete(model)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None

    async def unload(self, model: str) -> None:
        try:  # Ollama's documented way to unload: generate with an empty prompt and keep_alive 0
            await self._client.generate(model=model, prompt="", keep_alive=0)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None

    async def loaded_models(self) -> list[str] | None:
        try:
            response = await asyncio.wait_for(self._client.ps(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None
        return sorted(model.model for model in response.models if model.model)

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
        body: dict[str, Any] = {"model": model,
                                "messages": as_payload_messages(messages, assistant_prefix, "ollama"),
                                "stream": True}
        if options:
            body["options"] = options
        offered = ollama_tools(tools, tool_choice)
        if offered:
            body["tools"] = offered
        calls: list[ToolCall] = []
        if response_format is not None:  # "json" or a JSON schema, Ollama's own format field
            body["format"] = response_format
        if think is not None:
            body["think"] = think
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        started = finished = False
        try:
            async with self._chat_client.stream("POST", "/api/chat", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response.status_code, response.text)
                async for line in response.aiter_lines():
                    if finished or not line:  # read the body to its end: a response left unread costs its connection
                        continue
                    part = json.loads(line)
                    error = part.get("error")
                    if error:
                        raise self._translate(ollama.ResponseError(str(error)), mid_stream=started)
                    message = part.get("message") or {}
                    text = message.get("content")
                    if text:
                        started = True
                        yield ChatDelta(text)
                    if message.get("tool_calls"):
                        started = True
                        calls.extend(tool_calls_from_ollama(message["tool_calls"]))
                    if part.get("done"):
                        finished = True
                        yield ChatDone(
                            done_reason=part.get("done_reason"),
                            prompt_tokens=part.get("prompt_eval_count"),
                            output_tokens=part.get("eval_count"),
                            generation_s=_seconds(part.get("eval_duration")),
                            load_s=_seconds(part.get("load_duration")),
                            tool_calls=tuple(calls),
                        )
        except json.JSONDecodeError as error:
            if finished:
                return
            raise BackendError(f"unreadable stream from {self.url}: {error}") from None
        except Exception as error:  # noqa: BLE001 - translated
            if finished:  # the answer is complete; only the end of the body went wrong
                return
            raise self._translate(error, mid_stream=started) from None
        if not finished:
            raise StreamBroken(f"backend at {self.url} ended the answer without a final message")

    async def embed(self, model: str, inputs: list[str], keep_alive: str | None = None, *,
                    legacy: bool = False) -> Any:
        """Vectors from Ollama's ``/api/embed`` (agent/embeddings.py), errors mapped like chat's."""
        from agent.embeddings import ollama_embed  # here: agent.embeddings imports this package

        try:
            return await ollama_embed(self._stream_client, self._status_error, model, inputs, keep_alive, legacy)
        except BackendError:
            raise
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error) from None

    def _status_error(self, status: int, text: str) -> BackendError:
        """An HTTP error answer, mapped as the ``ollama`` client's ``ResponseError`` would be."""
        return self._translate(ollama.ResponseError(text or f"HTTP {status}", status))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()
        with contextlib.suppress(Exception):
            await self._stream_client.aclose()
        if isinstance(self._chat_client, LeanHttp):
            await self._chat_client.aclose()

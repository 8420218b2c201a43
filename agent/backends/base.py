"""The one small interface every inference backend implements, and its errors.

A backend is async and stateless towards the agent: the agent decides what to
pull, warm and run; the backend only talks to its server. Errors carry the
protocol's ``error_code`` so the job runner can answer with the right one.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.protocol import ChatMessage
from broker.protocol.messages import ToolCall


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull; byte counts summed over all layers seen so far."""

    status: str
    completed_bytes: int | None = None
    total_bytes: int | None = None

    @property
    def fraction(self) -> float | None:
        if not self.total_bytes or self.completed_bytes is None:
            return None
        return max(0.0, min(1.0, self.completed_bytes / self.total_bytes))


@dataclass(frozen=True)
class ChatDelta:
    """A piece of answer text (one or a few tokens)."""

    text: str


@dataclass(frozen=True)
class ChatDone:
    """The end of an answer, with the backend's own figures where it gives them."""

    done_reason: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    generation_s: float | None = None  # time spent producing output tokens (Ollama's eval_duration)
    load_s: float | None = None
    counted: bool = False  # output_tokens counted by the agent (streamed pieces): the runtime sent no usage
    tool_calls: tuple[ToolCall, ...] = ()  # complete function calls of the answer (docs/protocol.md "Tools")


ChatEvent = ChatDelta | ChatDone


@dataclass(frozen=True)
class BackendHealth:
    reachable: bool
    error: str | None = None
    version: str | None = None
    models: tuple[str, ...] | None = None  # local models, when the check listed them anyway


class BackendError(Exception):
    """A failure the agent reports to the coordinator; ``code`` is the protocol's error_code."""

    code = "backend_error"


class BackendUnreachable(BackendError):
    """The backend's server cannot be reached (not running, wrong URL, network)."""

    code = "backend_down"

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"backend unreachable at {url}: {detail}")


class ModelNotFound(BackendError):
    """The model is not present on the backend (and, for chat, must be pulled first)."""

    code = "model_missing"


class ContextTooLong(BackendError):
    """The prompt does not fit the model's context window."""

    code = "context_too_long"


class StreamBroken(BackendError):
    """The backend dropped the connection in the middle of an answer."""

    code = "backend_error"


class Unsupported(BackendError):
    """The runtime cannot do this (an OpenAI-compatible server cannot pull or delete models)."""

    code = "bad_job"


class ToolsUnsupported(BackendError):
    """The runtime refuses tools for this model (Ollama: "<model> does not support tools"), in its own words.

    ``bad_job``: the query fails at once with the runtime's answer instead of being retried elsewhere, as the
    runtime itself would answer (docs/api.md "Tools").
    """

    code = "bad_job"


TOOLS_REFUSAL = "does not support tools"
"""How Ollama words its refusal of tools for a model without them."""


class Truncated(BackendError):
    """The runtime ended the stream cleanly but without a finish reason: the answer was cut short.

    llama-cpp-python does this to a running stream whenever another request arrives (``--interrupt_requests``,
    on by default); taking it for a complete answer is how answers got silently cut.
    """

    code = "truncated"


@dataclass(frozen=True)
class RuntimeFacts:
    """What a backend learned about its server by asking endpoints that disturb nothing (no generation)."""

    kind: str
    detected_by: str
    version: str | None = None
    reported_slots: int | None = None
    health_check: str = ""


_CONTEXT_PATTERNS = re.compile(
    r"context (length|size|window)|exceeds? the (available )?context|too many tokens|maximum context|"
    r"prompt is too long|input length",
    re.IGNORECASE,
)


def looks_like_context_error(message: str) -> bool:
    """Servers word it differently (Ollama, llama.cpp, vLLM, LM Studio); match the usual phrasings."""
    return bool(_CONTEXT_PATTERNS.search(message))


@runtime_checkable
class Backend(Protocol):
    """What the agent needs from an inference server."""

    name: str
    url: str
    simulated: bool

    async def health(self) -> BackendHealth:
        """Reachable or not, with the error and the URL tried; never raises. Never disturbs a running answer."""
        ...

    async def detect(self) -> RuntimeFacts:
        """Which runtime serves ``url`` (kind, version, reported slots); raises BackendUnreachable."""
        ...

    async def list_models(self) -> list[str]:
        """Names of the models present locally; raises BackendUnreachable."""
        ...

    def pull(self, model: str) -> AsyncIterator[PullProgress]:
        """Download ``model``, yielding progress; raises BackendError with the server's own message."""
        ...

    async def warm(self, model: str, keep_alive: str | None = None) -> None:
        """Load ``model`` into memory so the first job does not pay for it."""
        ...

    async def delete(self, model: str) -> None:
        """Remove ``model`` from the machine; raises BackendError (with the runtime's words) where it cannot."""
        ...

    async def unload(self, model: str) -> None:
        """Free ``model``'s memory now (Ollama ``keep_alive: 0``); raises BackendError where it cannot."""
        ...

    async def loaded_models(self) -> list[str] | None:
        """Models in memory now, or None when the runtime does not say. Must not disturb a running answer."""
        ...

    def chat(
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
        """Stream the answer (only the continuation when ``assistant_prefix`` is given), then one ChatDone
        (with the answer's tool calls, when ``tools`` were given and the model called some)."""
        ...

    async def close(self) -> None:
        ...


def same_model(left: str, right: str) -> bool:
    """Ollama treats ``name`` and ``name:latest`` as one model."""
    return normalize_model_name(left) == normalize_model_name(right)


def normalize_model_name(name: str) -> str:
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def as_payload_messages(messages: list[ChatMessage], assistant_prefix: str | None,
                        dialect: str = "openai") -> list[dict[str, Any]]:
    """Messages as JSON in the runtime's ``dialect`` (``openai`` or ``ollama``: how tool calls and tool results
    are spelled); a partial answer becomes a trailing assistant message the server continues."""
    payload = [payload_message(message, dialect) for message in messages]
    if assistant_prefix:
        payload.append({"role": "assistant", "content": assistant_prefix})
    return payload


def payload_message(message: ChatMessage, dialect: str) -> dict[str, Any]:
    """One message; only plain ``role``/``content`` unless it carries tool calls or is a tool result."""
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:  # vision (agent/vision.py): Ollama's images list, OpenAI's content parts
        from agent.vision import openai_content

        if dialect == "ollama":
            item["images"] = list(message.images)
        else:
            item["content"] = openai_content(message.content, message.images)
    if message.tool_calls:
        item["tool_calls"] = [call_payload(call, dialect) for call in message.tool_calls]
    if message.role == "tool":
        if message.tool_call_id is not None and dialect == "openai":
            item["tool_call_id"] = message.tool_call_id
        if message.name:
            item["tool_name" if dialect == "ollama" else "name"] = message.name
    return item


def call_payload(call: ToolCall, dialect: str) -> dict[str, Any]:
    """A tool call as the runtime spells it: OpenAI's arguments are JSON text, Ollama's an object."""
    if dialect == "ollama":
        return {"function": {"name": call.name, "arguments": arguments_object(call.arguments)}}
    item: dict[str, Any] = {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    if call.id is not None:
        item = {"id": call.id, **item}
    return item


def arguments_object(arguments: str) -> Any:
    """The argument object of a call whose arguments are JSON text (text that is not JSON stays text)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def arguments_text(arguments: Any) -> str:
    """Ollama's argument object as JSON text, compact as Ollama's own ``/v1`` writes it."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False, separators=(",", ":"))

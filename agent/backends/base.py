"""The one small interface every inference backend implements, and its errors.

A backend is async and stateless towards the agent: the agent decides what to
pull, warm and run; the backend only talks to its server. Errors carry the
protocol's ``error_code`` so the job runner can answer with the right one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.protocol import ChatMessage


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
    ) -> AsyncIterator[ChatEvent]:
        """Stream the answer (only the continuation when ``assistant_prefix`` is given), then one ChatDone."""
        ...

    async def close(self) -> None:
        ...


def same_model(left: str, right: str) -> bool:
    """Ollama treats ``name`` and ``name:latest`` as one model."""
    return normalize_model_name(left) == normalize_model_name(right)


def normalize_model_name(name: str) -> str:
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def as_payload_messages(messages: list[ChatMessage], assistant_prefix: str | None) -> list[dict[str, str]]:
    """Messages as JSON; a partial answer becomes a trailing assistant message the server continues."""
    payload = [{"role": message.role, "content": message.content} for message in messages]
    if assistant_prefix:
        payload.append({"role": "assistant", "content": assistant_prefix})
    return payload

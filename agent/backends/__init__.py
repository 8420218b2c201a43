"""Inference backends behind one interface (see :mod:`agent.backends.base`)."""

from __future__ import annotations

from agent.backends.base import (
    Backend,
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
    normalize_model_name,
    same_model,
)
from agent.settings import AgentSettings


def make_backend(settings: AgentSettings) -> Backend:
    """The backend the settings ask for (imports only what that backend needs)."""
    if settings.backend == "simulated":
        from agent.backends.simulated import SimulatedBackend

        return SimulatedBackend(
            tokens_per_s=settings.sim_tokens_per_s, ttft_s=settings.sim_ttft_ms / 1000, pull_s=settings.sim_pull_s
        )
    if settings.backend == "openai":
        from agent.backends.openai_backend import OpenAIBackend

        key = settings.backend_api_key.get_secret_value() if settings.backend_api_key else None
        return OpenAIBackend(settings.resolved_backend_url, api_key=key, kind=settings.runtime_kind)
    from agent.backends.ollama_backend import OllamaBackend

    return OllamaBackend(settings.resolved_backend_url)


__all__ = [
    "Backend",
    "BackendError",
    "BackendHealth",
    "BackendUnreachable",
    "ChatDelta",
    "ChatDone",
    "ChatEvent",
    "ContextTooLong",
    "ModelNotFound",
    "PullProgress",
    "StreamBroken",
    "make_backend",
    "normalize_model_name",
    "same_model",
]

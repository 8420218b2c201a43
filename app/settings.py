"""Settings of the web process (``python -m app``).

The web process hosts the coordinator, so its settings extend the
coordinator's; everything here is about the web surface. Defaults are the
safe ones: loopback only, no CORS beyond loopback, no API key needed because
nothing outside this machine can connect. Listening on the LAN
(``--host 0.0.0.0``) is the moment to set ``SLB_API_KEY`` and a UI login.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator

from broker.coordinator.settings import CoordinatorSettings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
LOOPBACK_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"
"""Browser origins always allowed to call the HTTP API (pages served from this machine)."""


class AppSettings(CoordinatorSettings):
    """Web app: Gradio UI, scriptable API and the OpenAI/Ollama-compatible HTTP API on one port."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on; 127.0.0.1 keeps the app on this machine, 0.0.0.0 opens it to the LAN.",
    )
    port: int = Field(default=7860, ge=1, le=65535, description="Port for the UI, its API and the HTTP API.")
    api_key: SecretStr | None = Field(
        default=None, description="When set, /v1 and /api require 'Authorization: Bearer <key>'."
    )
    ui_username: str | None = Field(default=None, description="When set with --ui-password, the UI asks for a login.")
    ui_password: SecretStr | None = Field(default=None, description="Password of the UI login.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Extra browser origins allowed to call the HTTP API (JSON list); loopback origins always are.",
    )
    max_upload_mb: float = Field(default=20.0, gt=0, le=1024, description="Largest document upload, in MB.")
    chat_concurrency: int = Field(
        default=16, ge=1, le=1024, description="Chat answers streamed at once through the UI (more wait in line)."
    )
    upload_concurrency: int = Field(
        default=2, ge=1, le=64, description="Document uploads embedded at once (embedding is CPU-heavy)."
    )
    stream_updates_per_s: float = Field(
        default=10.0, gt=0, le=100, description="Most UI updates per second per streamed answer (browsers keep up)."
    )
    history_budget_tokens: int = Field(
        default=3000, ge=0, le=1_000_000, description="Tokens of earlier chat sent with each new question."
    )
    rag_top_k: int = Field(default=4, ge=1, le=20, description="Document chunks put into a RAG prompt.")
    rag_warm_up: bool = Field(
        default=True, description="Load the embedding model at start, so the first upload or search is quick."
    )
    embedding_model: str = Field(
        default="all-MiniLM-L6-v2", description="Sentence-transformers model for document search."
    )
    max_prompt_chars: int = Field(
        default=100_000, ge=100, le=400_000, description="Longest prompt (all messages together) the API accepts."
    )
    max_messages: int = Field(default=500, ge=1, le=1000, description="Most messages in one API request.")
    unread_result_ttl_s: float = Field(
        default=120.0, ge=1, le=3600,
        description="How long the result of a Gradio API call (/gradio_api/call/...) waits to be fetched.",
    )
    cluster_refresh_s: float = Field(
        default=2.0, ge=0.5, le=60, description="Seconds between refreshes of the live cluster view."
    )
    history_window_s: float = Field(
        default=600.0, ge=30, le=86400, description="How far back the cluster plots of tokens/s and load reach."
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _check_login(self) -> AppSettings:
        if (self.ui_username is None) != (self.ui_password is None):
            raise ValueError("set both --ui-username and --ui-password, or neither")
        if "*" in self.cors_origins:
            raise ValueError("a wildcard CORS origin is not allowed; list the origins that may call the API")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def api_body_limit(self) -> int:
        """Largest body of /v1 and /api: the longest prompt, every character JSON-escaped, plus the rest."""
        return self.max_prompt_chars * 4 + 65_536

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK_HOSTS

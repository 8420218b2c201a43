"""Settings of the web process (``python -m app``).

The web process hosts the coordinator, so its settings extend the
coordinator's; everything here is about the web surface. Defaults are the
safe ones: loopback only, no CORS beyond loopback, no API key needed because
nothing outside this machine can connect. Listening on the LAN
(``--host 0.0.0.0``) is the moment to set ``SLB_API_KEY`` and a UI login.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from app.users import UserDirectory, UsersError, check_user_name, read_users_file, split_user_entry
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
    ui_users: list[SecretStr] = Field(
        default_factory=list,
        description="More UI users, each 'name:password'; repeat --ui-user NAME:PASSWORD (the environment takes a "
        "JSON list). Every user has their own chats. Prefer --ui-users-file: flags show in 'ps'.",
    )
    ui_users_file: Path | None = Field(
        default=None,
        description="File of UI users, one 'name:scrypt$...' line each (make one with 'python -m app.users NAME'); "
        "read at start.",
    )
    api_user: str = Field(
        default="api",
        description="With a UI login: the user a script is when it sends the API key to the UI's API "
        "(/gradio_api); it sees that user's chats.",
    )
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
    rag_cluster_embeddings: str | None = Field(
        default=None,
        description="Embed document uploads on the cluster's agents serving this model (e.g. all-minilm, Ollama's "
        "all-MiniLM-L6-v2) instead of this machine's CPU; queries stay local. Only the same model as "
        "--embedding-model may be used (docs/rag.md). Empty: off.",
    )
    rag_relevance_floor: float = Field(
        default=0.32,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity a passage needs to be cited (calibrated for all-MiniLM-L6-v2; docs/rag.md).",
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

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL database for chats and documents shared by several app instances "
        "(postgresql://user:password@host:5432/name; docs/scale-out.md). Empty: SQLite and LanceDB in --data-dir.",
    )

    allow_remote_images: bool = Field(
        default=False,
        description="Fetch http(s) image URLs of OpenAI image_url parts in the app (5 s, 512 KB, PNG/JPEG/GIF/WebP, "
        "public addresses only); off: only data: URLs are accepted (docs/api.md 'Images').",
    )
    allow_local_image_urls: bool = Field(
        default=False,
        description="With --allow-remote-images, also fetch from loopback, private and link-local addresses (the "
        "app's own machine and LAN: leave off unless every API caller is trusted).",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a PostgreSQL URL (postgresql://user:password@host:port/name)")
        return value

    @field_validator("rag_cluster_embeddings", mode="after")
    @classmethod
    def _empty_is_off(cls, value: str | None) -> str | None:
        return (value or "").strip() or None

    @model_validator(mode="after")
    def _check_cluster_embeddings(self) -> AppSettings:
        """Refuse at start a cluster model whose vectors could not share the local index (docs/rag.md)."""
        if self.rag_cluster_embeddings is not None:
            from app.store.cluster_embedder import check_cluster_model

            check_cluster_model(self.embedding_model, self.rag_cluster_embeddings)
        return self

    @model_validator(mode="after")
    def _check_login(self) -> AppSettings:
        if (self.ui_username is None) != (self.ui_password is None):
            raise ValueError("set both --ui-username and --ui-password, or neither")
        if "*" in self.cors_origins:
            raise ValueError("a wildcard CORS origin is not allowed; list the origins that may call the API")
        try:
            check_user_name(self.api_user)
            self._plain_users()
            if self.ui_users_file is not None:
                read_users_file(self.ui_users_file)
        except UsersError as error:
            raise ValueError(str(error)) from None
        return self

    def _plain_users(self) -> list[tuple[str, str]]:
        """The users with a password given in the settings (--ui-username and every --ui-user)."""
        users: list[tuple[str, str]] = []
        if self.ui_username is not None and self.ui_password is not None:
            users.append((check_user_name(self.ui_username.strip()), self.ui_password.get_secret_value()))
        users += [split_user_entry(entry.get_secret_value()) for entry in self.ui_users]
        names = [name for name, _ in users]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UsersError(f"user {twice[0]!r} is given twice")
        return users

    @property
    def login_enabled(self) -> bool:
        """Whether the UI asks for a login (then every user has their own chats)."""
        return self.ui_username is not None or bool(self.ui_users) or self.ui_users_file is not None

    def user_directory(self) -> UserDirectory | None:
        """Everyone who may log in (hashed at start), or None when the UI has no login."""
        if not self.login_enabled:
            return None
        hashed = read_users_file(self.ui_users_file) if self.ui_users_file is not None else {}
        return UserDirectory.build(self._plain_users(), hashed)

    @field_validator("ui_users", mode="before")
    @classmethod
    def _one_user(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [value]  # SLB_UI_USERS=name:password, one user
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def api_body_limit(self) -> int:
        """Largest body of /v1 and /api: the longest prompt, every character JSON-escaped, plus the rest, plus a
        question's images as base64 (app/images.py: 640 KB decoded, ~880,000 characters)."""
        return self.max_prompt_chars * 4 + 65_536 + 900_000

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK_HOSTS


USER_FLAG = "--ui-user"


def fold_user_flags(argv: Sequence[str]) -> list[str]:
    """Turn repeated ``--ui-user NAME:PASSWORD`` flags into the one ``--ui-users`` JSON list the settings read.

    The settings command line has one flag per field (broker/mqtt/cli.py), and a list field takes JSON; people
    want to repeat a flag. ``--ui-users`` given as well is merged.
    """
    import json

    entries: list[str] = []
    rest: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item == USER_FLAG and index + 1 < len(items):
            entries.append(items[index + 1])
            index += 2
            continue
        if item.startswith(USER_FLAG + "="):
            entries.append(item.split("=", 1)[1])
        elif item == "--ui-users" and index + 1 < len(items):
            given = items[index + 1]
            try:
                parsed = json.loads(given)
            except ValueError:
                parsed = [given]
            entries.extend(parsed if isinstance(parsed, list) else [given])
            index += 2
            continue
        else:
            rest.append(item)
        index += 1
    if entries:
        rest += ["--ui-users", json.dumps(entries)]
    return rest

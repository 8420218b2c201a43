"""What a chat is: its settings, sessions and messages as callers see them, and the checks on input.

Shared by both session stores (SQLite in app/store/sessions.py, PostgreSQL in app/store/sessions_postgres.py),
so the two give the same answers and the same errors; the SQL they share is in app/store/sessions_sql.py.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import refuse_lone_surrogates
from app.store.errors import BadInputError, NotFoundError
from broker.coordinator.contract import Aggregation, RoutingMode

logger = logging.getLogger(__name__)


Role = Literal["system", "user", "assistant"]
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})
MessageStatus = Literal["ok", "error", "stopped"]
STATUSES: frozenset[str] = frozenset({"ok", "error", "stopped"})

SHARED_USER = "(shared)"
"""The owner of every chat when the app has no login (and of chats made before users existed). The brackets
keep it apart from real user names, which cannot hold them (app/users.py)."""
MAX_OWNER_CHARS = 128
MAX_SYSTEM_PROMPT_CHARS = 20_000
MAX_ANSWER_TOKENS = 1_000_000
MAX_NAME_CHARS = 300
"""Longest mode (a model name) or agent id a chat's settings may hold."""
MAX_ERROR_CHARS = 4000
MAX_TRIED = 64

DEFAULT_TITLE = "New chat"
TITLE_CHARS = 60
MAX_TITLE_CHARS = 200
MAX_MESSAGE_CHARS = 1_000_000
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4



def estimate_tokens(text: str) -> int:
    """Rough token count: ~4 characters per token for English with BPE tokenizers.

    Good enough to keep a prompt under a model's context window; it
    underestimates code and non-Latin scripts (more tokens per character), so
    budgets should keep a margin.
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def make_title(question: str, limit: int = TITLE_CHARS) -> str:
    """Title a chat from its first question: whitespace collapsed, cut at a word boundary."""
    text = " ".join(question.split())
    if not text:
        return DEFAULT_TITLE
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,.;:-") + "…"


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)


class ChatSettings(BaseModel):
    """How a chat asks, kept with the chat so reopening it restores them; a question's own arguments win."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str = Field(
        default="", max_length=MAX_SYSTEM_PROMPT_CHARS,
        description="Sent first, as a system message, with every question.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="None: the model's default.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_ANSWER_TOKENS, description="Longest answer in tokens; None: the model's default."
    )
    mode: str = Field(
        default=RoutingMode.AUTO.value, min_length=1, max_length=MAX_NAME_CHARS,
        description="auto, quality, all, or a model name.",
    )
    agent: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="Only this machine answers; None: routing chooses."
    )
    use_rag: bool = False
    aggregation: Aggregation = Aggregation.CONSENSUS

    @field_validator("system_prompt", "mode", "agent", mode="before")
    @classmethod
    def _clean_text(cls, value: object) -> object:
        if isinstance(value, str):
            refuse_lone_surrogates("a chat setting", value)
        return value

    @field_validator("mode")
    @classmethod
    def _strip_mode(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("mode must not be empty")
        return value

    @field_validator("agent")
    @classmethod
    def _strip_agent(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None

    @classmethod
    def parse(cls, value: ChatSettings | dict[str, Any] | None) -> ChatSettings:
        """Settings from a model, a dict (the script API) or None (defaults); bad values: :class:`BadInputError`."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise BadInputError(f"chat settings must be an object, got {type(value).__name__}")
        try:
            return cls.model_validate(value)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item.get('loc', ())) or 'settings'}: {item.get('msg', 'invalid')}"
                for item in error.errors()[:5]
            )
            raise BadInputError(f"invalid chat settings: {problems}") from None


class SessionInfo(BaseModel):
    """One chat session as the session list shows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    title_is_custom: bool = False
    owner: str = SHARED_USER
    settings: ChatSettings = Field(default_factory=ChatSettings)


class ChatMessage(BaseModel):
    """One stored message; answers also record who answered and how."""

    model_config = ConfigDict(frozen=True)

    id: int
    session_id: str
    role: Role
    content: str
    created_at: datetime
    agents: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    mode: str | None = None
    citations: list[dict[str, Any]] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    status: MessageStatus = "ok"
    """``error``: the answer failed (``error`` says why; ``content`` is what arrived first, often nothing);
    ``stopped``: the user or the app stopped it; ``content`` is what arrived."""
    error: str | None = None
    tried: list[str] = Field(default_factory=list)
    """Every agent the cluster tried for this answer (``agents``: those whose text it is)."""

    def to_prompt(self) -> dict[str, str]:
        """The message as a chat-completion message (``{role, content}``)."""
        return {"role": self.role, "content": self.content}

    @property
    def estimated_tokens(self) -> int:
        return estimate_tokens(self.content) + MESSAGE_OVERHEAD_TOKENS


def json_column(value: Any, name: str, kind: type) -> str:
    if value is None:
        value = kind()
    if not isinstance(value, kind):
        raise BadInputError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError) as error:
        raise BadInputError(f"{name} is not JSON-serialisable: {error}") from error


def _json_default(value: Any) -> Any:
    """Let callers pass pydantic models (e.g. citations) and datetimes without dumping them first."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def string_list(value: Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        raise BadInputError(f"{name} must be a list of strings")
    return list(value)


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_CHARS:
        raise BadInputError(f"owner must be a user name of 1 to {MAX_OWNER_CHARS} characters")
    return owner


def unknown_session(session_id: str) -> NotFoundError:
    """The one answer for a session that does not exist *or* belongs to someone else (nothing leaks)."""
    return NotFoundError(f"chat session {session_id!r} does not exist")



def stored_settings(session_id: str, text: str) -> ChatSettings:
    """A session's stored settings; ones this version cannot read (written by a newer one, or damaged) fall back
    to the defaults, for that session only, instead of making the whole list fail."""
    try:
        return ChatSettings.model_validate_json(text or "{}")
    except ValidationError:
        logger.warning("chat session %s: stored settings are not readable; using the defaults", session_id)
        return ChatSettings()


def without_failed_turns(history: list[ChatMessage]) -> list[ChatMessage]:
    """The conversation a model should see: no failed answer, no question whose answer failed, no empty stop.

    The newest user message always stays (it is the question being asked now, e.g. on regenerate).
    """
    newest_user = max((index for index, message in enumerate(history) if message.role == "user"), default=None)
    dropped: set[int] = set()
    for index, message in enumerate(history):
        if message.role != "assistant":
            continue
        if message.status == "error" or (message.status == "stopped" and not message.content.strip()):
            dropped.add(index)
            question = index - 1
            if question >= 0 and history[question].role == "user" and question != newest_user:
                dropped.add(question)
    return [message for index, message in enumerate(history) if index not in dropped]

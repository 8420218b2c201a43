"""Chat sessions in SQLite.

Why SQLite with WAL: the web app answers from many worker threads at once; WAL
lets readers run while one writer commits, and a crash never leaves a half
written message. Each thread gets its own connection (sqlite3 connections must
not be shared across threads without care); writes from this process are
serialised by a lock so threads queue in Python instead of spinning on
SQLITE_BUSY, and ``busy_timeout`` covers another process on the same file.

Interface (issue 14; the chat UI is built on it):

* Every session belongs to one user, its ``owner`` (:data:`SHARED_USER` when the app has no login). Every method
  that takes a session id takes ``owner=`` and answers another user's session exactly like one that does not
  exist (:class:`NotFoundError`, same message), so ids leak nothing. ``owner`` defaults to :data:`SHARED_USER`;
  callers with a logged-in user must pass it (``app.ui.users.user_of(request)``).
* A session carries its :class:`ChatSettings` (system prompt, temperature, max tokens, mode, agent, RAG,
  aggregation): ``create_session(title, owner=, settings=)``, ``update_settings(id, settings, owner=)``.
* Every answer is stored with its outcome: ``ChatMessage.status`` is ``ok``, ``error`` (``error`` holds the
  text, ``content`` what arrived before the failure) or ``stopped``; ``agents`` are the agents that wrote the
  text (none for an error), ``tried`` every agent the cluster tried. Failed turns (the error and the question
  it answers) never go into :meth:`SessionStore.history_for_prompt`.
* ``truncate_from(id, message_id, owner=)`` deletes a message and everything after it (regenerate, edit).

Note for the UI (names differ from the first brief on purpose): in :class:`app.service.AppService` the chat's
user is ``user=`` (``ask(..., user=user_of(request), owner=request.session_hash)``; ``owner=`` there stays the
browser session that the Stop button cancels). ``regenerate(session_id, *, user, owner=None, **ask_overrides)``,
``edit_and_resend(session_id, message_id, new_text, *, user, owner=None, **ask_overrides)``; both refuse
(BadRequest) while an answer of that chat still streams. ``ask(mode=None, aggregation=None, use_rag=None,
agent=None)`` take the chat's settings; ``agent=""`` means "routing chooses". ``user_of`` is in app/ui/users.py.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import refuse_lone_surrogates
from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    title_is_custom INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    agents TEXT NOT NULL DEFAULT '[]',
    models TEXT NOT NULL DEFAULT '[]',
    mode TEXT,
    citations TEXT NOT NULL DEFAULT '[]',
    stats TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, id);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions(updated_at DESC);
"""
_ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "sessions": [
        ("owner", f"TEXT NOT NULL DEFAULT '{SHARED_USER}'"),
        ("settings", "TEXT NOT NULL DEFAULT '{}'"),
    ],
    "messages": [
        ("status", "TEXT NOT NULL DEFAULT 'ok'"),
        ("error", "TEXT"),
        ("tried", "TEXT NOT NULL DEFAULT '[]'"),
    ],
}
"""Columns added after the first release: an older database gets them in place (``ALTER TABLE ... ADD COLUMN``
with these defaults), so its chats stay, owned by :data:`SHARED_USER`, with default settings, all answers ``ok``."""
_INDEXES_AFTER_MIGRATION = (
    "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated_at DESC);"
)
SCHEMA_VERSION = 2


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


def _utc(timestamp: float) -> datetime:
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


def _json_column(value: Any, name: str, kind: type) -> str:
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


def _string_list(value: Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        raise BadInputError(f"{name} must be a list of strings")
    return list(value)


def _owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_CHARS:
        raise BadInputError(f"owner must be a user name of 1 to {MAX_OWNER_CHARS} characters")
    return owner


def _unknown(session_id: str) -> NotFoundError:
    """The one answer for a session that does not exist *or* belongs to someone else (nothing leaks)."""
    return NotFoundError(f"chat session {session_id!r} does not exist")


class SessionStore:
    """Chat sessions and their messages, safe to call from any thread."""

    def __init__(self, db_path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        connection = self._connection()
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("SQLite at %s runs in %s mode, not WAL (network filesystem?)", self.db_path, mode)
        with self._write_lock:
            connection.executescript(_SCHEMA)
            self._migrate(connection)
        logger.debug("session store ready at %s", self.db_path)

    def _migrate(self, connection: sqlite3.Connection) -> None:
        """Bring a database made by an older version up to date in place; its chats stay as they were."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in _ADDED_COLUMNS.items():
                present = {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns:
                    if name not in present:
                        connection.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                        logger.info("session store %s: added column %s.%s", self.db_path, table, name)
            connection.execute(_INDEXES_AFTER_MIGRATION)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    # -- connections -----------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("session store is closed")
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # isolation_level=None: autocommit; transactions are opened explicitly with BEGIN IMMEDIATE.
            connection = sqlite3.connect(
                self.db_path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error."""
        connection = self._connection()
        with self._write_lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction, so an ownership check and what follows see the same snapshot."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection; the store is unusable afterwards."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.close()
            except sqlite3.Error:
                logger.debug("closing a session-store connection failed", exc_info=True)

    @staticmethod
    def _check_owner(connection: sqlite3.Connection, session_id: str, owner: str) -> sqlite3.Row:
        """The session's row if ``owner`` owns it; otherwise the same "does not exist" as for an unknown id."""
        if not isinstance(session_id, str):
            raise BadInputError(f"session_id must be text, got {type(session_id).__name__}")
        row = connection.execute(
            "SELECT title_is_custom, owner FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        if row is None or row["owner"] != owner:
            raise _unknown(session_id)
        return row

    # -- sessions ----------------------------------------------------------

    def create_session(
        self,
        title: str | None = None,
        *,
        owner: str = SHARED_USER,
        settings: ChatSettings | dict[str, Any] | None = None,
    ) -> SessionInfo:
        """A new, empty session of ``owner``; without a title it is named after its first question."""
        owner = _owner(owner)
        chat_settings = ChatSettings.parse(settings)
        custom = title is not None
        clean_title = self._clean_title(title) if custom else DEFAULT_TITLE
        session_id = uuid.uuid4().hex
        now = time.time()
        with self._write() as connection:
            connection.execute(
                "INSERT INTO sessions (id, title, title_is_custom, created_at, updated_at, owner, settings)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, clean_title, int(custom), now, now, owner, chat_settings.model_dump_json()),
            )
        logger.info("created chat session %s", session_id)
        return SessionInfo(
            id=session_id,
            title=clean_title,
            created_at=_utc(now),
            updated_at=_utc(now),
            message_count=0,
            title_is_custom=custom,
            owner=owner,
            settings=chat_settings,
        )

    _SESSION_COLUMNS = (
        "SELECT s.id, s.title, s.title_is_custom, s.created_at, s.updated_at, s.owner, s.settings,"
        " (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS message_count FROM sessions s"
    )

    def list_sessions(self, limit: int | None = None, *, owner: str = SHARED_USER) -> list[SessionInfo]:
        """The sessions of ``owner``, most recent activity first."""
        owner = _owner(owner)
        sql = self._SESSION_COLUMNS + " WHERE s.owner = ? ORDER BY s.updated_at DESC, s.created_at DESC, s.rowid DESC"
        parameters: tuple[Any, ...] = (owner,)
        if limit is not None:
            if limit < 0:
                raise BadInputError("limit must not be negative")
            sql += " LIMIT ?"
            parameters = (owner, limit)
        rows = self._connection().execute(sql, parameters).fetchall()
        return [self._session_from_row(row) for row in rows]

    def get_session(self, session_id: str, *, owner: str = SHARED_USER) -> SessionInfo:
        owner = _owner(owner)
        row = self._connection().execute(self._SESSION_COLUMNS + " WHERE s.id = ?", (session_id,)).fetchone()
        if row is None or row["owner"] != owner:
            raise _unknown(session_id)
        return self._session_from_row(row)

    def rename_session(self, session_id: str, title: str, *, owner: str = SHARED_USER) -> SessionInfo:
        """Give a session a title of the user's choosing; later questions no longer retitle it."""
        owner = _owner(owner)
        clean_title = self._clean_title(title)
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE sessions SET title = ?, title_is_custom = 1 WHERE id = ? AND owner = ?",
                (clean_title, session_id, owner),
            )
            if cursor.rowcount == 0:
                raise _unknown(session_id)
        return self.get_session(session_id, owner=owner)

    def update_settings(
        self, session_id: str, settings: ChatSettings | dict[str, Any], *, owner: str = SHARED_USER
    ) -> SessionInfo:
        """Replace a session's :class:`ChatSettings` (a dict is validated; missing keys take their defaults)."""
        owner = _owner(owner)
        chat_settings = ChatSettings.parse(settings)
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE sessions SET settings = ? WHERE id = ? AND owner = ?",
                (chat_settings.model_dump_json(), session_id, owner),
            )
            if cursor.rowcount == 0:
                raise _unknown(session_id)
        return self.get_session(session_id, owner=owner)

    def delete_session(self, session_id: str, *, owner: str = SHARED_USER) -> None:
        """Delete a session and, through the foreign key's cascade, every message in it."""
        owner = _owner(owner)
        with self._write() as connection:
            cursor = connection.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
            if cursor.rowcount == 0:
                raise _unknown(session_id)
        logger.info("deleted chat session %s", session_id)

    # -- messages ----------------------------------------------------------

    def add_message(
        self,
        session_id: str,
        role: Role,
        content: str,
        *,
        owner: str = SHARED_USER,
        agents: Sequence[str] | None = None,
        models: Sequence[str] | None = None,
        mode: str | None = None,
        citations: Sequence[Any] | None = None,
        stats: dict[str, Any] | None = None,
        status: MessageStatus = "ok",
        error: str | None = None,
        tried: Sequence[str] | None = None,
    ) -> ChatMessage:
        """Append a message; the first user message titles an untitled session."""
        owner = _owner(owner)
        if role not in ROLES:
            raise BadInputError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadInputError(f"content must be text, got {type(content).__name__}")
        if len(content) > MAX_MESSAGE_CHARS:
            raise TooLargeError(f"message has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}")
        if mode is not None and not isinstance(mode, str):
            raise BadInputError("mode must be text or None")
        if status not in STATUSES:
            raise BadInputError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
        if status != "ok" and role != "assistant":
            raise BadInputError("only an answer (role assistant) can have failed or been stopped")
        if error is not None and not isinstance(error, str):
            raise BadInputError("error must be text or None")
        error = error[:MAX_ERROR_CHARS] if error else None
        agents_list = _string_list(agents, "agents")
        models_list = _string_list(models, "models")
        tried_list = _string_list(tried, "tried")[:MAX_TRIED]
        citations_json = _json_column(list(citations) if citations is not None else None, "citations", list)
        stats_json = _json_column(stats, "stats", dict)
        now = time.time()
        with self._write() as connection:
            session = self._check_owner(connection, session_id, owner)
            asked = connection.execute(
                "SELECT COUNT(*) FROM messages WHERE session_id = ? AND role = 'user'", (session_id,)
            ).fetchone()[0]
            cursor = connection.execute(
                "INSERT INTO messages (session_id, role, content, created_at, agents, models, mode, citations, stats,"
                " status, error, tried) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    role,
                    content,
                    now,
                    json.dumps(agents_list, ensure_ascii=False),
                    json.dumps(models_list, ensure_ascii=False),
                    mode,
                    citations_json,
                    stats_json,
                    status,
                    error,
                    json.dumps(tried_list, ensure_ascii=False),
                ),
            )
            message_id = cursor.lastrowid
            if role == "user" and not session["title_is_custom"] and asked == 0:
                connection.execute(
                    "UPDATE sessions SET title = ?, updated_at = ? WHERE id = ?", (make_title(content), now, session_id)
                )
            else:
                connection.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
        if message_id is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise StoreError("SQLite returned no id for the new message")
        return ChatMessage(
            id=message_id,
            session_id=session_id,
            role=role,
            content=content,
            created_at=_utc(now),
            agents=agents_list,
            models=models_list,
            mode=mode,
            citations=json.loads(citations_json),
            stats=json.loads(stats_json),
            status=status,
            error=error,
            tried=tried_list,
        )

    def truncate_from(self, session_id: str, message_id: int, *, owner: str = SHARED_USER) -> int:
        """Delete message ``message_id`` and every later message of the session (regenerate, edit and resend).

        Returns how many messages went. A title taken from the first question is kept; the next first question
        (after the whole chat was cut) titles it again.
        """
        owner = _owner(owner)
        if isinstance(message_id, bool) or not isinstance(message_id, int):
            raise BadInputError(f"message_id must be a whole number, got {type(message_id).__name__}")
        with self._write() as connection:
            self._check_owner(connection, session_id, owner)
            found = connection.execute(
                "SELECT 1 FROM messages WHERE id = ? AND session_id = ?", (message_id, session_id)
            ).fetchone()
            if found is None:
                raise NotFoundError(f"message {message_id} is not in chat session {session_id!r}")
            cursor = connection.execute(
                "DELETE FROM messages WHERE session_id = ? AND id >= ?", (session_id, message_id)
            )
            connection.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (time.time(), session_id))
        logger.info("chat session %s: removed %d message(s) from message %d on", session_id, cursor.rowcount,
                    message_id)
        return cursor.rowcount

    def get_history(self, session_id: str, *, owner: str = SHARED_USER) -> list[ChatMessage]:
        """Every message of a session, oldest first, failed and stopped answers included."""
        owner = _owner(owner)
        with self._read() as connection:
            self._check_owner(connection, session_id, owner)
            rows = connection.execute(
                "SELECT * FROM messages WHERE session_id = ? ORDER BY id", (session_id,)
            ).fetchall()
        return [self._message_from_row(row) for row in rows]

    def history_for_prompt(
        self, session_id: str, budget_tokens: int, *, owner: str = SHARED_USER
    ) -> list[ChatMessage]:
        """The most recent messages that fit ``budget_tokens``, oldest first.

        Tokens are estimated at ~4 characters each plus a few per message for
        the chat template (see :func:`estimate_tokens`). The newest user
        message is always kept, even when it alone exceeds the budget: the
        question must reach the model, and the backend will truncate or
        refuse it with a clearer error than an empty prompt. Older messages
        are dropped from the oldest end, so the result has no gaps.

        Failed turns are left out: a failed answer, the question it answered (so user and assistant still
        alternate, which some chat templates insist on), and an answer stopped before any text arrived.
        """
        if budget_tokens < 0:
            raise BadInputError("budget_tokens must not be negative")
        history = _without_failed_turns(self.get_history(session_id, owner=owner))
        newest_user = next((index for index in range(len(history) - 1, -1, -1) if history[index].role == "user"), None)
        used = history[newest_user].estimated_tokens if newest_user is not None else 0
        first_kept = len(history)
        for index in range(len(history) - 1, -1, -1):
            if index == newest_user:
                first_kept = index
                continue
            cost = history[index].estimated_tokens
            if used + cost > budget_tokens:
                break
            used += cost
            first_kept = index
        kept = history[first_kept:]
        if newest_user is not None and newest_user < first_kept:
            # Newer answers filled the budget: the question still goes first.
            kept = [history[newest_user], *kept]
        return kept

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _clean_title(title: str | None) -> str:
        if not isinstance(title, str):
            raise BadInputError("title must be text")
        clean = " ".join(title.split())
        if not clean:
            raise BadInputError("title must not be empty")
        if len(clean) > MAX_TITLE_CHARS:
            raise TooLargeError(f"title has {len(clean)} characters; the limit is {MAX_TITLE_CHARS}")
        return clean

    @staticmethod
    def _session_from_row(row: sqlite3.Row) -> SessionInfo:
        return SessionInfo(
            id=row["id"],
            title=row["title"],
            created_at=_utc(row["created_at"]),
            updated_at=_utc(row["updated_at"]),
            message_count=row["message_count"],
            title_is_custom=bool(row["title_is_custom"]),
            owner=row["owner"],
            settings=_stored_settings(row["id"], row["settings"]),
        )

    @staticmethod
    def _message_from_row(row: sqlite3.Row) -> ChatMessage:
        return ChatMessage(
            id=row["id"],
            session_id=row["session_id"],
            role=row["role"],
            content=row["content"],
            created_at=_utc(row["created_at"]),
            agents=json.loads(row["agents"]),
            models=json.loads(row["models"]),
            mode=row["mode"],
            citations=json.loads(row["citations"]),
            stats=json.loads(row["stats"]),
            status=row["status"] if row["status"] in STATUSES else "ok",
            error=row["error"],
            tried=json.loads(row["tried"]),
        )


def _stored_settings(session_id: str, text: str) -> ChatSettings:
    """A session's stored settings; ones this version cannot read (written by a newer one, or damaged) fall back
    to the defaults, for that session only, instead of making the whole list fail."""
    try:
        return ChatSettings.model_validate_json(text or "{}")
    except ValidationError:
        logger.warning("chat session %s: stored settings are not readable; using the defaults", session_id)
        return ChatSettings()


def _without_failed_turns(history: list[ChatMessage]) -> list[ChatMessage]:
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

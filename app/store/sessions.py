"""Chat sessions in SQLite.

Why SQLite with WAL: the web app answers from many worker threads at once; WAL
lets readers run while one writer commits, and a crash never leaves a half
written message. Each thread gets its own connection (sqlite3 connections must
not be shared across threads without care); writes from this process are
serialised by a lock so threads queue in Python instead of spinning on
SQLITE_BUSY, and ``busy_timeout`` covers another process on the same file.
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

from pydantic import BaseModel, ConfigDict, Field

from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})

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


class SessionInfo(BaseModel):
    """One chat session as the session list shows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    title_is_custom: bool = False


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
        logger.debug("session store ready at %s", self.db_path)

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

    # -- sessions ----------------------------------------------------------

    def create_session(self, title: str | None = None) -> SessionInfo:
        """A new, empty session; without a title it is named after its first question."""
        custom = title is not None
        clean_title = self._clean_title(title) if custom else DEFAULT_TITLE
        session_id = uuid.uuid4().hex
        now = time.time()
        with self._write() as connection:
            connection.execute(
                "INSERT INTO sessions (id, title, title_is_custom, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (session_id, clean_title, int(custom), now, now),
            )
        logger.info("created chat session %s", session_id)
        return SessionInfo(
            id=session_id,
            title=clean_title,
            created_at=_utc(now),
            updated_at=_utc(now),
            message_count=0,
            title_is_custom=custom,
        )

    def list_sessions(self, limit: int | None = None) -> list[SessionInfo]:
        """All sessions, most recent activity first."""
        sql = (
            "SELECT s.id, s.title, s.title_is_custom, s.created_at, s.updated_at,"
            " (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS message_count"
            " FROM sessions s ORDER BY s.updated_at DESC, s.created_at DESC, s.rowid DESC"
        )
        parameters: tuple[Any, ...] = ()
        if limit is not None:
            if limit < 0:
                raise BadInputError("limit must not be negative")
            sql += " LIMIT ?"
            parameters = (limit,)
        rows = self._connection().execute(sql, parameters).fetchall()
        return [self._session_from_row(row) for row in rows]

    def get_session(self, session_id: str) -> SessionInfo:
        row = (
            self._connection()
            .execute(
                "SELECT s.id, s.title, s.title_is_custom, s.created_at, s.updated_at,"
                " (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS message_count"
                " FROM sessions s WHERE s.id = ?",
                (session_id,),
            )
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"chat session {session_id!r} does not exist")
        return self._session_from_row(row)

    def rename_session(self, session_id: str, title: str) -> SessionInfo:
        """Give a session a title of the user's choosing; later questions no longer retitle it."""
        clean_title = self._clean_title(title)
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE sessions SET title = ?, title_is_custom = 1 WHERE id = ?", (clean_title, session_id)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"chat session {session_id!r} does not exist")
        return self.get_session(session_id)

    def delete_session(self, session_id: str) -> None:
        """Delete a session and, through the foreign key's cascade, every message in it."""
        with self._write() as connection:
            cursor = connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            if cursor.rowcount == 0:
                raise NotFoundError(f"chat session {session_id!r} does not exist")
        logger.info("deleted chat session %s", session_id)

    # -- messages ----------------------------------------------------------

    def add_message(
        self,
        session_id: str,
        role: Role,
        content: str,
        *,
        agents: Sequence[str] | None = None,
        models: Sequence[str] | None = None,
        mode: str | None = None,
        citations: Sequence[Any] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> ChatMessage:
        """Append a message; the first user message titles an untitled session."""
        if role not in ROLES:
            raise BadInputError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadInputError(f"content must be text, got {type(content).__name__}")
        if len(content) > MAX_MESSAGE_CHARS:
            raise TooLargeError(f"message has {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}")
        if mode is not None and not isinstance(mode, str):
            raise BadInputError("mode must be text or None")
        agents_list = _string_list(agents, "agents")
        models_list = _string_list(models, "models")
        citations_json = _json_column(list(citations) if citations is not None else None, "citations", list)
        stats_json = _json_column(stats, "stats", dict)
        now = time.time()
        with self._write() as connection:
            session = connection.execute(
                "SELECT title_is_custom, (SELECT COUNT(*) FROM messages WHERE session_id = ? AND role = 'user')"
                " FROM sessions WHERE id = ?",
                (session_id, session_id),
            ).fetchone()
            if session is None:
                raise NotFoundError(f"chat session {session_id!r} does not exist")
            cursor = connection.execute(
                "INSERT INTO messages (session_id, role, content, created_at, agents, models, mode, citations, stats)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
            message_id = cursor.lastrowid
            if role == "user" and not session[0] and session[1] == 0:
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
        )

    def get_history(self, session_id: str) -> list[ChatMessage]:
        """Every message of a session, oldest first."""
        connection = self._connection()
        # One read transaction so the existence check and the messages see the same snapshot.
        connection.execute("BEGIN")
        try:
            if connection.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                raise NotFoundError(f"chat session {session_id!r} does not exist")
            rows = connection.execute(
                "SELECT * FROM messages WHERE session_id = ? ORDER BY id", (session_id,)
            ).fetchall()
        finally:
            connection.execute("COMMIT")
        return [self._message_from_row(row) for row in rows]

    def history_for_prompt(self, session_id: str, budget_tokens: int) -> list[ChatMessage]:
        """The most recent messages that fit ``budget_tokens``, oldest first.

        Tokens are estimated at ~4 characters each plus a few per message for
        the chat template (see :func:`estimate_tokens`). The newest user
        message is always kept, even when it alone exceeds the budget: the
        question must reach the model, and the backend will truncate or
        refuse it with a clearer error than an empty prompt. Older messages
        are dropped from the oldest end, so the result has no gaps.
        """
        if budget_tokens < 0:
            raise BadInputError("budget_tokens must not be negative")
        history = self.get_history(session_id)
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
        )

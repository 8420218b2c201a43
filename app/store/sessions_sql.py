"""The chat store's SQL and row mapping, shared by SQLite (one machine) and PostgreSQL (several front ends).

Why one base class: both stores must give the same answers, the same ordering and the same errors, so the
statements, the input checks and the mapping of rows to :class:`SessionInfo` / :class:`ChatMessage` live here
once. A backend supplies connections and transactions (:meth:`SqlSessionStore._write`, ``_read``), the schema,
and two small pieces of dialect: how sessions keep their order of creation, and how a write locks its session's
row. Statements use ``?`` placeholders; the PostgreSQL backend turns them into ``%s``.

Every write that touches a session first reads its row with :meth:`SqlSessionStore._check_owner` (locked where
the database can do that, ``FOR UPDATE``), so two writers of one chat queue there: message ids come from the
database in the order the writes commit, and the "first question titles the chat" rule sees every earlier
message.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError
from app.store.sessions_model import (
    DEFAULT_TITLE,
    MAX_ERROR_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_TITLE_CHARS,
    MAX_TRIED,
    ROLES,
    SHARED_USER,
    STATUSES,
    ChatMessage,
    ChatSettings,
    MessageStatus,
    Role,
    SessionInfo,
    check_owner,
    json_column,
    make_title,
    stored_settings,
    string_list,
    unknown_session,
    utc,
    without_failed_turns,
)

logger = logging.getLogger(__name__)

ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
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
INDEXES_AFTER_MIGRATION = "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated_at DESC)"
SCHEMA_VERSION = 2


class Cursor(Protocol):
    """What the shared code needs of a cursor (sqlite3's and psycopg's both fit)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    """One open transaction; rows come back indexable by column name (``row["id"]``)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ...) -> Cursor: ...


class SqlSessionStore:
    """Chat sessions and their messages, safe to call from any thread; subclasses supply the database."""

    _CREATION_ORDER: ClassVar[str]
    """An expression over ``sessions s`` that grows with each new session (the tie-break of the list)."""
    _LOCK_SESSION: ClassVar[str] = ""
    """Appended to the owner check inside a write, to hold the session's row until the commit."""

    # -- supplied by the backend ---------------------------------------------

    def _write(self) -> AbstractContextManager[Transaction]:
        """One write transaction, committed at the end of the block, rolled back on any error."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Transaction]:
        """One read transaction."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- sessions ----------------------------------------------------------

    def _check_owner(self, connection: Transaction, session_id: str, owner: str, *, lock: bool = False) -> Any:
        """The session's row if ``owner`` owns it; otherwise the same "does not exist" as for an unknown id."""
        if not isinstance(session_id, str):
            raise BadInputError(f"session_id must be text, got {type(session_id).__name__}")
        row = connection.execute(
            "SELECT title_is_custom, owner FROM sessions WHERE id = ?" + (self._LOCK_SESSION if lock else ""),
            (session_id,),
        ).fetchone()
        if row is None or row["owner"] != owner:
            raise unknown_session(session_id)
        return row

    def create_session(
        self,
        title: str | None = None,
        *,
        owner: str = SHARED_USER,
        settings: ChatSettings | dict[str, Any] | None = None,
    ) -> SessionInfo:
        """A new, empty session of ``owner``; without a title it is named after its first question."""
        owner = check_owner(owner)
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
            created_at=utc(now),
            updated_at=utc(now),
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
        owner = check_owner(owner)
        sql = (self._SESSION_COLUMNS + " WHERE s.owner = ? ORDER BY s.updated_at DESC, s.created_at DESC, "
               + self._CREATION_ORDER + " DESC")
        parameters: tuple[Any, ...] = (owner,)
        if limit is not None:
            if limit < 0:
                raise BadInputError("limit must not be negative")
            sql += " LIMIT ?"
            parameters = (owner, limit)
        with self._read() as connection:
            rows = connection.execute(sql, parameters).fetchall()
        return [self._session_from_row(row) for row in rows]

    def get_session(self, session_id: str, *, owner: str = SHARED_USER) -> SessionInfo:
        owner = check_owner(owner)
        with self._read() as connection:
            row = connection.execute(self._SESSION_COLUMNS + " WHERE s.id = ?", (session_id,)).fetchone()
        if row is None or row["owner"] != owner:
            raise unknown_session(session_id)
        return self._session_from_row(row)

    def rename_session(self, session_id: str, title: str, *, owner: str = SHARED_USER) -> SessionInfo:
        """Give a session a title of the user's choosing; later questions no longer retitle it."""
        owner = check_owner(owner)
        clean_title = self._clean_title(title)
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE sessions SET title = ?, title_is_custom = 1 WHERE id = ? AND owner = ?",
                (clean_title, session_id, owner),
            )
            if cursor.rowcount == 0:
                raise unknown_session(session_id)
        return self.get_session(session_id, owner=owner)

    def update_settings(
        self, session_id: str, settings: ChatSettings | dict[str, Any], *, owner: str = SHARED_USER
    ) -> SessionInfo:
        """Replace a session's :class:`ChatSettings` (a dict is validated; missing keys take their defaults)."""
        owner = check_owner(owner)
        chat_settings = ChatSettings.parse(settings)
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE sessions SET settings = ? WHERE id = ? AND owner = ?",
                (chat_settings.model_dump_json(), session_id, owner),
            )
            if cursor.rowcount == 0:
                raise unknown_session(session_id)
        return self.get_session(session_id, owner=owner)

    def delete_session(self, session_id: str, *, owner: str = SHARED_USER) -> None:
        """Delete a session and, through the foreign key's cascade, every message in it."""
        owner = check_owner(owner)
        with self._write() as connection:
            cursor = connection.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
            if cursor.rowcount == 0:
                raise unknown_session(session_id)
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
        owner = check_owner(owner)
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
        agents_list = string_list(agents, "agents")
        models_list = string_list(models, "models")
        tried_list = string_list(tried, "tried")[:MAX_TRIED]
        citations_json = json_column(list(citations) if citations is not None else None, "citations", list)
        stats_json = json_column(stats, "stats", dict)
        now = time.time()
        with self._write() as connection:
            session = self._check_owner(connection, session_id, owner, lock=True)
            asked = connection.execute(
                "SELECT COUNT(*) AS asked FROM messages WHERE session_id = ? AND role = 'user'", (session_id,)
            ).fetchone()["asked"]
            inserted = connection.execute(
                "INSERT INTO messages (session_id, role, content, created_at, agents, models, mode, citations, stats,"
                " status, error, tried) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
            ).fetchone()
            if role == "user" and not session["title_is_custom"] and asked == 0:
                connection.execute(
                    "UPDATE sessions SET title = ?, updated_at = ? WHERE id = ?", (make_title(content), now, session_id)
                )
            else:
                connection.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
        if inserted is None:  # pragma: no cover - both databases return the row of an INSERT ... RETURNING
            raise StoreError("the database returned no id for the new message")
        return ChatMessage(
            id=inserted["id"],
            session_id=session_id,
            role=role,
            content=content,
            created_at=utc(now),
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
        owner = check_owner(owner)
        if isinstance(message_id, bool) or not isinstance(message_id, int):
            raise BadInputError(f"message_id must be a whole number, got {type(message_id).__name__}")
        with self._write() as connection:
            self._check_owner(connection, session_id, owner, lock=True)
            found = connection.execute(
                "SELECT 1 AS found FROM messages WHERE id = ? AND session_id = ?", (message_id, session_id)
            ).fetchone()
            if found is None:
                raise NotFoundError(f"message {message_id} is not in chat session {session_id!r}")
            removed = connection.execute(
                "DELETE FROM messages WHERE session_id = ? AND id >= ?", (session_id, message_id)
            ).rowcount
            connection.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (time.time(), session_id))
        logger.info("chat session %s: removed %d message(s) from message %d on", session_id, removed, message_id)
        return removed

    def get_history(self, session_id: str, *, owner: str = SHARED_USER) -> list[ChatMessage]:
        """Every message of a session, oldest first, failed and stopped answers included."""
        owner = check_owner(owner)
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
        history = without_failed_turns(self.get_history(session_id, owner=owner))
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
    def _session_from_row(row: Any) -> SessionInfo:
        return SessionInfo(
            id=row["id"],
            title=row["title"],
            created_at=utc(row["created_at"]),
            updated_at=utc(row["updated_at"]),
            message_count=row["message_count"],
            title_is_custom=bool(row["title_is_custom"]),
            owner=row["owner"],
            settings=stored_settings(row["id"], row["settings"]),
        )

    @staticmethod
    def _message_from_row(row: Any) -> ChatMessage:
        return ChatMessage(
            id=row["id"],
            session_id=row["session_id"],
            role=row["role"],
            content=row["content"],
            created_at=utc(row["created_at"]),
            agents=json.loads(row["agents"]),
            models=json.loads(row["models"]),
            mode=row["mode"],
            citations=json.loads(row["citations"]),
            stats=json.loads(row["stats"]),
            status=row["status"] if row["status"] in STATUSES else "ok",
            error=row["error"],
            tried=json.loads(row["tried"]),
        )

"""Chat sessions in SQLite (one machine); app/store/sessions_postgres.py keeps them in PostgreSQL instead.

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
* :func:`open_session_store` picks the backend: PostgreSQL when ``database_url`` is set (several front ends share
  chats, docs/scale-out.md), else this SQLite file. Both share their SQL and checks (app/store/sessions_sql.py).

Note for the UI (names differ from the first brief on purpose): in :class:`app.service.AppService` the chat's
user is ``user=`` (``ask(..., user=user_of(request), owner=request.session_hash)``; ``owner=`` there stays the
browser session that the Stop button cancels). ``regenerate(session_id, *, user, owner=None, **ask_overrides)``,
``edit_and_resend(session_id, message_id, new_text, *, user, owner=None, **ask_overrides)``; both refuse
(BadRequest) while an answer of that chat still streams. ``ask(mode=None, aggregation=None, use_rag=None,
agent=None)`` take the chat's settings; ``agent=""`` means "routing chooses". ``user_of`` is in app/ui/users.py.
"""


from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.store.errors import StoreError
from app.store.sessions_model import (
    CHARS_PER_TOKEN,
    DEFAULT_TITLE,
    MAX_ANSWER_TOKENS,
    MAX_ERROR_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    MAX_OWNER_CHARS,
    MAX_SYSTEM_PROMPT_CHARS,
    MAX_TITLE_CHARS,
    MAX_TRIED,
    MESSAGE_OVERHEAD_TOKENS,
    ROLES,
    SHARED_USER,
    STATUSES,
    TITLE_CHARS,
    ChatMessage,
    ChatSettings,
    MessageStatus,
    Role,
    SessionInfo,
    estimate_tokens,
    make_title,
)
from app.store.sessions_sql import ADDED_COLUMNS, INDEXES_AFTER_MIGRATION, SCHEMA_VERSION, SqlSessionStore

__all__ = [
    "CHARS_PER_TOKEN", "DEFAULT_TITLE", "MAX_ANSWER_TOKENS", "MAX_ERROR_CHARS", "MAX_MESSAGE_CHARS", "MAX_NAME_CHARS",
    "MAX_OWNER_CHARS", "MAX_SYSTEM_PROMPT_CHARS", "MAX_TITLE_CHARS", "MAX_TRIED", "MESSAGE_OVERHEAD_TOKENS", "ROLES",
    "SCHEMA_VERSION", "SHARED_USER", "STATUSES", "TITLE_CHARS", "ChatMessage", "ChatSettings", "MessageStatus",
    "Role", "SessionInfo", "SessionStore", "SqlSessionStore", "estimate_tokens", "make_title", "open_session_store",
]

logger = logging.getLogger(__name__)

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
"""The first release's tables; :data:`~app.store.sessions_sql.ADDED_COLUMNS` brings them up to date."""


class SessionStore(SqlSessionStore):
    """Chat sessions in one SQLite file, safe to call from any thread of this process (why WAL, one connection
    per thread and a write lock: the module's docstring)."""

    _CREATION_ORDER = "s.rowid"

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
            for table, columns in ADDED_COLUMNS.items():
                present = {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns:
                    if name not in present:
                        connection.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                        logger.info("session store %s: added column %s.%s", self.db_path, table, name)
            connection.execute(INDEXES_AFTER_MIGRATION)
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


def open_session_store(sqlite_path: Path, database_url: str | None = None) -> SqlSessionStore:
    """The chat store the app uses: PostgreSQL when ``database_url`` is set (shared by several app instances),
    otherwise the SQLite file ``sqlite_path`` (one instance)."""
    if database_url:
        from app.store.sessions_postgres import PostgresSessionStore

        return PostgresSessionStore(database_url)
    logger.info("chats are kept in SQLite at %s", sqlite_path)
    return SessionStore(sqlite_path)

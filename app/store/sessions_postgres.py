"""Chat sessions in PostgreSQL, so several ``python -m app`` instances share them (issue 16, docs/scale-out.md).

Why PostgreSQL and not SQLite on a shared disk: SQLite's locks rely on the file system, and network file
systems (NFS, SMB) implement them badly or not at all, so two machines writing one file can corrupt it; and
WAL mode needs shared memory, which only works on one machine. A database server serialises writers itself.

Same interface, SQL and errors as the SQLite :class:`~app.store.sessions.SessionStore` (both are
:class:`~app.store.sessions_sql.SqlSessionStore`). What differs here:

* Connections come from a bounded :class:`psycopg_pool.ConnectionPool`; each one is checked when taken, so a
  connection the server dropped is replaced instead of failing a call. While the database cannot be reached a
  call fails within ``wait_s`` with :class:`DatabaseUnavailableError` (HTTP 503, the URL with its password
  hidden); the next call after the server is back reconnects.
* Message ids come from an identity column, and a write locks its session's row (``SELECT ... FOR UPDATE``), so
  two instances adding to one chat queue there: nothing is lost and ids follow the order of the commits.
* The schema is created (and later migrated) on open inside one transaction that holds an advisory lock, so two
  instances starting at the same moment do not both try to create it.
* PostgreSQL cannot store the NUL character (``\\x00``) in text: one in a title or message is stored as U+FFFD.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from app.store.errors import StoreError
from app.store.sessions_sql import (
    ADDED_COLUMNS,
    INDEXES_AFTER_MIGRATION,
    SCHEMA_VERSION,
    Cursor,
    SqlSessionStore,
)
from broker.protocol.redaction import redact_url, redact_urls_in

logger = logging.getLogger(__name__)

SCHEMA_LOCK = 0x534C_4201
"""Key of the advisory lock held while the sessions schema is created or migrated ("SLB", 1)."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        seq BIGINT GENERATED ALWAYS AS IDENTITY,
        title TEXT NOT NULL,
        title_is_custom INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        agents TEXT NOT NULL DEFAULT '[]',
        models TEXT NOT NULL DEFAULT '[]',
        mode TEXT,
        citations TEXT NOT NULL DEFAULT '[]',
        stats TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, id)",
    "CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions(updated_at DESC)",
    "CREATE TABLE IF NOT EXISTS slb_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)",
)
"""The first tables (as in SQLite, with PostgreSQL's types); ``ADDED_COLUMNS`` then brings them up to date, the
same list the SQLite store migrates with. ``slb_schema`` records each component's schema version."""


class DatabaseUnavailableError(StoreError):
    """The database server cannot be reached (down, restarting, network); retrying later can succeed."""

    http_status = 503


class _PostgresTransaction:
    """Runs the shared ``?``-placeholder SQL on a psycopg connection."""

    def __init__(self, connection: psycopg.Connection[dict[str, Any]]) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        values = [value.replace("\x00", "\ufffd") if isinstance(value, str) else value for value in parameters]
        return self._connection.execute(sql.replace("?", "%s"), values)


class PostgresSessionStore(SqlSessionStore):
    """Chat sessions in a PostgreSQL database that several app instances share; safe to call from any thread."""

    _CREATION_ORDER = "s.seq"
    _LOCK_SESSION = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 10,
        wait_s: float = 10.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.shown_url = redact_url(url)
        self._wait_s = wait_s
        self._closed = False
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, round(connect_timeout_s)),
                    "application_name": "slb-app sessions"},
            check=ConnectionPool.check_connection,
            timeout=wait_s,
            # Give up background reconnects quickly: the next call then starts a fresh attempt at once instead of
            # waiting out an ever longer backoff after the server is back.
            reconnect_timeout=max(1.0, connect_timeout_s),
            name="chat-sessions",
            open=False,
        )
        self._pool.open(wait=False)
        try:
            self._create_schema()
        except BaseException:
            self._closed = True
            self._pool.close()
            raise
        logger.info("chats are kept in PostgreSQL at %s", self.shown_url)

    def _create_schema(self) -> None:
        """Create or migrate the tables in one transaction under an advisory lock (two instances may start at once)."""
        with self._write() as transaction:
            transaction.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
            for statement in _SCHEMA:
                transaction.execute(statement)
            for table, columns in ADDED_COLUMNS.items():
                present = {row["column_name"] for row in transaction.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = ?", (table,)).fetchall()}
                for name, declaration in columns:
                    if name not in present:
                        transaction.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                        logger.debug("session store: added column %s.%s", table, name)
            transaction.execute(INDEXES_AFTER_MIGRATION)
            transaction.execute(
                "INSERT INTO slb_schema (component, version) VALUES ('sessions', ?)"
                " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version", (SCHEMA_VERSION,))

    @contextmanager
    def _transaction(self) -> Iterator[_PostgresTransaction]:
        """One transaction on a pooled connection: committed at the end, rolled back on any error; a lost
        connection becomes :class:`DatabaseUnavailableError` and leaves the pool, so the next call reconnects."""
        if self._closed:
            raise StoreError("session store is closed")
        try:
            with self._pool.connection() as connection:
                yield _PostgresTransaction(connection)
        except PoolTimeout as error:
            raise DatabaseUnavailableError(
                f"the chat database at {self.shown_url} cannot be reached (no connection within {self._wait_s:g} s);"
                " try again when it is back") from error
        except psycopg.OperationalError as error:
            raise DatabaseUnavailableError(
                f"the chat database at {self.shown_url} failed: {redact_urls_in(str(error)).strip()}") from error
        except psycopg.Error as error:
            raise StoreError(f"the chat database refused the change: {redact_urls_in(str(error)).strip()}") from error

    _write = _transaction
    _read = _transaction

    def close(self) -> None:
        """Close every pooled connection; the store is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()

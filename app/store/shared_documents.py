"""One document library for several app instances: PostgreSQL holds it, each instance's LanceDB indexes it.

Why this shape (docs/rag.md, Shared documents): search must stay as fast as on one box, so every instance keeps
its own LanceDB index and in-memory vectors and searches locally; PostgreSQL (``--database-url``) is the source
of truth that the indexes are fed from. An upload is extracted, chunked and embedded once, on the instance that
took it, stored in its index, then published with its vectors in one transaction (app/store/shared_library.py);
the others hear of it by LISTEN/NOTIFY and copy its rows — no re-embedding. A deletion goes to the database
first (so no instance can publish the document back), then to the local index; the others drop it on notice.

The sync runs in a thread of its own with one psycopg 3 connection that LISTENs; it never touches the event
loop. Notifications are the fast path; a full reconcile (compare id sets, copy what is missing, drop what was
deleted, publish what only this instance has) runs on open, after every reconnect (notifications sent while
it was away are lost) and every ``reconcile_interval_s`` as a safety net. When PostgreSQL goes away, search and
uploads go on locally (an upload is published at the next reconcile), deletions are refused with a clear error
(they must reach every instance), and :meth:`SharedDocuments.status` says how far behind this instance may be.

All instances must embed with the same model: :func:`~app.store.shared_library.prepare` refuses to open a
library holding another model's vectors, and a document of another model is never copied.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel, computed_field

from app.store import shared_library
from app.store.errors import NotFoundError, StoreError
from app.store.library import Document, document_row
from app.store.shared_library import LibraryModelMismatch, Published

if TYPE_CHECKING:
    from app.store.rag import RagStore

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 30.0
"""Full comparison with the database, as a safety net behind notifications."""
LISTEN_POLL_S = 0.5
"""Longest wait for a notification before the thread checks whether it should stop or reconcile."""
RETRY_S = (1.0, 2.0, 5.0, 10.0)
"""Waits between reconnection attempts while the database is away (the last one repeats)."""
COPY_BATCH = 16
"""Documents copied per database read and local write (one vector refresh per batch)."""
CONNECT_OPTIONS: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 5,
    # A server that vanishes without closing the socket (a cable, a VM pause) is noticed within ~25 s.
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}


class SyncStatus(BaseModel):
    """How this instance's copy of the shared library stands; ``behind_s`` is the answer to "how far behind"."""

    database: str
    connected: bool
    behind_s: float | None
    """Seconds since this instance last knew it had every change (None: not yet once since it started)."""
    local_documents: int
    shared_documents: int | None
    to_copy: int
    unpublished: int
    """Local documents waiting for the database (uploaded while it was away)."""
    refused: int
    """Shared documents of another embedding model, not copied."""
    last_error: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def words(self) -> str:
        """One line for a person: ``in step``, ``catching up: 3 documents to copy``, ``database unreachable ...``."""
        if not self.connected:
            since = "" if self.behind_s is None else f" (changes of the last {self.behind_s:.0f} s may be missing)"
            return f"shared library unreachable{since}: {self.last_error or 'connecting'}"
        parts = [f"{self.to_copy} documents to copy"] if self.to_copy else []
        if self.unpublished:
            parts.append(f"{self.unpublished} not yet shared")
        if self.refused:
            parts.append(f"{self.refused} of another embedding model refused")
        if self.to_copy or self.behind_s is None:
            return "catching up" + (f": {', '.join(parts)}" if parts else "")
        return "in step" + (f" ({', '.join(parts)})" if parts else "")


class SharedDocuments:
    """Keeps one :class:`~app.store.rag.RagStore`'s index in step with the shared library; see the module text."""

    def __init__(
        self,
        database_url: str,
        store: RagStore,
        *,
        reconcile_interval_s: float = RECONCILE_INTERVAL_S,
        instance: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.store = store
        self.reconcile_interval_s = reconcile_interval_s
        self.instance = instance or f"{socket.gethostname()}:{store.data_dir}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = threading.local()  # .applying: this thread is applying a shared change to the local index
        self._status_lock = threading.Lock()
        self._connected = False
        self._in_step_at: float | None = None
        self._shared_count: int | None = None
        self._to_copy = 0
        self._unpublished: set[str] = set()
        self._refused: set[str] = set()
        self._last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> SharedDocuments:
        """Check the library (tables, embedding model), attach to the store and start syncing.

        Raises :class:`LibraryModelMismatch` when the library holds another model's vectors. An unreachable
        database does not stop the start: the index serves what it has and the thread keeps trying.
        """
        import psycopg

        try:
            with psycopg.connect(self.database_url, **CONNECT_OPTIONS) as connection:
                shared_library.prepare(connection, self.store.embedding_model)
        except psycopg.Error as error:
            self._set_error(error)
            logger.warning("shared document library %s unreachable at start (%s); searching the local index "
                           "and retrying", self.database_name, self._last_error)
        self.store.shared = self
        self._thread = threading.Thread(target=self._run, name="shared-documents", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def database_name(self) -> str:
        """host:port/name of the database, never its password (for logs and the status)."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(self.database_url)
        except Exception:  # noqa: BLE001 - a malformed URL fails at connect with its own message
            return "the database"
        return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"

    def status(self) -> SyncStatus:
        with self._status_lock:
            behind = None if self._in_step_at is None else round(max(0.0, time.time() - self._in_step_at), 1)
            return SyncStatus(
                database=self.database_name, connected=self._connected, behind_s=behind,
                local_documents=len(local_documents(self.store)), shared_documents=self._shared_count,
                to_copy=self._to_copy, unpublished=len(self._unpublished), refused=len(self._refused),
                last_error=self._last_error,
            )

    def wake(self) -> None:
        """Reconcile now rather than at the next interval (tests, and after a duplicate upload)."""
        self._wake.set()

    # -- hooks the store calls (app/store/rag.py) ----------------------------------------

    def applying(self) -> bool:
        """True while this thread applies a shared change locally: the store must not send it back."""
        return bool(getattr(self._local, "applying", False))

    def published(self, document: Document) -> Document:
        """Publish a document just added to the local index; returns what the upload should answer.

        The same bytes published meanwhile by another instance win: the local copy is dropped and theirs is
        returned as a duplicate. An unreachable database keeps the document local until the next reconcile.
        """
        import psycopg

        if self.applying():
            return document
        try:
            with psycopg.connect(self.database_url, **CONNECT_OPTIONS) as connection:
                return self._publish(connection, document)
        except LibraryModelMismatch:
            self._delete_local(document.id, "another embedding model than the shared library's")
            raise
        except psycopg.Error as error:
            with self._status_lock:
                self._unpublished.add(document.id)
            logger.warning("document %s (%s) is searchable here but not yet shared: %s; it is published when the "
                           "database is back", document.id, document.name, error)
            return document

    def delete_everywhere(self, document: Document) -> None:
        """Delete from the shared library first (so nobody publishes it back), then from the local index."""
        import psycopg

        try:
            with psycopg.connect(self.database_url, **CONNECT_OPTIONS) as connection:
                shared_library.delete(connection, document.id)
        except psycopg.Error as error:
            raise StoreError(
                f"cannot delete {document.name!r} while the shared document library ({self.database_name}) is "
                f"unreachable: it would stay on the other instances; try again when it is back ({error})"
            ) from error
        with self._status_lock:
            self._unpublished.discard(document.id)
        self._delete_local(document.id)

    # -- the sync thread ----------------------------------------------------------------

    def _run(self) -> None:
        import psycopg

        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.database_url, **CONNECT_OPTIONS) as connection:
                    shared_library.prepare(connection, self.store.embedding_model)
                    connection.execute(f"LISTEN {shared_library.CHANNEL}")
                    if failures:
                        logger.info("shared document library %s is back; reconciling", self.database_name)
                    failures = 0
                    with self._status_lock:
                        self._connected, self._last_error = True, None
                    self._listen(connection)
            except LibraryModelMismatch as error:
                self._set_error(error)
                logger.error("shared documents: %s; this instance stops syncing", error)
                return
            except Exception as error:  # noqa: BLE001 - the sync must outlive any outage; it retries and reconciles
                self._set_error(error)
                wait = RETRY_S[min(failures, len(RETRY_S) - 1)]
                log = logger.warning if failures == 0 else logger.debug
                log("shared document library %s: %s; retrying in %.0f s", self.database_name, error, wait,
                    exc_info=not isinstance(error, psycopg.OperationalError))
                failures += 1
                self._stop.wait(wait)
        logger.debug("shared document sync stopped")

    def _listen(self, connection: Any) -> None:
        """Reconcile, then apply notifications as they come, with a full reconcile every interval."""
        self._reconcile(connection)
        next_reconcile = time.monotonic() + self.reconcile_interval_s
        while not self._stop.is_set():
            notices = [notice.payload for notice in connection.notifies(timeout=LISTEN_POLL_S, stop_after=1)]
            if notices:  # gather the rest of a burst (a reconcile elsewhere publishes many) to copy them together
                notices += [notice.payload for notice in connection.notifies(timeout=0.05)]
                self._apply(connection, notices)
            if self._wake.is_set() or time.monotonic() >= next_reconcile:
                self._wake.clear()
                self._reconcile(connection)
                next_reconcile = time.monotonic() + self.reconcile_interval_s
            connection.execute("SELECT 1")  # a server that went away fails here even when no notice came
            with self._status_lock:
                self._in_step_at = time.time()

    def _apply(self, connection: Any, notices: Iterable[str]) -> None:
        added: list[str] = []
        for notice in notices:
            action, _, document_id = notice.partition(" ")
            if action == "deleted":
                added = [doc_id for doc_id in added if doc_id != document_id]
                self._delete_local(document_id)
            elif action == "added":
                added.append(document_id)
        local = local_documents(self.store)
        self._copy(connection, [doc_id for doc_id in dict.fromkeys(added) if doc_id not in local])
        count = connection.execute("SELECT count(*) FROM rag_documents").fetchone()[0]
        with self._status_lock:
            self._shared_count = int(count)

    def _reconcile(self, connection: Any) -> None:
        """Make the local index equal the shared library, in both directions, without re-embedding anything."""
        shared = shared_library.document_ids(connection)
        local = local_documents(self.store)
        model = self.store.embedding_model
        refused = {doc_id for doc_id, doc_model in shared.items() if doc_model != model}
        newly_refused = refused - self._refused
        if newly_refused:
            logger.error("shared documents: %d documents were embedded with %s, not %r; they are not copied here",
                         len(newly_refused), ", ".join(sorted({shared[doc_id] for doc_id in newly_refused})), model)
        only_here = [doc_id for doc_id in local if doc_id not in shared]
        deleted = shared_library.deleted_among(connection, only_here)
        with self._status_lock:
            self._shared_count = len(shared)
            self._refused = refused
        for doc_id in deleted:
            self._delete_local(doc_id)
        for doc_id in only_here:
            if doc_id in deleted:
                continue
            try:
                self._publish(connection, local[doc_id])
            except LibraryModelMismatch as error:  # uploaded here while the database was away; kept, not shared
                with self._status_lock:
                    self._unpublished.add(doc_id)
                logger.error("document %s is not shared: %s", doc_id, error)
        self._copy(connection, [doc_id for doc_id in shared if doc_id not in local and doc_id not in refused])

    def _copy(self, connection: Any, ids: list[str]) -> None:
        """Copy shared documents (rows and vectors) into the local index, a batch at a time."""
        with self._status_lock:
            self._to_copy = len(ids)
        for start in range(0, len(ids), COPY_BATCH):
            fetched = shared_library.fetch(connection, ids[start : start + COPY_BATCH])
            usable = [(document, chunks) for document, chunks in fetched
                      if document.embedding_model == self.store.embedding_model]
            copied = import_documents(self.store, usable)
            with self._status_lock:
                self._to_copy = max(0, len(ids) - start - COPY_BATCH)
            if copied:
                logger.info("copied %d shared documents into the local index", copied)

    # -- both directions ------------------------------------------------------------------

    def _publish(self, connection: Any, document: Document) -> Document:
        """Publish one local document; the answer an upload gives (the other instance's copy for a duplicate)."""
        chunks = local_chunks(self.store, document.id)
        if chunks.num_rows != document.chunk_count:
            logger.warning("document %s has %d of %d chunks here; not published", document.id, chunks.num_rows,
                           document.chunk_count)
            return document
        outcome, existing = shared_library.publish(connection, document, chunks, self.instance)
        with self._status_lock:
            self._unpublished.discard(document.id)
        if outcome == Published.STORED:
            logger.info("published document %s (%s, %d chunks) to the shared library", document.id, document.name,
                        document.chunk_count)
        elif outcome == Published.DELETED:
            logger.info("document %s was deleted on another instance; removed here too", document.id)
            self._delete_local(document.id)
        elif outcome == Published.DUPLICATE and existing is not None:
            logger.info("document %s has the same content as shared document %s; keeping that one", document.id,
                        existing.id)
            self._delete_local(document.id, f"a duplicate of shared document {existing.id}")
            if existing.id not in local_documents(self.store):
                self._copy(connection, [existing.id])
            return existing.model_copy(update={"duplicate": True})
        return document

    def _delete_local(self, document_id: str, reason: str = "deleted from the shared library") -> None:
        document = local_documents(self.store).get(document_id)
        if document is None:
            return
        self._local.applying = True
        try:
            self.store.delete_document(document_id, document.owner)
            logger.info("removed document %s (%s) here: %s", document_id, document.name, reason)
        except NotFoundError:
            pass  # deleted here at the same moment
        finally:
            self._local.applying = False

    def _set_error(self, error: BaseException) -> None:
        with self._status_lock:
            self._connected = False
            self._last_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# -- the local index (what of RagStore this module needs; app/store/rag.py owns the tables) -----------------


def local_documents(store: RagStore) -> dict[str, Document]:
    """Every ready local document, of every user."""
    with store._state_lock:
        return dict(store._documents)


def local_chunks(store: RagStore, document_id: str) -> pa.Table:
    """A local document's chunk rows, vectors included, in chunk order."""
    table = store._chunks_table
    if table is None:
        return pa.table({})
    rows = table.search().where(f"doc_id = '{document_id}'").limit(None).to_arrow()
    return rows.sort_by("chunk_index")


def import_documents(store: RagStore, batch: list[tuple[Document, pa.Table]]) -> int:
    """Add documents with their embedded chunks to the local index, as an upload would but without the model.

    Same order as an upload: chunks first (hidden while pending), then the document rows, then the vectors
    snapshot, then the documents become visible; chunks left by a crash are removed at the next start.
    """
    if not batch:
        return 0
    table = store._ensure_chunks_table()
    with store._write_lock:
        with store._state_lock:
            fresh = [(document, chunks) for document, chunks in batch
                     if document.id not in store._documents and document.id not in store._pending]
            store._pending.update(document.id for document, _ in fresh)
        if not fresh:
            return 0
        try:
            table.add(pa.concat_tables([chunks for _, chunks in fresh]).cast(table.schema))
            store._documents_table.add(pa.Table.from_pylist(
                [document_row(document) for document, _ in fresh], schema=store._documents_table.schema))
            store._refresh_vectors()
            with store._state_lock:
                for document, _ in fresh:
                    store._documents[document.id] = document
        finally:
            with store._state_lock:
                store._pending.difference_update(document.id for document, _ in fresh)
        try:
            store._maintain_locked()
        except Exception:  # noqa: BLE001 - the copies are stored; index maintenance can wait for the next write
            logger.warning("table maintenance after copying shared documents failed", exc_info=True)
    return len(fresh)


def share_documents(store: RagStore, database_url: str, **options: Any) -> SharedDocuments:
    """Attach ``store`` to the shared library at ``database_url`` and start syncing (app/server.py open_rag)."""
    try:
        return SharedDocuments(database_url, store, **options).start()
    except BaseException:
        store.close()
        raise

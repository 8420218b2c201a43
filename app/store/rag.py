"""Documents for retrieval-augmented answers, stored in LanceDB.

Layout under ``data_dir/lancedb``: a ``documents`` table (one row per
document) and a ``chunks`` table (text, source location, embedding).
Search is vector, keyword (BM25) or
both fused by reciprocal rank (hybrid), over an in-memory snapshot of the
chunks (app/store/retrieval.py, app/store/keywords.py).

No half documents: a document's chunks are written in batches while it is
embedded, but its ``documents`` row is written last. Until then its id is in
``_pending`` and excluded from every search; search results are also kept
only for documents whose row exists, so chunks left by a crash are never
shown, and they are removed at the next start. A failed ingestion deletes
whatever it wrote before re-raising. Writes are serialised by one lock
(LanceDB commits are optimistic; one writer per table keeps them simple),
reads run concurrently.

One process owns a data folder at a time: the document list is cached in
memory, so a second process writing the same folder would not be seen.

Relevance: every hit of a vector or hybrid search carries ``relevance``, the
cosine similarity of the query and the chunk. Unlike a fused rank score it
means the same across queries, so a fixed floor (``relevance_floor``,
calibrated on tests/support/rag_corpus.py, see docs/rag.md) can drop passages
that are merely the least unrelated ones. A document can be private to its
uploader (``owner``); it is then listed, searched and deleted only for them.

The hit and document models, relevance words and row builders live in app/store/library.py; the search
primitives (vector snapshot, keyword search, rank fusion) in app/store/retrieval.py.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from app.store.chunking import (
    DEFAULT_MAX_WORDS,
    DEFAULT_MIN_WORDS,
    DEFAULT_OVERLAP_WORDS,
    chunk_document,
)
from app.store.embedding import DEFAULT_EMBEDDING_MODEL, Embedder
from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError
from app.store.extract import ExtractedDocument, detect_format, extract, extract_text, safe_filename
from app.store.library import (
    MATCH_LABELS,
    RELEVANCE_FLOOR,
    SEARCH_MODES,
    STRONG_MATCH,
    Document,
    Match,
    SearchHit,
    SearchMode,
    chunk_rows,
    chunks_schema,
    document_row,
    embedding_progress,
    embedding_text,
    identifier_terms,
    match_of,
    vector_array,
    word_set,
)
from app.store.retrieval import (
    VectorSnapshot,
    fused_ranking,
    reciprocal_rank_fusion,
)
from app.store.sessions import SHARED_USER

if TYPE_CHECKING:
    from app.store.shared_documents import SharedDocuments

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

EMBEDDING_TEXT_VERSION = 2
"""What a chunk's embedded text is made of. 1: heading path + chunk; 2: the document's title stands in for the
heading when the chunk has none (plain text, PDF pages). Documents record theirs; see docs/rag.md, Chunking."""
DOCUMENTS_TABLE = "documents"
CHUNKS_TABLE = "chunks"
MAX_QUERY_CHARS = 4000
MAX_K = 100
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
# Old table versions keep deleted text on disk until pruned; keep them just long enough for in-flight reads.
VERSION_RETENTION = timedelta(seconds=60)
_DOCUMENT_ID = re.compile(r"^[0-9a-f]{32}$")

_DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("char_count", pa.int64(), nullable=False),
        pa.field("chunk_count", pa.int32(), nullable=False),
        pa.field("added_at", pa.float64(), nullable=False),
        pa.field("embedding_model", pa.string(), nullable=False),
        pa.field("owner", pa.string(), nullable=False),
        pa.field("private", pa.bool_(), nullable=False),
        pa.field("embedding_text_version", pa.int32(), nullable=False),
    ]
)
_ADDED_DOCUMENT_COLUMNS = {"owner": "''", "private": "false", "embedding_text_version": "CAST(1 AS INT)"}
"""Columns added after the first release, with the SQL default that existing rows get (shared, no owner)."""


def _progress_noop(fraction: float, message: str) -> None:
    """Default progress callback."""


class RagStore:
    """Upload, list, delete and search documents; safe to call from any thread."""

    def __init__(
        self,
        data_dir: Path | str,
        embedding_model: str = DEFAULT_EMBEDDING_MODEL,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        *,
        max_words: int = DEFAULT_MAX_WORDS,
        min_words: int = DEFAULT_MIN_WORDS,
        overlap_words: int = DEFAULT_OVERLAP_WORDS,
        batch_size: int = 16,
        default_mode: SearchMode = "hybrid",
        rrf_k: int = 60,
        device: str | None = None,
        embedding_threads: int | None = 1,
        embedder: Embedder | None = None,
        relevance_floor: float = RELEVANCE_FLOOR,
    ) -> None:
        """See docs/rag.md for every setting.

        ``embedding_threads`` sets torch's intra-op threads process-wide (None: torch's default, one per core).
        One keeps query embedding fast when other processes busy the cores; the app process has no other torch user.
        """
        import lancedb

        if default_mode not in SEARCH_MODES:
            raise BadInputError(f"default_mode must be one of {SEARCH_MODES}")
        if max_upload_bytes <= 0 or batch_size <= 0:
            raise BadInputError("max_upload_bytes and batch_size must be positive")
        if not 0 <= overlap_words < min_words <= max_words:
            raise BadInputError("chunk sizes must satisfy 0 <= overlap_words < min_words <= max_words")
        self.data_dir = Path(data_dir)
        self.db_dir = self.data_dir / "lancedb"
        self.db_dir.mkdir(parents=True, exist_ok=True)
        self.embedding_model = embedding_model
        self.max_upload_bytes = max_upload_bytes
        self.max_chars = max_upload_bytes * 4  # text from compressed formats (DOCX, PDF streams) can outgrow the upload
        self.default_mode: SearchMode = default_mode
        self.rrf_k = rrf_k
        if not -1.0 <= relevance_floor <= 1.0:
            raise BadInputError("relevance_floor is a cosine similarity, from -1 to 1")
        self.relevance_floor = relevance_floor
        self.batch_size = batch_size
        self._chunking = {"max_words": max_words, "min_words": min_words, "overlap_words": overlap_words}
        self.embedder = embedder or Embedder(embedding_model, device=device, threads=embedding_threads)

        self._write_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._documents: dict[str, Document] = {}
        self._pending: set[str] = set()
        self._inflight: dict[str, threading.Event] = {}
        self._vectors: VectorSnapshot | None = None
        self._vectors_lock = threading.Lock()
        self.shared: SharedDocuments | None = None  # the library several instances share (issue 16), when set

        self._db = lancedb.connect(str(self.db_dir))
        names = set(self._table_names())
        if DOCUMENTS_TABLE in names:
            self._documents_table = self._db.open_table(DOCUMENTS_TABLE)
            self._add_missing_document_columns()
        else:
            self._documents_table = self._db.create_table(DOCUMENTS_TABLE, schema=_DOCUMENTS_SCHEMA)
        self._chunks_table: Any = self._db.open_table(CHUNKS_TABLE) if CHUNKS_TABLE in names else None
        for row in self._documents_table.to_arrow().to_pylist():
            document = self._document_from_row(row)
            self._documents[document.id] = document
        self._remove_orphan_chunks()
        logger.info("RAG store at %s: %d documents", self.db_dir, len(self._documents))
        outdated = sum(doc.embedding_text_version < EMBEDDING_TEXT_VERSION for doc in self._documents.values())
        if outdated:
            logger.info(
                "%d documents were embedded before document titles were (version %d); they are searched as they are, "
                "reindex() re-embeds them",
                outdated, EMBEDDING_TEXT_VERSION,
            )  # fmt: skip

    # -- public API: documents ---------------------------------------------------

    def add_file(
        self,
        path: Path | str,
        *,
        name: str | None = None,
        progress: ProgressCallback | None = None,
        owner: str | None = None,
        private: bool = False,
    ) -> Document:
        """Ingest a file from disk; ``name`` (default: the file's base name) decides the format and is shown.

        ``owner`` is the uploader (None: no login); ``private`` keeps the document to them.
        """
        path = Path(path)
        display_name = safe_filename(name if name is not None else path.name)
        detect_format(display_name)
        try:
            size = path.stat().st_size
        except OSError as error:
            raise BadInputError(f"cannot read {display_name!r}: {error.strerror or error}") from error
        if not path.is_file():
            raise BadInputError(f"{display_name!r} is not a regular file")
        self._check_size(size, display_name)
        return self.add_bytes(path.read_bytes(), display_name, progress=progress, owner=owner, private=private)

    def add_bytes(
        self,
        data: bytes,
        filename: str,
        *,
        progress: ProgressCallback | None = None,
        owner: str | None = None,
        private: bool = False,
    ) -> Document:
        """Ingest uploaded bytes; only the base name of ``filename`` is kept."""
        name = safe_filename(filename)
        detect_format(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadInputError("data must be bytes")
        data = bytes(data)
        self._check_size(len(data), name)
        if not data:
            raise BadInputError(f"{name!r} is empty")
        return self._ingest(
            data, name, lambda: extract(data, name, max_chars=self.max_chars), len(data), progress or _progress_noop,
            owner=owner or SHARED_USER, private=private,
        )

    def add_text(
        self,
        text: str,
        name: str = "pasted text.txt",
        *,
        progress: ProgressCallback | None = None,
        owner: str | None = None,
        private: bool = False,
    ) -> Document:
        """Ingest raw text; a name ending in .md is split by markdown headings."""
        if not isinstance(text, str):
            raise BadInputError("text must be a string")
        clean_name = safe_filename(name)
        encoded = text.encode("utf-8")
        self._check_size(len(encoded), clean_name)
        if not text.strip():
            raise BadInputError(f"{clean_name!r} is empty")
        fmt = "markdown" if clean_name.lower().endswith((".md", ".markdown")) else "text"
        return self._ingest(
            encoded, clean_name, lambda: extract_text(text, fmt), len(encoded), progress or _progress_noop,
            owner=owner or SHARED_USER, private=private,
        )

    def list_documents(self, user: str | None = None) -> list[Document]:
        """Every ready document ``user`` may see (shared ones and their own private ones), newest first."""
        with self._state_lock:
            documents = [document for document in self._documents.values() if document.visible_to(user)]
        return sorted(documents, key=lambda document: document.added_at, reverse=True)

    def get_document(self, document_id: str, user: str | None = None) -> Document:
        with self._state_lock:
            document = self._documents.get(document_id) if isinstance(document_id, str) else None
        if document is None or not document.visible_to(user):
            raise NotFoundError(f"document {document_id!r} does not exist")
        return document

    def delete_document(self, document_id: str, user: str | None = None) -> None:
        """Delete a document and every chunk of it; it disappears from search at once.

        Anyone may delete a shared document; a private one only its owner (to others it does not exist).
        """
        if not isinstance(document_id, str) or not _DOCUMENT_ID.match(document_id):
            raise NotFoundError(f"document {document_id!r} does not exist")
        if self.shared is not None and not self.shared.applying():  # the database first, then here (issue 16)
            return self.shared.delete_everywhere(self.get_document(document_id, user))
        with self._state_lock:
            document = self._documents.get(document_id)
            if document is None or not document.visible_to(user):
                raise NotFoundError(f"document {document_id!r} does not exist")
            del self._documents[document_id]
        with self._write_lock:
            # The row goes first: if the chunk delete fails, the chunks are orphans (hidden, removed at next start).
            try:
                self._documents_table.delete(f"doc_id = '{document_id}'")
            except Exception as error:  # noqa: BLE001 - put the document back: it is still stored
                with self._state_lock:
                    self._documents[document_id] = document
                raise StoreError(f"deleting document {document.name!r} failed: {error}") from error
            try:
                if self._chunks_table is not None:
                    self._chunks_table.delete(f"doc_id = '{document_id}'")
                self._refresh_vectors()
                self._maintain_locked()
            except Exception:  # noqa: BLE001 - the document is gone; leftover chunks are hidden and removed at restart
                logger.error("removing the chunks of deleted document %s failed", document_id, exc_info=True)
        logger.info("deleted document %s (%s, %d chunks)", document_id, document.name, document.chunk_count)

    def chunk_count(self) -> int:
        """Chunks stored (all documents)."""
        return 0 if self._chunks_table is None else int(self._chunks_table.count_rows())

    def sync_status(self) -> dict[str, Any] | None:
        """How far this instance is behind the shared library (None: not shared); app/store/shared_documents.py."""
        return None if self.shared is None else self.shared.status().model_dump(mode="json")

    def warm_up(self) -> None:
        """Load the embedding model and the in-memory search snapshot now rather than on the first upload or search."""
        self.embedder.warm_up()
        table = self._chunks_table
        if table is not None:
            self._vector_snapshot(table)

    def close(self) -> None:
        """Stop background work (the shared-library thread); every write is already committed, nothing is flushed."""
        if self.shared is not None:
            self.shared.stop()
        logger.debug("RAG store at %s closed", self.db_dir)

    # -- public API: search --------------------------------------------------------

    def search(
        self,
        query: str,
        k: int = 5,
        mode: SearchMode | None = None,
        *,
        min_relevance: float | None = None,
        user: str | None = None,
    ) -> list[SearchHit]:
        """The ``k`` best chunks for ``query`` that ``user`` may see, best first (hybrid by default).

        In vector and hybrid mode a chunk is kept only when its cosine similarity to the query reaches
        ``min_relevance`` (default: the store's ``relevance_floor``) or it contains a code-like query term
        verbatim (``E1074``, ``max_queued_messages``), which embeddings blur; so fewer than ``k`` may come back,
        or none when nothing is related. fts mode is keyword search: no floor.
        """
        mode = mode or self.default_mode
        if mode not in SEARCH_MODES:
            raise BadInputError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if not isinstance(query, str) or not query.strip():
            raise BadInputError("search query must not be empty")
        if len(query) > MAX_QUERY_CHARS:
            raise TooLargeError(f"search query has {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadInputError(f"k must be an integer from 1 to {MAX_K}")
        floor = self.relevance_floor if min_relevance is None else float(min_relevance)
        self._check_model()
        table = self._chunks_table
        with self._state_lock:
            if table is None or not self._documents:
                return []
            names = {doc_id: doc.name for doc_id, doc in self._documents.items() if doc.visible_to(user)}
        if not names:
            return []
        candidates = k if mode != "hybrid" else max(20, 3 * k)
        candidates += 5  # slack for hits dropped below (documents deleted a moment ago)
        snapshot = self._vector_snapshot(table)
        query_vector = self.embedder.encode_query(query) if mode != "fts" else None
        similarities = snapshot.similarities(query_vector) if query_vector is not None else None
        vector_rows = snapshot.search(query_vector, names, candidates, similarities) if mode != "fts" else []
        # A keyword hit's meaning is measured too (hybrid), so the floor treats both lists alike.
        fts_rows = snapshot.keyword_search(query, names, candidates, similarities) if mode != "vector" else []
        rows = fused_ranking([vector_rows, fts_rows], self.rrf_k) if mode == "hybrid" else vector_rows or fts_rows
        terms = identifier_terms(query)
        hits: list[SearchHit] = []
        for row in rows:
            name = names.get(row["doc_id"])
            if name is None:
                continue
            relevance = row.get("relevance")
            exact = bool(terms & word_set(f"{row['heading'] or ''} {row['text']}")) if terms else False
            if relevance is not None and relevance < floor and not exact:
                continue
            hits.append(
                SearchHit(
                    chunk_id=row["chunk_id"],
                    document_id=row["doc_id"],
                    document_name=name,
                    text=row["text"],
                    score=row["score"],
                    section=row["heading"],
                    page=row["page"],
                    chunk_index=row["chunk_index"],
                    char_start=row["char_start"],
                    char_end=row["char_end"],
                    mode=mode,
                    relevance=relevance,
                    match=match_of(relevance, exact, self.relevance_floor),
                )
            )
            if len(hits) == k:
                break
        return hits


    def _vector_snapshot(self, table: Any) -> VectorSnapshot:
        snapshot = self._vectors
        if snapshot is None or snapshot.table is not table:
            with self._write_lock:  # a writer may be replacing it; read the table once, not once per waiting search
                snapshot = self._vectors
                if snapshot is None or snapshot.table is not table:
                    snapshot = self._refresh_vectors()
        return snapshot

    def _refresh_vectors(self) -> VectorSnapshot:
        """Read every chunk's vector and result columns into memory (under the write lock: after each write).

        Why in memory: LanceDB's exact (flat) search over 20,000 rows took 40-65 ms here, mostly reading and
        converting; a matrix product over the same vectors takes ~2 ms (docs/rag.md, Search speed).
        """
        with self._write_lock:
            snapshot = VectorSnapshot.load(self._chunks_table, self._vectors)
            self._vectors = snapshot
        return snapshot

    # -- model changes ---------------------------------------------------------------

    def reindex(self, progress: ProgressCallback | None = None) -> int:
        """Re-embed every chunk with the configured model (after changing ``embedding_model``).

        Blocks uploads and deletions while it runs; searches keep seeing the
        old table until the new one is committed in one write. Returns the
        number of chunks embedded.
        """
        report = progress or _progress_noop
        with self._write_lock:
            if self._chunks_table is None:
                return 0
            columns = [name for name in chunks_schema(1).names if name != "vector"]
            rows = self._chunks_table.to_arrow().select(columns)
            texts = [
                embedding_text(heading, text, name)
                for heading, text, name in zip(
                    rows["heading"].to_pylist(), rows["text"].to_pylist(), rows["doc_name"].to_pylist(), strict=True
                )
            ]
            vectors: list[np.ndarray] = []
            for start in range(0, len(texts), self.batch_size):
                vectors.append(self.embedder.encode(texts[start : start + self.batch_size], batch_size=self.batch_size))
                report(min(0.95, (start + self.batch_size) / max(1, len(texts)) * 0.95), "re-embedding chunks")
            dimension = self.embedder.dimension
            matrix = np.concatenate(vectors) if vectors else np.zeros((0, dimension), dtype=np.float32)
            table = rows.append_column("vector", vector_array(matrix, dimension)).cast(chunks_schema(dimension))
            self._chunks_table = self._db.create_table(CHUNKS_TABLE, data=table, mode="overwrite")
            self._refresh_vectors()
            current = {"embedding_model": self.embedding_model, "embedding_text_version": EMBEDDING_TEXT_VERSION}
            if self._documents_table.count_rows():
                self._documents_table.update(values=current)
            with self._state_lock:
                for doc_id, document in list(self._documents.items()):
                    self._documents[doc_id] = document.model_copy(update=current)
            self._maintain_locked()
        report(1.0, f"re-embedded {len(texts)} chunks with {self.embedding_model}")
        logger.info("re-embedded %d chunks with %s", len(texts), self.embedding_model)
        return len(texts)

    # -- ingestion ---------------------------------------------------------------------

    def _ingest(
        self,
        raw: bytes,
        name: str,
        read: Callable[[], ExtractedDocument],
        size_bytes: int,
        report: ProgressCallback,
        *,
        owner: str,
        private: bool,
    ) -> Document:
        """Extract, chunk, embed and store one document, or leave nothing behind."""
        if not isinstance(owner, str) or not isinstance(private, bool):
            raise BadInputError("owner must be a user name and private true or false")
        self._check_model()
        sha256 = hashlib.sha256(raw).hexdigest()
        while True:
            with self._state_lock:
                existing = self._same_upload(sha256, owner, private)
                if existing is not None:
                    logger.info("upload %s has the same content as document %s (%s)", name, existing.id, existing.name)
                    report(1.0, f"already uploaded as {existing.name}")
                    return existing.model_copy(update={"duplicate": True})
                waiting_for = self._inflight.get(sha256)
                if waiting_for is None:
                    done = self._inflight[sha256] = threading.Event()
                    break
            waiting_for.wait()  # the same content is being ingested by another thread: reuse its result

        document_id = uuid.uuid4().hex
        wrote_chunks = False
        started = time.perf_counter()
        try:
            report(0.0, f"reading {name}")
            extracted = read()
            report(0.05, f"extracted {len(extracted.text)} characters")
            chunks = chunk_document(extracted, **self._chunking)
            if not chunks:
                raise BadInputError(f"{name!r} contains no text to index")
            report(0.1, f"split into {len(chunks)} chunks")
            with self._state_lock:
                self._pending.add(document_id)
            table = self._ensure_chunks_table()
            embedding_started = time.perf_counter()
            for start in range(0, len(chunks), self.batch_size):
                batch = chunks[start : start + self.batch_size]
                vectors = self.embedder.encode(
                    [embedding_text(chunk.heading, chunk.text, name) for chunk in batch], batch_size=self.batch_size
                )
                rows = chunk_rows(document_id, name, batch, vectors, self.embedder.dimension)
                with self._write_lock:
                    wrote_chunks = True
                    table.add(rows)
                done_count = start + len(batch)
                report(
                    0.1 + 0.85 * done_count / len(chunks),
                    embedding_progress(done_count, len(chunks), time.perf_counter() - embedding_started),
                )
            document = Document(
                id=document_id,
                name=name,
                format=extracted.format,
                size_bytes=size_bytes,
                chunk_count=len(chunks),
                char_count=len(extracted.text),
                added_at=datetime.now(tz=timezone.utc),
                sha256=sha256,
                embedding_model=self.embedding_model,
                embedding_text_version=EMBEDDING_TEXT_VERSION,
                owner=owner,
                private=private,
            )
            report(0.97, "indexing")
            with self._write_lock:
                self._documents_table.add(pa.Table.from_pylist([document_row(document)], schema=_DOCUMENTS_SCHEMA))
                self._refresh_vectors()  # before the document is visible, so vector search finds it at once
                with self._state_lock:
                    self._documents[document_id] = document
                    self._pending.discard(document_id)
                try:
                    self._maintain_locked()
                except Exception:  # noqa: BLE001 - the document is stored; an index refresh can wait for the next write
                    logger.warning("table maintenance after adding %s failed", document_id, exc_info=True)
        except BaseException as error:
            self._discard(document_id, wrote_chunks)
            if isinstance(error, StoreError) or not isinstance(error, Exception):
                raise
            logger.warning("ingesting %s failed: %s", name, error, exc_info=True)
            raise StoreError(f"ingesting {name!r} failed: {error}") from error
        finally:
            with self._state_lock:
                self._inflight.pop(sha256, None)
            done.set()
        elapsed = time.perf_counter() - started
        logger.info(
            "added document %s (%s, %s, %d bytes, %d chunks) in %.2f s",
            document_id, name, document.format, size_bytes, len(chunks), elapsed,
        )  # fmt: skip
        report(1.0, f"ready: {len(chunks)} chunks")
        return document if self.shared is None else self.shared.published(document)  # to the other instances

    def _same_upload(self, sha256: str, owner: str, private: bool) -> Document | None:
        """An earlier upload of the same bytes that this one would duplicate: shared with shared, or the same
        owner's private one (a private copy someone else holds must not answer for, or leak into, this one)."""
        for document in self._documents.values():
            if document.sha256 == sha256 and document.private == private and (not private or document.owner == owner):
                return document
        return None

    def _discard(self, document_id: str, wrote_chunks: bool) -> None:
        """Remove every trace of a failed ingestion; never raises over the original error."""
        with self._state_lock:
            self._documents.pop(document_id, None)
        try:
            if wrote_chunks and self._chunks_table is not None:
                with self._write_lock:
                    self._documents_table.delete(f"doc_id = '{document_id}'")
                    self._chunks_table.delete(f"doc_id = '{document_id}'")
        except Exception:  # noqa: BLE001 - leftovers stay hidden by _pending and are removed at next start
            logger.error("could not remove chunks of failed document %s", document_id, exc_info=True)
            return
        with self._state_lock:
            self._pending.discard(document_id)

    def _ensure_chunks_table(self) -> Any:
        """The chunks table, created on first use (its vector width comes from the model)."""
        dimension = self.embedder.dimension
        with self._write_lock:
            table = self._chunks_table
            if table is not None:
                width = table.schema.field("vector").type.list_size
                if width == dimension:
                    return table
                if table.count_rows():
                    raise StoreError(
                        f"stored chunks have {width}-dimensional vectors but {self.embedding_model!r} makes "
                        f"{dimension}; call reindex() after changing the embedding model"
                    )
            table = self._db.create_table(CHUNKS_TABLE, schema=chunks_schema(dimension), mode="overwrite")
            self._chunks_table = table
            return table

    # -- housekeeping ----------------------------------------------------------------

    def _maintain_locked(self) -> None:
        for table in (self._documents_table, self._chunks_table):
            if table is not None:
                table.optimize(cleanup_older_than=VERSION_RETENTION)

    def _add_missing_document_columns(self) -> None:
        """Tables written before private documents existed get ``owner`` and ``private`` (shared) in place."""
        present = set(self._documents_table.schema.names)
        missing = {name: default for name, default in _ADDED_DOCUMENT_COLUMNS.items() if name not in present}
        if missing:
            with self._write_lock:
                self._documents_table.add_columns(missing)
            logger.info("documents table: added columns %s (existing documents stay shared)", ", ".join(missing))

    def _remove_orphan_chunks(self) -> None:
        """Delete chunks whose document row was never written (a crash mid-ingestion)."""
        if self._chunks_table is None:
            return
        stored = set(self._chunks_table.to_arrow().column("doc_id").unique().to_pylist())
        orphans = sorted(stored - set(self._documents))
        if not orphans:
            return
        with self._write_lock:
            for start in range(0, len(orphans), 100):
                ids = ", ".join(f"'{doc_id}'" for doc_id in orphans[start : start + 100] if _DOCUMENT_ID.match(doc_id))
                if ids:
                    self._chunks_table.delete(f"doc_id IN ({ids})")
            self._refresh_vectors()
            self._maintain_locked()
        logger.warning("removed chunks of %d unfinished documents (interrupted uploads)", len(orphans))

    def _check_size(self, size: int, name: str) -> None:
        if size > self.max_upload_bytes:
            raise TooLargeError(
                f"{name!r} is {size / 2**20:.1f} MiB; the upload limit is {self.max_upload_bytes / 2**20:.1f} MiB"
            )

    def _check_model(self) -> None:
        with self._state_lock:
            stale = {document.embedding_model for document in self._documents.values()} - {self.embedding_model}
        if stale:
            raise StoreError(
                f"documents were embedded with {', '.join(sorted(stale))} but the store is configured for "
                f"{self.embedding_model!r}; call reindex() or configure the old model"
            )

    def _table_names(self) -> Iterable[str]:
        lister = getattr(self._db, "list_tables", None)
        if lister is not None:
            try:
                result = lister()
                return list(getattr(result, "tables", result))
            except Exception:  # noqa: BLE001 - older LanceDB: fall back to table_names()
                logger.debug("list_tables failed; using table_names", exc_info=True)
        return list(self._db.table_names())

    @staticmethod
    def _document_from_row(row: dict[str, Any]) -> Document:
        return Document(
            id=row["doc_id"],
            name=row["name"],
            format=row["format"],
            size_bytes=row["size_bytes"],
            chunk_count=row["chunk_count"],
            char_count=row["char_count"],
            added_at=datetime.fromtimestamp(row["added_at"], tz=timezone.utc),
            sha256=row["sha256"],
            embedding_model=row["embedding_model"],
            owner=row.get("owner") or "",
            private=bool(row.get("private")),
            embedding_text_version=row.get("embedding_text_version") or 1,
        )


# -- helpers -------------------------------------------------------------------------


__all__ = [
    "MATCH_LABELS",
    "RELEVANCE_FLOOR",
    "STRONG_MATCH",
    "Document",
    "Match",
    "match_of",
    "ProgressCallback",
    "RagStore",
    "SearchHit",
    "SearchMode",
    "reciprocal_rank_fusion",
]

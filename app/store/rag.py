"""Documents for retrieval-augmented answers, stored in LanceDB.

Layout under ``data_dir/lancedb``: a ``documents`` table (one row per
document) and a ``chunks`` table (text, source location, embedding) with a
native full-text (BM25) index on the chunk text. Search is vector, full-text
or both fused by reciprocal rank (hybrid).

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
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from app.store.chunking import (
    DEFAULT_MAX_WORDS,
    DEFAULT_MIN_WORDS,
    DEFAULT_OVERLAP_WORDS,
    Chunk,
    chunk_document,
)
from app.store.embedding import DEFAULT_EMBEDDING_MODEL, Embedder
from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError
from app.store.extract import ExtractedDocument, detect_format, extract, extract_text, safe_filename

logger = logging.getLogger(__name__)

SearchMode = Literal["hybrid", "vector", "fts"]
SEARCH_MODES: tuple[str, ...] = ("hybrid", "vector", "fts")
ProgressCallback = Callable[[float, str], None]

DOCUMENTS_TABLE = "documents"
CHUNKS_TABLE = "chunks"
MAX_QUERY_CHARS = 4000
MAX_K = 100
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
# Old table versions keep deleted text on disk until pruned; keep them just long enough for in-flight reads.
VERSION_RETENTION = timedelta(seconds=60)
_DOCUMENT_ID = re.compile(r"^[0-9a-f]{32}$")
_RESULT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "heading", "page", "char_start", "char_end", "text"]

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
    ]
)


def _chunks_schema(dimension: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("doc_name", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("heading", pa.string()),
            pa.field("page", pa.int32()),
            pa.field("char_start", pa.int64(), nullable=False),
            pa.field("char_end", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("search_text", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimension), nullable=False),
        ]
    )


class Document(BaseModel):
    """A document in the RAG store. ``duplicate`` is true when an upload matched it by content."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    format: str
    size_bytes: int
    chunk_count: int
    char_count: int
    added_at: datetime
    sha256: str
    embedding_model: str
    duplicate: bool = False


class SearchHit(BaseModel):
    """One retrieved chunk. ``score`` is higher-is-better; its scale depends on ``mode``.

    vector: cosine similarity (-1..1); fts: BM25; hybrid: reciprocal-rank-fusion sum.
    """

    model_config = ConfigDict(frozen=True)

    chunk_id: str
    document_id: str
    document_name: str
    text: str
    score: float
    section: str | None = None
    page: int | None = None
    chunk_index: int
    char_start: int
    char_end: int
    mode: SearchMode

    @property
    def location(self) -> str | None:
        """Where in the document: ``page 3``, a heading path, or both."""
        parts = [f"page {self.page}"] if self.page is not None else []
        if self.section:
            parts.append(self.section)
        return ", ".join(parts) or None


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
        self.batch_size = batch_size
        self._chunking = {"max_words": max_words, "min_words": min_words, "overlap_words": overlap_words}
        self.embedder = embedder or Embedder(embedding_model, device=device, threads=embedding_threads)

        self._write_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._documents: dict[str, Document] = {}
        self._by_sha: dict[str, str] = {}
        self._pending: set[str] = set()
        self._inflight: dict[str, threading.Event] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rag-search")

        self._db = lancedb.connect(str(self.db_dir))
        names = set(self._table_names())
        if DOCUMENTS_TABLE in names:
            self._documents_table = self._db.open_table(DOCUMENTS_TABLE)
        else:
            self._documents_table = self._db.create_table(DOCUMENTS_TABLE, schema=_DOCUMENTS_SCHEMA)
        self._chunks_table: Any = self._db.open_table(CHUNKS_TABLE) if CHUNKS_TABLE in names else None
        for row in self._documents_table.to_arrow().to_pylist():
            document = self._document_from_row(row)
            self._documents[document.id] = document
            self._by_sha[document.sha256] = document.id
        self._remove_orphan_chunks()
        logger.info("RAG store at %s: %d documents", self.db_dir, len(self._documents))

    # -- public API: documents ---------------------------------------------------

    def add_file(
        self, path: Path | str, *, name: str | None = None, progress: ProgressCallback | None = None
    ) -> Document:
        """Ingest a file from disk; ``name`` (default: the file's base name) decides the format and is shown."""
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
        return self.add_bytes(path.read_bytes(), display_name, progress=progress)

    def add_bytes(self, data: bytes, filename: str, *, progress: ProgressCallback | None = None) -> Document:
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
            data, name, lambda: extract(data, name, max_chars=self.max_chars), len(data), progress or _progress_noop
        )

    def add_text(
        self, text: str, name: str = "pasted text.txt", *, progress: ProgressCallback | None = None
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
            encoded, clean_name, lambda: extract_text(text, fmt), len(encoded), progress or _progress_noop
        )

    def list_documents(self) -> list[Document]:
        """Every ready document, newest first."""
        with self._state_lock:
            documents = list(self._documents.values())
        return sorted(documents, key=lambda document: document.added_at, reverse=True)

    def get_document(self, document_id: str) -> Document:
        with self._state_lock:
            document = self._documents.get(document_id) if isinstance(document_id, str) else None
        if document is None:
            raise NotFoundError(f"document {document_id!r} does not exist")
        return document

    def delete_document(self, document_id: str) -> None:
        """Delete a document and every chunk of it; it disappears from search at once."""
        if not isinstance(document_id, str) or not _DOCUMENT_ID.match(document_id):
            raise NotFoundError(f"document {document_id!r} does not exist")
        with self._state_lock:
            document = self._documents.pop(document_id, None)
            if document is None:
                raise NotFoundError(f"document {document_id!r} does not exist")
            self._by_sha.pop(document.sha256, None)
        with self._write_lock:
            # The row goes first: if the chunk delete fails, the chunks are orphans (hidden, removed at next start).
            try:
                self._documents_table.delete(f"doc_id = '{document_id}'")
            except Exception as error:  # noqa: BLE001 - put the document back: it is still stored
                with self._state_lock:
                    self._documents[document_id] = document
                    self._by_sha[document.sha256] = document_id
                raise StoreError(f"deleting document {document.name!r} failed: {error}") from error
            try:
                if self._chunks_table is not None:
                    self._chunks_table.delete(f"doc_id = '{document_id}'")
                self._maintain_locked()
            except Exception:  # noqa: BLE001 - the document is gone; leftover chunks are hidden and removed at restart
                logger.error("removing the chunks of deleted document %s failed", document_id, exc_info=True)
        logger.info("deleted document %s (%s, %d chunks)", document_id, document.name, document.chunk_count)

    def chunk_count(self) -> int:
        """Chunks stored (all documents)."""
        return 0 if self._chunks_table is None else int(self._chunks_table.count_rows())

    def warm_up(self) -> None:
        """Load the embedding model now rather than on the first upload or search."""
        self.embedder.warm_up()

    def close(self) -> None:
        """Stop the search worker threads; every write is already committed, so nothing is flushed."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        logger.debug("RAG store at %s closed", self.db_dir)

    # -- public API: search --------------------------------------------------------

    def search(self, query: str, k: int = 5, mode: SearchMode | None = None) -> list[SearchHit]:
        """The ``k`` best chunks for ``query``, best first (hybrid by default)."""
        mode = mode or self.default_mode
        if mode not in SEARCH_MODES:
            raise BadInputError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if not isinstance(query, str) or not query.strip():
            raise BadInputError("search query must not be empty")
        if len(query) > MAX_QUERY_CHARS:
            raise TooLargeError(f"search query has {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadInputError(f"k must be an integer from 1 to {MAX_K}")
        self._check_model()
        table = self._chunks_table
        with self._state_lock:
            if table is None or not self._documents:
                return []
            excluded = sorted(self._pending)
        where = "doc_id NOT IN ({})".format(", ".join(f"'{doc_id}'" for doc_id in excluded)) if excluded else None
        candidates = k if mode != "hybrid" else max(20, 3 * k)
        candidates += 5  # slack for hits dropped below (documents deleted a moment ago)
        fts_rows: list[dict[str, Any]] = []
        vector_rows: list[dict[str, Any]] = []
        # Hybrid: the keyword search runs in a worker while this thread embeds the query (torch releases the GIL).
        fts_future = self._executor.submit(_fts_rows, table, query, where, candidates) if mode == "hybrid" else None
        if mode == "fts":
            fts_rows = _fts_rows(table, query, where, candidates)
        if mode in ("vector", "hybrid"):
            vector_rows = _vector_rows(table, self.embedder.encode([query])[0], where, candidates)
        if fts_future is not None:
            fts_rows = fts_future.result()
        rows = _rrf([vector_rows, fts_rows], self.rrf_k) if mode == "hybrid" else vector_rows or fts_rows
        hits: list[SearchHit] = []
        with self._state_lock:
            names = {doc_id: document.name for doc_id, document in self._documents.items()}
        for row in rows:
            name = names.get(row["doc_id"])
            if name is None:
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
                )
            )
            if len(hits) == k:
                break
        return hits

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
            columns = [name for name in _chunks_schema(1).names if name != "vector"]
            rows = self._chunks_table.to_arrow().select(columns)
            texts = [
                _embedding_text(heading, text)
                for heading, text in zip(rows["heading"].to_pylist(), rows["text"].to_pylist(), strict=True)
            ]
            vectors: list[np.ndarray] = []
            for start in range(0, len(texts), self.batch_size):
                vectors.append(self.embedder.encode(texts[start : start + self.batch_size], batch_size=self.batch_size))
                report(min(0.95, (start + self.batch_size) / max(1, len(texts)) * 0.95), "re-embedding chunks")
            dimension = self.embedder.dimension
            matrix = np.concatenate(vectors) if vectors else np.zeros((0, dimension), dtype=np.float32)
            table = rows.append_column("vector", _vector_array(matrix, dimension)).cast(_chunks_schema(dimension))
            self._chunks_table = self._db.create_table(CHUNKS_TABLE, data=table, mode="overwrite")
            self._create_fts_index(self._chunks_table)
            if self._documents_table.count_rows():
                self._documents_table.update(values={"embedding_model": self.embedding_model})
            with self._state_lock:
                for doc_id, document in list(self._documents.items()):
                    self._documents[doc_id] = document.model_copy(update={"embedding_model": self.embedding_model})
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
    ) -> Document:
        """Extract, chunk, embed and store one document, or leave nothing behind."""
        self._check_model()
        sha256 = hashlib.sha256(raw).hexdigest()
        while True:
            with self._state_lock:
                existing_id = self._by_sha.get(sha256)
                if existing_id is not None:
                    existing = self._documents[existing_id]
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
            for start in range(0, len(chunks), self.batch_size):
                batch = chunks[start : start + self.batch_size]
                vectors = self.embedder.encode(
                    [_embedding_text(chunk.heading, chunk.text) for chunk in batch], batch_size=self.batch_size
                )
                rows = _chunk_rows(document_id, name, batch, vectors, self.embedder.dimension)
                with self._write_lock:
                    wrote_chunks = True
                    table.add(rows)
                done_count = start + len(batch)
                report(0.1 + 0.85 * done_count / len(chunks), f"embedded {done_count}/{len(chunks)} chunks")
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
            )
            report(0.97, "indexing")
            with self._write_lock:
                self._documents_table.add(pa.Table.from_pylist([_document_row(document)], schema=_DOCUMENTS_SCHEMA))
                with self._state_lock:
                    self._documents[document_id] = document
                    self._by_sha[sha256] = document_id
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
        return document

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
            table = self._db.create_table(CHUNKS_TABLE, schema=_chunks_schema(dimension), mode="overwrite")
            self._create_fts_index(table)
            self._chunks_table = table
            return table

    @staticmethod
    def _create_fts_index(table: Any) -> None:
        # Native (Lance) inverted index, BM25; rows added later are searched unindexed until optimize() folds them in.
        table.create_fts_index("search_text", use_tantivy=False, replace=True, with_position=False)

    # -- housekeeping ----------------------------------------------------------------

    def _maintain_locked(self) -> None:
        for table in (self._documents_table, self._chunks_table):
            if table is not None:
                table.optimize(cleanup_older_than=VERSION_RETENTION)

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
        )


# -- helpers -------------------------------------------------------------------------


def _vector_rows(table: Any, vector: np.ndarray, where: str | None, limit: int) -> list[dict[str, Any]]:
    # Vectors are unit length, so dot product equals cosine similarity and is cheaper ("dot" distance = 1 - dot).
    builder = table.search(vector, vector_column_name="vector").distance_type("dot")
    if where:
        builder = builder.where(where, prefilter=True)
    rows = builder.select([*_RESULT_COLUMNS, "_distance"]).limit(limit).to_list()
    for row in rows:
        row["score"] = 1.0 - float(row.pop("_distance"))
    return rows


def _fts_rows(table: Any, query: str, where: str | None, limit: int) -> list[dict[str, Any]]:
    builder = table.search(query, query_type="fts", fts_columns="search_text")
    if where:
        builder = builder.where(where, prefilter=True)
    rows = builder.select([*_RESULT_COLUMNS, "_score"]).limit(limit).to_list()
    for row in rows:
        row["score"] = float(row.pop("_score"))
    return rows


def _embedding_text(heading: str | None, text: str) -> str:
    """What the model embeds: the heading path gives a short chunk its topic."""
    return f"{heading}\n\n{text}" if heading else text


def _vector_array(matrix: np.ndarray, dimension: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dimension)


def _chunk_rows(document_id: str, name: str, chunks: Sequence[Chunk], vectors: np.ndarray, dimension: int) -> pa.Table:
    columns = {
        "chunk_id": [f"{document_id}:{chunk.index}" for chunk in chunks],
        "doc_id": [document_id] * len(chunks),
        "doc_name": [name] * len(chunks),
        "chunk_index": [chunk.index for chunk in chunks],
        "heading": [chunk.heading for chunk in chunks],
        "page": [chunk.page for chunk in chunks],
        "char_start": [chunk.char_start for chunk in chunks],
        "char_end": [chunk.char_end for chunk in chunks],
        "text": [chunk.text for chunk in chunks],
        "search_text": [f"{name}\n{chunk.heading or ''}\n{chunk.text}" for chunk in chunks],
    }
    schema = _chunks_schema(dimension)
    arrays = [pa.array(values, type=schema.field(column).type) for column, values in columns.items()]
    arrays.append(_vector_array(vectors, dimension))
    return pa.Table.from_arrays(arrays, schema=schema)


def _document_row(document: Document) -> dict[str, Any]:
    return {
        "doc_id": document.id,
        "name": document.name,
        "format": document.format,
        "sha256": document.sha256,
        "size_bytes": document.size_bytes,
        "char_count": document.char_count,
        "chunk_count": document.chunk_count,
        "added_at": document.added_at.timestamp(),
        "embedding_model": document.embedding_model,
    }


def _rrf(rankings: Sequence[Sequence[dict[str, Any]]], rrf_k: int) -> list[dict[str, Any]]:
    """Reciprocal-rank fusion: each list adds ``1 / (rrf_k + rank)`` to a chunk's score.

    Ranks, not raw scores, are fused because cosine similarity and BM25 are on
    unrelated scales. Equal sums (rank 1 + rank 2 against rank 2 + rank 1) are
    common, so ties go to the better rank in the earlier list (vector first),
    which keeps results deterministic.
    """
    fused: dict[str, dict[str, Any]] = {}
    ranks: dict[str, list[float]] = {}
    for list_index, ranking in enumerate(rankings):
        for rank, row in enumerate(ranking, start=1):
            entry = fused.setdefault(row["chunk_id"], {**row, "score": 0.0})
            entry["score"] += 1.0 / (rrf_k + rank)
            ranks.setdefault(row["chunk_id"], [math.inf] * len(rankings))[list_index] = rank
    return sorted(fused.values(), key=lambda row: (-row["score"], ranks[row["chunk_id"]], row["chunk_id"]))


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], rrf_k: int = 60) -> list[tuple[str, float]]:
    """RRF over plain id lists (best first); exposed for the benchmark and tests."""
    fused = _rrf([[{"chunk_id": item} for item in ranking] for ranking in rankings], rrf_k)
    return [(row["chunk_id"], row["score"]) for row in fused]


__all__ = [
    "Document",
    "ProgressCallback",
    "RagStore",
    "SearchHit",
    "SearchMode",
    "reciprocal_rank_fusion",
]

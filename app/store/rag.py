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

Relevance: every hit of a vector or hybrid search carries ``relevance``, the
cosine similarity of the query and the chunk. Unlike a fused rank score it
means the same across queries, so a fixed floor (``relevance_floor``,
calibrated on tests/support/rag_corpus.py, see docs/rag.md) can drop passages
that are merely the least unrelated ones. A document can be private to its
uploader (``owner``); it is then listed, searched and deleted only for them.
"""

from __future__ import annotations

import contextlib
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
from app.store.sessions import SHARED_USER

logger = logging.getLogger(__name__)

SearchMode = Literal["hybrid", "vector", "fts"]
SEARCH_MODES: tuple[str, ...] = ("hybrid", "vector", "fts")
ProgressCallback = Callable[[float, str], None]
Match = Literal["strong", "partial", "keyword", "weak"]

EMBEDDING_TEXT_VERSION = 2
"""What a chunk's embedded text is made of. 1: heading path + chunk; 2: the document's title stands in for the
heading when the chunk has none (plain text, PDF pages). Documents record theirs; see docs/rag.md, Chunking."""
RELEVANCE_FLOOR = 0.32
"""Cosine similarity below which a passage is not cited (all-MiniLM-L6-v2; calibration in docs/rag.md)."""
STRONG_MATCH = 0.5
"""Cosine similarity from which a passage is called a strong match."""
MATCH_LABELS: dict[str, str] = {
    "strong": "strong match",
    "partial": "partial match",
    "keyword": "exact term match",
    "weak": "weak match",
}
"""How each :data:`Match` is said to a user (UI, citations)."""

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
        pa.field("owner", pa.string(), nullable=False),
        pa.field("private", pa.bool_(), nullable=False),
        pa.field("embedding_text_version", pa.int32(), nullable=False),
    ]
)
_ADDED_DOCUMENT_COLUMNS = {"owner": "''", "private": "false", "embedding_text_version": "CAST(1 AS INT)"}
"""Columns added after the first release, with the SQL default that existing rows get (shared, no owner)."""
_IDENTIFIER_CHARS = re.compile(r"\w+", re.UNICODE)


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
    owner: str = ""
    private: bool = False
    embedding_text_version: int = 1

    def visible_to(self, user: str | None) -> bool:
        """Shared documents are everybody's; a private one only its owner's (None: the shared user, i.e. no login)."""
        return not self.private or self.owner == (user or SHARED_USER)


class SearchHit(BaseModel):
    """One retrieved chunk. ``score`` is higher-is-better; its scale depends on ``mode``.

    vector: cosine similarity (-1..1); fts: BM25; hybrid: reciprocal-rank-fusion sum. ``relevance`` is the
    cosine similarity in every mode but fts (None there: keyword search does not load the model), and
    ``match`` says it in words: strong, partial, weak (below the floor), or keyword (an exact term or fts).
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
    relevance: float | None = None
    match: Match = "partial"

    @property
    def match_label(self) -> str:
        return MATCH_LABELS[self.match]

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
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rag-search")
        self._vectors: _VectorSnapshot | None = None
        self._vectors_lock = threading.Lock()

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

    def warm_up(self) -> None:
        """Load the embedding model now rather than on the first upload or search."""
        self.embedder.warm_up()

    def close(self) -> None:
        """Stop the search worker threads; every write is already committed, so nothing is flushed."""
        self._executor.shutdown(wait=False, cancel_futures=True)
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
            hidden = [doc_id for doc_id in self._documents if doc_id not in names]
            excluded = sorted(self._pending.union(hidden))
        if not names:
            return []
        where = "doc_id NOT IN ({})".format(", ".join(f"'{doc_id}'" for doc_id in excluded)) if excluded else None
        candidates = k if mode != "hybrid" else max(20, 3 * k)
        candidates += 5  # slack for hits dropped below (documents deleted a moment ago)
        fts_rows: list[dict[str, Any]] = []
        vector_rows: list[dict[str, Any]] = []
        # Hybrid: the keyword search runs in a worker while this thread embeds the query (torch releases the GIL).
        fts_future = (
            self._executor.submit(_fts_rows, table, query, where, candidates, True) if mode == "hybrid" else None
        )
        if mode == "fts":
            fts_rows = _fts_rows(table, query, where, candidates)
        query_vector = self.embedder.encode_query(query) if mode != "fts" else None
        if query_vector is not None:
            vector_rows = self._vector_snapshot(table).search(query_vector, names, candidates)
        if fts_future is not None:
            fts_rows = fts_future.result()
            for row in fts_rows:  # a keyword hit's meaning is measured too, so the floor treats both lists alike
                row["relevance"] = float(np.dot(np.asarray(row.pop("vector"), dtype=np.float32), query_vector))
        rows = _rrf([vector_rows, fts_rows], self.rrf_k) if mode == "hybrid" else vector_rows or fts_rows
        terms = _identifier_terms(query)
        hits: list[SearchHit] = []
        for row in rows:
            name = names.get(row["doc_id"])
            if name is None:
                continue
            relevance = row.get("relevance")
            exact = bool(terms & _words(f"{row['heading'] or ''} {row['text']}")) if terms else False
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


    def _vector_snapshot(self, table: Any) -> _VectorSnapshot:
        snapshot = self._vectors
        if snapshot is None or snapshot.table is not table:
            with self._write_lock:  # a writer may be replacing it; read the table once, not once per waiting search
                snapshot = self._vectors
                if snapshot is None or snapshot.table is not table:
                    snapshot = self._refresh_vectors()
        return snapshot

    def _refresh_vectors(self) -> _VectorSnapshot:
        """Read every chunk's vector and result columns into memory (under the write lock: after each write).

        Why in memory: LanceDB's exact (flat) search over 20,000 rows took 40-65 ms here, mostly reading and
        converting; a matrix product over the same vectors takes ~2 ms (docs/rag.md, Search speed).
        """
        with self._write_lock:
            snapshot = _VectorSnapshot.load(self._chunks_table)
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
            columns = [name for name in _chunks_schema(1).names if name != "vector"]
            rows = self._chunks_table.to_arrow().select(columns)
            texts = [
                _embedding_text(heading, text, name)
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
            table = rows.append_column("vector", _vector_array(matrix, dimension)).cast(_chunks_schema(dimension))
            self._chunks_table = self._db.create_table(CHUNKS_TABLE, data=table, mode="overwrite")
            self._create_fts_index(self._chunks_table)
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
                    [_embedding_text(chunk.heading, chunk.text, name) for chunk in batch], batch_size=self.batch_size
                )
                rows = _chunk_rows(document_id, name, batch, vectors, self.embedder.dimension)
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
                self._documents_table.add(pa.Table.from_pylist([_document_row(document)], schema=_DOCUMENTS_SCHEMA))
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
        return document

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


_blas_controller: Any = None
_blas_controller_lock = threading.Lock()


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Run the similarity product on one BLAS thread (threadpoolctl; a no-op without it).

    Why: OpenBLAS splits even a 20,000 x 384 product over every core; on a busy 2-core host a preempted
    helper thread stalls the rest, as with torch (docs/rag.md, CPU threads): p95 49 ms against 7 ms on one thread.
    """
    global _blas_controller
    if _blas_controller is None:
        with _blas_controller_lock:
            if _blas_controller is None:
                try:
                    from threadpoolctl import ThreadpoolController

                    _blas_controller = ThreadpoolController()
                except ImportError:
                    _blas_controller = False
    if _blas_controller is False:
        return contextlib.nullcontext()
    return _blas_controller.limit(limits=1, user_api="blas")


class _VectorSnapshot:
    """Every chunk's unit vector as one float32 matrix, and its result columns, as of one table version.

    Immutable once built; a write builds a new one and swaps the reference, so searches never lock. Rows of
    documents that are pending, deleted a moment ago or not visible to the asker are masked by document id.
    """

    def __init__(self, table: Any, rows: pa.Table, matrix: np.ndarray) -> None:
        self.table = table
        self.rows = rows
        self.matrix = matrix
        doc_ids = rows.column("doc_id").combine_chunks().dictionary_encode() if rows.num_rows else None
        self.doc_ids: list[str] = doc_ids.dictionary.to_pylist() if doc_ids is not None else []
        self.doc_codes = (
            doc_ids.indices.to_numpy(zero_copy_only=False) if doc_ids is not None else np.zeros(0, dtype=np.int32)
        )

    @classmethod
    def load(cls, table: Any) -> _VectorSnapshot:
        if table is None:
            return cls(None, pa.table({name: [] for name in _RESULT_COLUMNS}), np.zeros((0, 0), dtype=np.float32))
        arrow = table.to_arrow()
        vectors = arrow.column("vector").combine_chunks()
        dimension = vectors.type.list_size
        matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dimension)
        return cls(table, arrow.select(_RESULT_COLUMNS).combine_chunks(), np.ascontiguousarray(matrix))

    def search(self, vector: np.ndarray, visible: dict[str, str], limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most similar chunks of ``visible`` documents, best first, as result rows.

        Vectors are unit length, so the dot product is the cosine similarity; ties go to the earlier row.
        """
        if not len(self.doc_codes):
            return []
        with _one_blas_thread():
            scores = self.matrix @ vector.astype(np.float32, copy=False)
        allowed = np.fromiter((doc_id in visible for doc_id in self.doc_ids), dtype=bool, count=len(self.doc_ids))
        if not allowed.all():
            scores[~allowed[self.doc_codes]] = -np.inf
        limit = min(limit, int(np.count_nonzero(scores > -np.inf)))
        if limit <= 0:
            return []
        top = np.argpartition(-scores, limit - 1)[:limit] if limit < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]
        rows = self.rows.take(pa.array(top)).to_pylist()
        for row, index in zip(rows, top, strict=True):
            row["score"] = row["relevance"] = float(scores[index])
        return rows


def _fts_rows(
    table: Any, query: str, where: str | None, limit: int, with_vectors: bool = False
) -> list[dict[str, Any]]:
    builder = table.search(query, query_type="fts", fts_columns="search_text")
    if where:
        builder = builder.where(where, prefilter=True)
    columns = [*_RESULT_COLUMNS, "_score", *(["vector"] if with_vectors else [])]
    rows = builder.select(columns).limit(limit).to_list()
    for row in rows:
        row["score"] = float(row.pop("_score"))
    return rows


def match_of(relevance: float | None, exact: bool, floor: float = RELEVANCE_FLOOR) -> Match:
    """Strong, partial or weak by cosine similarity; keyword for fts (no similarity) or an exact code below."""
    if relevance is None:
        return "keyword"
    if relevance >= STRONG_MATCH:
        return "strong"
    if relevance >= floor:
        return "partial"
    return "keyword" if exact else "weak"


def embedding_progress(done: int, total: int, elapsed_s: float) -> str:
    """``embedded 48/210 chunks, about 20 s left``: the time left from the rate measured so far."""
    text = f"embedded {done}/{total} chunks"
    if done <= 0 or done >= total or elapsed_s <= 0:
        return text
    seconds_left = (total - done) * elapsed_s / done
    return f"{text}, about {duration_words(seconds_left)} left"


def duration_words(seconds: float) -> str:
    """``8 s``, ``3 min 20 s``, ``1 h 5 min``: rounded so the estimate does not claim more precision than it has."""
    seconds = max(1, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 600:
        minutes, rest = divmod(round(seconds / 10) * 10, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _words(text: str) -> frozenset[str]:
    return frozenset(word.lower() for word in _IDENTIFIER_CHARS.findall(text))


def _identifier_terms(query: str) -> frozenset[str]:
    """The query's code-like words: letters with digits (``E1074``, ``WPA3``) or joined by ``_``.

    Embeddings place neighbouring codes close together and a code's own chunk may score under the floor,
    while the exact word in the chunk is strong evidence; plain numbers (``17``, ``1998``) are not codes.
    """
    terms = set()
    for word in _IDENTIFIER_CHARS.findall(query):
        has_letter = any(character.isalpha() for character in word)
        has_digit = any(character.isdigit() for character in word)
        if len(word) >= 2 and has_letter and (has_digit or "_" in word.strip("_")):
            terms.add(word.lower())
    return frozenset(terms)


def document_title(name: str) -> str:
    """A document's name as words: ``timeout.1.txt`` → ``timeout.1``, ``error_codes.md`` → ``error codes``."""
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return re.sub(r"[_\s]+", " ", stem).strip() or name


def _embedding_text(heading: str | None, text: str, document_name: str | None = None) -> str:
    """What the model embeds: the heading path gives a short chunk its topic; without one, the document's title.

    Why the title only when there is no heading: with it, plain-text and PDF chunks know what they are about
    (held-out passage recall up in hybrid mode); put in front of a markdown heading path as well, it cost the
    labelled corpus a rank-1 answer (docs/rag.md, Held-out recall).
    """
    header = heading or (document_title(document_name) if document_name else None)
    return f"{header}\n\n{text}" if header else text


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
        "owner": document.owner,
        "private": document.private,
        "embedding_text_version": document.embedding_text_version,
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

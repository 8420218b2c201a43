"""The document library in PostgreSQL, the source of truth that several app instances share (issue 16).

Tables (prefix ``rag_``; the chat store's tables live in the same database):

* ``rag_documents``: one row per document with everything :class:`~app.store.library.Document` holds, the
  vector width, and who published it. A unique index on (sha256, private, owner of a private copy) makes the
  same file uploaded on two instances one document, as one instance's own duplicate check does.
* ``rag_chunks``: each chunk's text, location, keyword text and embedding (float32 little-endian ``bytea``,
  copied as it is: an instance never re-embeds another's upload). Deleted with their document.
* ``rag_deleted_documents``: the ids of deleted documents, so an instance that was away when a document was
  deleted removes it rather than publishing it back.

Every change is announced on the ``slb_documents`` channel (``added <id>`` / ``deleted <id>``) in the same
transaction, so listeners hear of it exactly when it is committed. These are plain functions of a psycopg 3
connection: app/store/shared_documents.py decides when to call them and what to do locally.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from app.store.errors import StoreError
from app.store.library import Document, chunks_schema

logger = logging.getLogger(__name__)

CHANNEL = "slb_documents"
SCHEMA_LOCK = 726_016
"""Advisory lock id held while creating the tables: two instances starting at once would race on them."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS rag_documents (
    doc_id text PRIMARY KEY,
    name text NOT NULL,
    format text NOT NULL,
    sha256 text NOT NULL,
    size_bytes bigint NOT NULL,
    char_count bigint NOT NULL,
    chunk_count integer NOT NULL,
    added_at timestamptz NOT NULL,
    embedding_model text NOT NULL,
    embedding_text_version integer NOT NULL,
    dimension integer NOT NULL,
    owner text NOT NULL,
    private boolean NOT NULL,
    published_by text NOT NULL DEFAULT '',
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS rag_documents_same_upload
    ON rag_documents (sha256, private, (CASE WHEN private THEN owner ELSE '' END));
CREATE TABLE IF NOT EXISTS rag_chunks (
    doc_id text NOT NULL REFERENCES rag_documents (doc_id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    heading text,
    page integer,
    char_start bigint NOT NULL,
    char_end bigint NOT NULL,
    text text NOT NULL,
    search_text text NOT NULL,
    vector bytea NOT NULL,
    PRIMARY KEY (doc_id, chunk_index)
);
CREATE TABLE IF NOT EXISTS rag_deleted_documents (
    doc_id text PRIMARY KEY,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
"""

_DOCUMENT_COLUMNS = (
    "doc_id, name, format, sha256, size_bytes, char_count, chunk_count, added_at, embedding_model, "
    "embedding_text_version, dimension, owner, private"
)


class LibraryModelMismatch(StoreError):
    """The shared library holds vectors of another embedding model than this instance's: searching them together
    would rank by noise, so the instance refuses rather than mixing."""

    http_status = 409


class Published:
    """What publishing a local document came to: stored, already there, a duplicate of another, or deleted."""

    STORED = "stored"
    PRESENT = "present"
    DUPLICATE = "duplicate"
    DELETED = "deleted"


def prepare(connection: Any, embedding_model: str) -> None:
    """Create the tables if missing; refuse a library embedded with another model (:class:`LibraryModelMismatch`)."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        connection.execute(SCHEMA)
    other = other_models(connection, embedding_model)
    if other:
        raise LibraryModelMismatch(mismatch_message(other, embedding_model))


def other_models(connection: Any, embedding_model: str) -> list[str]:
    rows = connection.execute(
        "SELECT DISTINCT embedding_model FROM rag_documents WHERE embedding_model <> %s ORDER BY 1", (embedding_model,)
    ).fetchall()
    return [row[0] for row in rows]


def mismatch_message(other: Sequence[str], embedding_model: str) -> str:
    return (
        f"the shared document library holds documents embedded with {', '.join(repr(m) for m in other)} but this "
        f"instance uses {embedding_model!r}; give every instance the same --embedding-model (docs/rag.md, Shared "
        "documents)"
    )


def document_ids(connection: Any) -> dict[str, str]:
    """Every shared document's id → its embedding model (metadata only: the reconcile compares id sets)."""
    return dict(connection.execute("SELECT doc_id, embedding_model FROM rag_documents").fetchall())


def deleted_among(connection: Any, ids: Iterable[str]) -> set[str]:
    """Which of ``ids`` were deleted from the shared library."""
    wanted = list(ids)
    if not wanted:
        return set()
    rows = connection.execute("SELECT doc_id FROM rag_deleted_documents WHERE doc_id = ANY(%s)", (wanted,))
    return {row[0] for row in rows.fetchall()}


def publish(connection: Any, document: Document, chunks: pa.Table, instance: str) -> tuple[str, Document | None]:
    """Store a local document and its chunks (vectors included) in one transaction and announce it.

    Returns (:class:`Published` outcome, the shared document it duplicates when DUPLICATE). A document deleted
    elsewhere is not stored again (DELETED); one of another embedding model raises :class:`LibraryModelMismatch`.
    """
    vectors = chunks.column("vector").combine_chunks()
    dimension = vectors.type.list_size
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).astype("<f4").reshape(-1, dimension)
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK + 1,))  # one publisher at a time
        if deleted_among(connection, [document.id]):
            return Published.DELETED, None
        other = other_models(connection, document.embedding_model)
        if other:
            raise LibraryModelMismatch(mismatch_message(other, document.embedding_model))
        inserted = connection.execute(
            f"INSERT INTO rag_documents ({_DOCUMENT_COLUMNS}, published_by) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (document.id, document.name, document.format, document.sha256, document.size_bytes,
             document.char_count, document.chunk_count, document.added_at, document.embedding_model,
             document.embedding_text_version, dimension, document.owner, document.private, instance),
        ).rowcount
        if not inserted:
            if connection.execute("SELECT 1 FROM rag_documents WHERE doc_id = %s", (document.id,)).fetchone():
                return Published.PRESENT, None
            return Published.DUPLICATE, same_upload(connection, document)
        columns = {name: chunks.column(name).to_pylist() for name in
                   ("chunk_index", "heading", "page", "char_start", "char_end", "text", "search_text")}
        rows = [
            (document.id, columns["chunk_index"][row], columns["heading"][row], columns["page"][row],
             columns["char_start"][row], columns["char_end"][row], columns["text"][row],
             columns["search_text"][row], matrix[row].tobytes())
            for row in range(chunks.num_rows)
        ]
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO rag_chunks (doc_id, chunk_index, heading, page, char_start, char_end, text, "
                "search_text, vector) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
        connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"added {document.id}"))
    return Published.STORED, None


def same_upload(connection: Any, document: Document) -> Document | None:
    """The shared document that holds the same bytes for the same audience (shared, or the same owner's private)."""
    row = connection.execute(
        f"SELECT {_DOCUMENT_COLUMNS} FROM rag_documents WHERE sha256 = %s AND private = %s "
        "AND (NOT private OR owner = %s)",
        (document.sha256, document.private, document.owner),
    ).fetchone()
    return None if row is None else _document(row)


def delete(connection: Any, document_id: str) -> None:
    """Delete a document everywhere: its rows go, its id is remembered as deleted, and every instance is told."""
    with connection.transaction():
        connection.execute("DELETE FROM rag_documents WHERE doc_id = %s", (document_id,))
        connection.execute(
            "INSERT INTO rag_deleted_documents (doc_id) VALUES (%s) ON CONFLICT DO NOTHING", (document_id,)
        )
        connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"deleted {document_id}"))


def fetch(connection: Any, ids: Sequence[str]) -> list[tuple[Document, pa.Table]]:
    """The documents among ``ids`` that exist, each with its chunks as rows of the local chunks table."""
    if not ids:
        return []
    documents = {
        row[0]: (_document(row), int(row[10]))
        for row in connection.execute(
            f"SELECT {_DOCUMENT_COLUMNS} FROM rag_documents WHERE doc_id = ANY(%s)", (list(ids),)
        ).fetchall()
    }
    chunk_rows: dict[str, list[tuple[Any, ...]]] = {doc_id: [] for doc_id in documents}
    for row in connection.execute(
        "SELECT doc_id, chunk_index, heading, page, char_start, char_end, text, search_text, vector "
        "FROM rag_chunks WHERE doc_id = ANY(%s) ORDER BY doc_id, chunk_index",
        (list(documents),),
    ):
        chunk_rows[row[0]].append(row)
    result = []
    for doc_id, (document, dimension) in documents.items():
        rows = chunk_rows[doc_id]
        if len(rows) != document.chunk_count:  # cannot happen within one transaction; never copy half a document
            logger.error("shared document %s has %d of %d chunks; not copied", doc_id, len(rows), document.chunk_count)
            continue
        result.append((document, _chunk_table(document, rows, dimension)))
    return result


def _chunk_table(document: Document, rows: list[tuple[Any, ...]], dimension: int) -> pa.Table:
    schema = chunks_schema(dimension)
    matrix = np.frombuffer(b"".join(bytes(row[8]) for row in rows), dtype="<f4").astype(np.float32)
    if matrix.size != len(rows) * dimension:
        raise StoreError(f"shared document {document.id} has vectors of another width than {dimension}")
    columns = {
        "chunk_id": [f"{document.id}:{row[1]}" for row in rows],
        "doc_id": [document.id] * len(rows),
        "doc_name": [document.name] * len(rows),
        "chunk_index": [row[1] for row in rows],
        "heading": [row[2] for row in rows],
        "page": [row[3] for row in rows],
        "char_start": [row[4] for row in rows],
        "char_end": [row[5] for row in rows],
        "text": [row[6] for row in rows],
        "search_text": [row[7] for row in rows],
    }
    arrays = [pa.array(values, type=schema.field(name).type) for name, values in columns.items()]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix, type=pa.float32()), dimension))
    return pa.Table.from_arrays(arrays, schema=schema)


def _document(row: Sequence[Any]) -> Document:
    return Document(
        id=row[0], name=row[1], format=row[2], sha256=row[3], size_bytes=row[4], char_count=row[5],
        chunk_count=row[6], added_at=row[7], embedding_model=row[8], embedding_text_version=row[9],
        owner=row[11], private=row[12],
    )

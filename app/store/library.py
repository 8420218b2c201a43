"""What the document library holds and how its search hits read: documents, hits, relevance in words, rows.

Pure data and functions, kept apart from app/store/rag.py (the store: uploads, tables, search, who may see
what) so a reader can hold each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from app.store.chunking import Chunk
from app.store.sessions import SHARED_USER

SearchMode = Literal["hybrid", "vector", "fts"]
SEARCH_MODES: tuple[str, ...] = ("hybrid", "vector", "fts")
IDENTIFIER_CHARS = re.compile(r"\w+", re.UNICODE)


def chunks_schema(dimension: int) -> pa.Schema:
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


Match = Literal["strong", "partial", "keyword", "weak"]
"""How strongly a passage matches a question, in words (:data:`MATCH_LABELS`)."""

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


def word_set(text: str) -> frozenset[str]:
    return frozenset(word.lower() for word in IDENTIFIER_CHARS.findall(text))


def identifier_terms(query: str) -> frozenset[str]:
    """The query's code-like words: letters with digits (``E1074``, ``WPA3``) or joined by ``_``.

    Embeddings place neighbouring codes close together and a code's own chunk may score under the floor,
    while the exact word in the chunk is strong evidence; plain numbers (``17``, ``1998``) are not codes.
    """
    terms = set()
    for word in IDENTIFIER_CHARS.findall(query):
        has_letter = any(character.isalpha() for character in word)
        has_digit = any(character.isdigit() for character in word)
        if len(word) >= 2 and has_letter and (has_digit or "_" in word.strip("_")):
            terms.add(word.lower())
    return frozenset(terms)


def document_title(name: str) -> str:
    """A document's name as words: ``timeout.1.txt`` → ``timeout.1``, ``error_codes.md`` → ``error codes``."""
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return re.sub(r"[_\s]+", " ", stem).strip() or name


def embedding_text(heading: str | None, text: str, document_name: str | None = None) -> str:
    """What the model embeds: the heading path gives a short chunk its topic; without one, the document's title.

    Why the title only when there is no heading: with it, plain-text and PDF chunks know what they are about
    (held-out passage recall up in hybrid mode); put in front of a markdown heading path as well, it cost the
    labelled corpus a rank-1 answer (docs/rag.md, Held-out recall).
    """
    header = heading or (document_title(document_name) if document_name else None)
    return f"{header}\n\n{text}" if header else text


def vector_array(matrix: np.ndarray, dimension: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dimension)


def chunk_rows(document_id: str, name: str, chunks: Sequence[Chunk], vectors: np.ndarray, dimension: int) -> pa.Table:
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
    schema = chunks_schema(dimension)
    arrays = [pa.array(values, type=schema.field(column).type) for column, values in columns.items()]
    arrays.append(vector_array(vectors, dimension))
    return pa.Table.from_arrays(arrays, schema=schema)


def document_row(document: Document) -> dict[str, Any]:
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

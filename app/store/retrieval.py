"""Search primitives of the document store: the in-memory vector snapshot, keyword search, rank fusion.

Kept apart from app/store/rag.py (uploads, the tables, who may see what) because they are the hot path of a
search and pure functions of their arguments (docs/rag.md, Search speed).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from app.store.keywords import KeywordIndex

RESULT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "heading", "page", "char_start", "char_end", "text"]
"""The chunk columns a search hit is made from."""


_blas_controller: Any = None
_blas_controller_lock = threading.Lock()


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
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


class VectorSnapshot:
    """Every chunk's unit vector as one float32 matrix, its result columns and keyword index, as of one table version.

    Immutable once built; a write builds a new one and swaps the reference, so searches never lock. Rows of
    documents that are pending, deleted a moment ago or not visible to the asker are masked by document id.
    """

    def __init__(self, table: Any, rows: pa.Table, matrix: np.ndarray, keywords: KeywordIndex | None = None) -> None:
        self.table = table
        self.rows = rows
        self.matrix = matrix
        doc_ids = rows.column("doc_id").combine_chunks().dictionary_encode() if rows.num_rows else None
        self.doc_ids: list[str] = doc_ids.dictionary.to_pylist() if doc_ids is not None else []
        self.doc_codes = (
            doc_ids.indices.to_numpy(zero_copy_only=False) if doc_ids is not None else np.zeros(0, dtype=np.int32)
        )
        self.keywords = keywords or KeywordIndex([], [])

    @classmethod
    def load(cls, table: Any, previous: VectorSnapshot | None = None) -> VectorSnapshot:
        """Read ``table`` whole; ``previous`` lends its keyword index's tokenized chunks (only new ones are read)."""
        if table is None:
            return cls(None, pa.table({name: [] for name in RESULT_COLUMNS}), np.zeros((0, 0), dtype=np.float32))
        arrow = table.to_arrow()
        vectors = arrow.column("vector").combine_chunks()
        dimension = vectors.type.list_size
        matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dimension)
        keywords = KeywordIndex(
            arrow.column("chunk_id").to_pylist(),
            arrow.column("search_text").to_pylist(),
            previous.keywords if previous is not None else None,
        )
        return cls(table, arrow.select(RESULT_COLUMNS).combine_chunks(), np.ascontiguousarray(matrix), keywords)

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of every row to the query (vectors are unit length, so the dot product)."""
        with one_blas_thread():
            return self.matrix @ vector.astype(np.float32, copy=False)

    def search(
        self, vector: np.ndarray, visible: dict[str, str], limit: int, similarities: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """The ``limit`` most similar chunks of ``visible`` documents, best first, as result rows; ties go to the
        earlier row. ``similarities`` (from :meth:`similarities`) saves computing them again."""
        if not len(self.doc_codes):
            return []
        scores = self.similarities(vector) if similarities is None else similarities
        return self._best(scores, scores, visible, limit)

    def keyword_search(
        self, query: str, visible: dict[str, str], limit: int, similarities: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """The ``limit`` best BM25 matches of ``visible`` documents (chunks holding no query term never count).

        Each row's ``relevance`` is its cosine similarity when ``similarities`` is given (hybrid), so the floor
        treats keyword hits like vector hits.
        """
        if not len(self.doc_codes):
            return []
        scores = self.keywords.scores(query)
        if scores is None:
            return []
        return self._best(np.where(scores > 0, scores, -np.inf), similarities, visible, limit)

    def _best(
        self, scores: np.ndarray, relevance: np.ndarray | None, visible: dict[str, str], limit: int
    ) -> list[dict[str, Any]]:
        allowed = np.fromiter((doc_id in visible for doc_id in self.doc_ids), dtype=bool, count=len(self.doc_ids))
        if not allowed.all():
            scores = np.where(allowed[self.doc_codes], scores, -np.inf)
        candidates = np.flatnonzero(scores > -np.inf)
        if limit <= 0 or not len(candidates):
            return []
        if limit < len(candidates):
            candidates = candidates[np.argpartition(-scores[candidates], limit - 1)[:limit]]
        top = candidates[np.lexsort((candidates, -scores[candidates]))]
        rows = self.rows.take(pa.array(top)).to_pylist()
        for row, index in zip(rows, top, strict=True):
            row["score"] = float(scores[index])
            if relevance is not None:
                row["relevance"] = float(relevance[index])
        return rows


def fused_ranking(rankings: Sequence[Sequence[dict[str, Any]]], rrf_k: int) -> list[dict[str, Any]]:
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
    fused = fused_ranking([[{"chunk_id": item} for item in ranking] for ranking in rankings], rrf_k)
    return [(row["chunk_id"], row["score"]) for row in fused]

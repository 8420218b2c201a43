"""Retrieval quality on the labelled corpus of tests/support/rag_corpus.py; guards the default search mode."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.store import RagStore
from app.store.embedding import Embedder
from tests.support.rag_corpus import CORPUS, QUESTIONS, RetrievalScore, evaluate, load_corpus


@pytest.fixture(scope="module")
def corpus_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagStore]:
    """The corpus embedded once per module (the model itself is cached per process)."""
    store = RagStore(tmp_path_factory.mktemp("rag-quality"), embedder=Embedder(threads=1))
    load_corpus(store)
    yield store
    store.close()


@pytest.fixture(scope="module")
def scores(corpus_store: RagStore) -> dict[str, RetrievalScore]:
    return {mode: evaluate(corpus_store, mode) for mode in ("vector", "fts", "hybrid")}


def test_corpus_is_loaded(corpus_store: RagStore) -> None:
    assert len(corpus_store.list_documents()) == len(CORPUS)
    assert corpus_store.chunk_count() >= len(CORPUS)


def test_paraphrased_questions_find_their_document_in_top_3(corpus_store: RagStore) -> None:
    """Questions share few words with their answer; the right document must still rank in the top 3."""
    paraphrased = [(question, document) for question, document, section in QUESTIONS if section is None]
    assert len(paraphrased) >= 20
    for mode, required in (("vector", 1.0), (corpus_store.default_mode, 0.95)):
        found = 0
        for question, document in paraphrased:
            top = []
            for hit in corpus_store.search(question, k=10, mode=mode):
                if hit.document_name not in top:
                    top.append(hit.document_name)
            found += document in top[:3]
        assert found / len(paraphrased) >= required, (mode, found, len(paraphrased))


def test_default_mode_is_not_worse_than_vector(corpus_store: RagStore, scores: dict[str, RetrievalScore]) -> None:
    """Hybrid is the default only because it ranks the right chunk at least as well as vector search here."""
    default = scores[corpus_store.default_mode]
    vector = scores["vector"]
    assert default.mean_reciprocal_rank >= vector.mean_reciprocal_rank
    assert default.recall_at_3 >= vector.recall_at_3
    assert default.recall_at_1 >= vector.recall_at_1


def test_every_mode_is_useful(scores: dict[str, RetrievalScore]) -> None:
    for mode, score in scores.items():
        assert score.recall_at_5 >= 0.8, (mode, score)

"""The in-memory keyword search (app/store/keywords.py): identifier-aware tokens, BM25 ranking, incremental builds."""

from __future__ import annotations

import numpy as np
import pytest

from app.store.keywords import KeywordIndex, stem, tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("os.path.join", ["os.path.join", "os", "path", "join"]),
        ("max_queued_messages", ["max_queued_messages", "max", "queu", "messag"]),
        ("__hash__", ["__hash__", "hash"]),
        ("HTTPServer", ["httpserver", "http", "server"]),
        ("The dishwasher shows E1047", ["dishwasher", "show", "e1047"]),  # a code stays whole: no stray "e"
        ("Nodes, queries and sorted caches", ["node", "query", "sort", "cach"]),
    ],
)
def test_identifiers_are_indexed_whole_and_by_parts(text: str, expected: list[str]) -> None:
    assert tokens(text) == expected


def test_stemming_meets_common_word_forms() -> None:
    assert stem("stopped") == stem("stop") == "stop"
    assert stem("running") == "run" and stem("libraries") == "library" and stem("boxes") == "box"
    assert stem("caches") == stem("cache") and stem("queued") == stem("queue") and stem("deletes") == stem("deleted")
    assert stem("class") == "class" and stem("status") == "status" and stem("ring") == "ring"


def test_bm25_ranks_rarer_and_denser_matches_first() -> None:
    chunk_ids = ["a", "b", "c", "d"]
    texts = [
        "the queue holds messages until a worker takes them",
        "max_queued_messages limits the queue of each client",
        "weather report for the coast",
        "messages messages and more messages",
    ]
    index = KeywordIndex(chunk_ids, texts)
    scores = index.scores("what does max queued messages limit?")
    assert scores is not None
    assert int(np.argmax(scores)) == 1  # the identifier's parts match the question's words
    assert scores[2] == 0.0
    exact = index.scores("max_queued_messages")
    assert exact is not None and int(np.argmax(exact)) == 1
    assert index.scores("zebra") is None  # no known term: no keyword hits at all


def test_a_rebuild_reuses_tokenized_chunks_and_forgets_deleted_ones() -> None:
    first = KeywordIndex(["a", "b"], ["alpha beta", "gamma delta"])
    second = KeywordIndex(["b", "c"], ["ignored: b is reused", "epsilon alpha"], first)
    assert second.chunk_terms["b"] is first.chunk_terms["b"]
    assert set(second.chunk_terms) == {"b", "c"}
    scores = second.scores("alpha")
    assert scores is not None and scores.tolist()[0] == 0.0 and scores[1] > 0  # row 0 is now "b"
    assert first.scores("epsilon") is None  # the older index is unchanged by the newer one's vocabulary

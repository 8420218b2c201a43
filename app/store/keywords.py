"""Keyword (BM25) search over the in-memory chunk snapshot, with a tokenizer that knows identifiers.

Why in memory rather than LanceDB's full-text index: a LanceDB FTS query took 6 ms of CPU and 20-40 ms of wall
time on a busy 2-core host (its own thread pool waits for the scheduler), while scoring the few query terms'
posting lists held in numpy arrays takes well under a millisecond at 20,000 chunks (docs/rag.md, Search speed).

Why its own tokenizer: technical text is full of identifiers (``max_queued_messages``, ``os.path.join``,
``__hash__``, ``CamelCase``); a question names their parts ("max queued messages", "hash"), so an identifier is
indexed whole and as its parts. Words are lower-cased, English stop words (question words included) dropped, and
plural and ``-ing``/``-ed`` endings removed by a small suffix stemmer, as LanceDB's English tokenizer did.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

BM25_K1 = 1.2
BM25_B = 0.75

_TOKEN = re.compile(r"\w+(?:[.:]\w+)*", re.UNICODE)
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+\d*|[A-Z]+\d*|\d+|[^\W\d_]+\d*", re.UNICODE)
"""An identifier's parts: split at ``_``, ``.``, ``:`` and lower-to-upper case changes; codes (``E1047``) stay whole."""
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with i me my we you your what which who when where why how do does did can could should "
    "would has have had".split()
)
"""Lucene's English stop words plus question and auxiliary words, which carry no topic in a question (keeping them
was one passage better on the development set and one worse on the short pydoc topics; docs/rag.md)."""


@lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """A light English suffix stemmer (plurals, ``-ing``, ``-ed``, a final ``e``): enough to meet a question's word
    forms (``caches``/``cache``, ``queued``/``queue``, ``stopped``/``stop``)."""
    if len(word) <= 3 or not word.isalpha():
        return word
    base = _strip_suffix(word)
    return base[:-1] if base.endswith("e") and len(base) > 4 else base


def _strip_suffix(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            if not any(vowel in base for vowel in "aeiouy"):
                return word
            if len(base) > 2 and base[-1] == base[-2] and base[-1] not in "lsz":
                return base[:-1]  # stopped → stop, running → run
            return base
    return word


def tokens(text: str) -> list[str]:
    """Index terms of ``text``: each word, and each identifier whole and by its parts, stemmed, no stop words."""
    terms: list[str] = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        lowered = token.lower()
        parts = [part.lower() for part in _PART.findall(token)]
        if len(parts) > 1 or parts != [lowered]:
            if len(lowered) <= 64 and lowered.strip("_") and lowered not in STOP_WORDS:
                terms.append(lowered)  # the identifier as written: an exact mention scores highest
            terms.extend(stem(part) for part in parts if len(part) > 1 and part not in STOP_WORDS)
        elif lowered not in STOP_WORDS:
            terms.append(stem(lowered))
    return terms


class KeywordIndex:
    """BM25 posting lists of one snapshot's chunks, built once per table version.

    ``vocabulary`` and the per-chunk term counts are handed from one snapshot to the next, so a write only
    tokenizes its new chunks; a search reads one immutable index and never locks.
    """

    def __init__(
        self,
        chunk_ids: Sequence[str],
        texts: Sequence[str],
        previous: KeywordIndex | None = None,
    ) -> None:
        self.vocabulary: dict[str, int] = previous.vocabulary if previous is not None else {}
        known = previous.chunk_terms if previous is not None else {}
        self.chunk_terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for chunk_id, text in zip(chunk_ids, texts, strict=True):
            entry = known.get(chunk_id)
            if entry is None:
                counts = Counter(tokens(text))
                ids = np.fromiter(
                    (self.vocabulary.setdefault(term, len(self.vocabulary)) for term in counts),
                    dtype=np.int32,
                    count=len(counts),
                )
                entry = (ids, np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))
            self.chunk_terms[chunk_id] = entry
        self.term_count = len(self.vocabulary)
        entries = [self.chunk_terms[chunk_id] for chunk_id in chunk_ids]
        lengths = np.array([float(counts.sum()) for _, counts in entries], dtype=np.float32)
        self.row_count = len(entries)
        if entries:
            term_ids = np.concatenate([ids for ids, _ in entries])
            frequencies = np.concatenate([counts for _, counts in entries])
            rows = np.repeat(np.arange(len(entries), dtype=np.int32), [len(ids) for ids, _ in entries])
        else:
            term_ids = rows = np.zeros(0, dtype=np.int32)
            frequencies = np.zeros(0, dtype=np.float32)
        order = np.argsort(term_ids, kind="stable")
        self.rows = rows[order]
        self.frequencies = frequencies[order]
        self.starts = np.zeros(self.term_count + 1, dtype=np.int64)
        np.cumsum(np.bincount(term_ids, minlength=self.term_count), out=self.starts[1:])
        average = float(lengths.mean()) if len(lengths) else 1.0
        self.length_norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths / max(average, 1e-9))

    def scores(self, query: str) -> np.ndarray | None:
        """BM25 score of every row for ``query`` (0 where no term matches); None when no query term is known."""
        scores: np.ndarray | None = None
        for term in set(tokens(query)):
            term_id = self.vocabulary.get(term)
            if term_id is None or term_id >= self.term_count:
                continue
            start, end = int(self.starts[term_id]), int(self.starts[term_id + 1])
            if start == end:
                continue
            rows = self.rows[start:end]
            frequency = self.frequencies[start:end]
            idf = math.log(1 + (self.row_count - (end - start) + 0.5) / (end - start + 0.5))
            if scores is None:
                scores = np.zeros(self.row_count, dtype=np.float32)
            scores[rows] += idf * frequency * (BM25_K1 + 1) / (frequency + self.length_norm[rows])
        return scores

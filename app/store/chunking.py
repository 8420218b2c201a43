"""Cut extracted documents into overlapping chunks for embedding and search.

Chunks never cross a section (a heading's body or a PDF page), so each one has
one heading or page to cite. Inside a section a chunk ends, in order of
preference, at a paragraph break, at a sentence end, or at the word limit;
the next chunk starts a few sentences earlier (the overlap), so an answer
that straddles a cut is still found whole in one of the two chunks. Every
chunk is an exact slice ``text[char_start:char_end]`` of the extracted text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.store.errors import BadInputError
from app.store.extract import ExtractedDocument

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?:;][\"')\]]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

DEFAULT_MAX_WORDS = 200
DEFAULT_MIN_WORDS = 100
DEFAULT_OVERLAP_WORDS = 30


@dataclass(frozen=True)
class Chunk:
    """A piece of a document, with where it came from."""

    index: int
    text: str
    char_start: int
    char_end: int
    heading: str | None
    page: int | None
    word_count: int


def chunk_document(
    document: ExtractedDocument,
    *,
    max_words: int = DEFAULT_MAX_WORDS,
    min_words: int = DEFAULT_MIN_WORDS,
    overlap_words: int = DEFAULT_OVERLAP_WORDS,
) -> list[Chunk]:
    """Chunks of at most ``max_words`` words, cut at the best break after ``min_words``."""
    if not 0 <= overlap_words < min_words <= max_words:
        raise BadInputError(
            f"chunk sizes must satisfy 0 <= overlap ({overlap_words}) < min ({min_words}) <= max ({max_words})"
        )
    text = document.text
    chunks: list[Chunk] = []
    for section in document.sections:
        words = [(match.start(), match.end()) for match in _WORD.finditer(text, section.start, section.end)]
        start = 0
        while start < len(words):
            end = _cut(text, words, start, max_words, min_words)
            char_start, char_end = words[start][0], words[end - 1][1]
            chunks.append(
                Chunk(
                    index=len(chunks),
                    text=text[char_start:char_end],
                    char_start=char_start,
                    char_end=char_end,
                    heading=section.heading,
                    page=section.page,
                    word_count=end - start,
                )
            )
            if end >= len(words):
                break
            start = _overlap_start(text, words, start, end, overlap_words)
    return chunks


def _cut(text: str, words: list[tuple[int, int]], start: int, max_words: int, min_words: int) -> int:
    """Exclusive end index of the chunk that starts at word ``start``."""
    if len(words) - start <= max_words:
        return len(words)
    limit = start + max_words
    sentence_end: int | None = None
    for end in range(limit, start + min_words - 1, -1):
        gap = text[words[end - 1][1] : words[end][0]]
        if _PARAGRAPH_BREAK.search(gap):
            return end
        if sentence_end is None and _SENTENCE_END.search(text[words[end - 1][0] : words[end - 1][1]]):
            sentence_end = end
    return sentence_end if sentence_end is not None else limit


def _overlap_start(text: str, words: list[tuple[int, int]], start: int, end: int, overlap_words: int) -> int:
    """Where the next chunk starts: ``overlap_words`` back, moved forward to a sentence start when there is one."""
    if overlap_words == 0:
        return end
    earliest = max(end - overlap_words, start + 1)
    for candidate in range(earliest, end):
        if _SENTENCE_END.search(text[words[candidate - 1][0] : words[candidate - 1][1]]):
            return candidate
    return earliest

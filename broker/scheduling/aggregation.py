"""Combining the answers of a fan-out (mode ``all``).

* ``consensus``: the answer closest to all the others wins. Closeness is the
  mean of unigram and bigram F1 (ROUGE-1/ROUGE-2 style) over lower-cased word
  tokens — no heavy dependencies; agreement is the mean pairwise closeness.
* ``synthesize``: the strongest ready model reads every answer and writes one
  (the original design's summariser); :func:`synthesis_messages` builds its prompt.
* ``first``: the first complete answer; the coordinator cancels the rest.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from broker.protocol.messages import ChatMessage

_WORD = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _f1(left: Counter[object], right: Counter[object]) -> float:
    if not left or not right:
        return 1.0 if not left and not right else 0.0
    overlap = sum((left & right).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(right.values())
    recall = overlap / sum(left.values())
    return 2 * precision * recall / (precision + recall)


def similarity(left: str, right: str) -> float:
    """0 (nothing shared) to 1 (same words in the same order), symmetric."""
    left_tokens, right_tokens = _tokens(left), _tokens(right)
    unigrams = _f1(Counter(left_tokens), Counter(right_tokens))
    bigrams = _f1(Counter(zip(left_tokens, left_tokens[1:], strict=False)),
                  Counter(zip(right_tokens, right_tokens[1:], strict=False)))
    if len(left_tokens) < 2 and len(right_tokens) < 2:
        return unigrams
    return (unigrams + bigrams) / 2


@dataclass(frozen=True)
class Consensus:
    index: int
    """Position of the chosen answer in the input."""
    agreement: float | None
    """Mean pairwise similarity 0–1; ``None`` with fewer than two answers."""
    closeness: tuple[float, ...]
    """Each answer's mean similarity to the others."""


def consensus(answers: Sequence[str]) -> Consensus:
    """The answer most similar to the rest; ties go to the earlier answer."""
    if not answers:
        raise ValueError("consensus of no answers")
    if len(answers) == 1:
        return Consensus(0, None, (1.0,))
    count = len(answers)
    matrix = [[1.0] * count for _ in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            matrix[i][j] = matrix[j][i] = similarity(answers[i], answers[j])
    closeness = tuple(sum(matrix[i][j] for j in range(count) if j != i) / (count - 1) for i in range(count))
    best = max(range(count), key=lambda i: (closeness[i], -i))
    pairs = [matrix[i][j] for i in range(count) for j in range(i + 1, count)]
    return Consensus(best, round(sum(pairs) / len(pairs), 3), closeness)


SYNTHESIS_INSTRUCTION = (
    "Several assistants answered the same question. Write one answer that keeps what they agree on, "
    "corrects what is wrong, and adds nothing they did not support. Answer the question directly; "
    "do not mention the assistants."
)


def synthesis_messages(question: Sequence[ChatMessage], answers: Sequence[tuple[str, str]]) -> list[ChatMessage]:
    """The conversation for the synthesising model: the original turns, then the answers to combine.

    ``answers`` holds ``(label, text)`` pairs, e.g. ``("gpu-desktop / llama3.1:8b", "...")``.
    """
    last_user = next((message.content for message in reversed(question) if message.role == "user"), "")
    listing = "\n\n".join(f"### Answer {n} ({label})\n{text.strip()}" for n, (label, text) in
                          enumerate(answers, start=1))
    history = [message for message in question if message.role == "system"]
    return [
        *history,
        ChatMessage(role="system", content=SYNTHESIS_INSTRUCTION),
        ChatMessage(role="user", content=f"Question:\n{last_user}\n\n{listing}\n\nWrite the single best answer."),
    ]

"""A held-out retrieval set over a corpus nobody tuned on: the Python language reference topics of ``pydoc_data``.

Why this corpus: it ships with every CPython (``pydoc_data/topics.py``, the text ``help("topic")`` prints), it is
public technical prose unlike tests/support/rag_corpus.py (which the default search mode and the relevance floor were
chosen on), and it is large enough to be realistic: 79 topics, one document per topic (``<topic>.txt``), ~85,000
words. Its headings are reStructuredText style (a title line underlined with ``*``, ``=`` or ``-``).

**The 30 questions below were written before any retrieval result over this corpus was looked at** (issue 15,
item 5) and are fixed: do not edit them to match what the store returns. Each names the topic it was written from
and ``answer``, a short verbatim phrase of the passage that holds the answer. Pydoc topics repeat each other
(``compound`` holds every statement's own topic, ``specialnames`` holds ``customization``...), so any document that
contains the phrase counts as a right document, and a hit counts as the right passage when its text contains the
phrase (after collapsing whitespace).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.store.rag import RagStore, SearchMode


@dataclass(frozen=True)
class HeldOutQuestion:
    question: str
    topic: str
    answer: str


QUESTIONS: tuple[HeldOutQuestion, ...] = (
    HeldOutQuestion("Are assert checks still run when I start Python with -O?", "assert",
                    "emits no code for an\nassert statement when optimization is requested"),
    HeldOutQuestion("How can an inner function reassign a variable that belongs to the function around it?",
                    "nonlocal", "previously bound variables in the nearest enclosing scope excluding\nglobals"),
    HeldOutQuestion("What arguments does a context manager's exit method get when the block raised an error?",
                    "with", "its type, value, and\n   traceback are passed as arguments"),
    HeldOutQuestion("Can I put an if statement or a loop inside a lambda?", "lambda",
                    "cannot contain\nstatements or annotations"),
    HeldOutQuestion("What error do I get when I delete a variable that was never assigned?", "del",
                    'If the name is unbound, a\n"NameError" exception will be raised'),
    HeldOutQuestion("Does the else block of a loop run if I leave the loop early?", "break",
                    'skipping the optional "else"\nclause if the loop has one'),
    HeldOutQuestion("What does the cleanup clause of a try statement do with an exception nobody handled?", "try",
                    "the\nexception is temporarily saved"),
    HeldOutQuestion("How do I attach the original error as the cause when I raise a new exception?", "raise",
                    'it will be attached to the\nraised exception as the "__cause__" attribute'),
    HeldOutQuestion("Which built-in values are treated as false in an if condition?", "truth",
                    'constants defined to be false: "None" and "False"'),
    HeldOutQuestion("Is 1 < x < 10 allowed, and is the middle value computed twice?", "comparisons",
                    'except that "y" is evaluated only\nonce'),
    HeldOutQuestion("Can I write 1_000_000 to make a big number easier to read?", "integers",
                    "Underscores are ignored for determining the numeric value"),
    HeldOutQuestion("How do I pad a number with leading zeros in a format specification?", "formatstrings",
                    'enables sign-aware zero-padding for numeric\ntypes'),
    HeldOutQuestion("Why does lstrip('Arthur: ') remove more characters than I expected?", "string-methods",
                    "all combinations of its values are stripped"),
    HeldOutQuestion("Do dictionaries remember the order in which keys were added?", "typesmapping",
                    "Dictionaries preserve insertion order"),
    HeldOutQuestion("If a class has neither __bool__ nor __len__, is an instance true or false?", "specialnames",
                    "all its instances are\n    considered true"),
    HeldOutQuestion("How do I set a pdb breakpoint that only stops when an expression is true?", "debugger",
                    "b(reak) [([filename:]lineno | function) [, condition]]"),
    HeldOutQuestion("Can methods see names defined directly in the class body without self?", "execmodel",
                    "The scope of names defined in a class block is limited to\nthe class block"),
    HeldOutQuestion("Which special method must an object provide to be iterated with async for?", "async",
                    'An *asynchronous iterable* provides an "__aiter__" method'),
    HeldOutQuestion("What is -2 ** 2: does the minus sign or the exponent go first?", "power",
                    "The power operator binds more tightly than unary operators on its\nleft"),
    HeldOutQuestion("Does x += y modify a list in place or create a new one?", "augassign",
                    "the actual operation is performed *in-place*"),
    HeldOutQuestion("Why can't I use my objects as dict keys after I defined __eq__ on the class?", "customization",
                    'will have its "__hash__()" implicitly set to "None"'),
    HeldOutQuestion("What happens when the same key appears twice in a dictionary literal?", "dict",
                    "the final dictionary’s value\nfor that key will be the last one given"),
    HeldOutQuestion("What does a function return when it has no return statement?", "bltin-null-object",
                    "This object is returned by functions that don’t explicitly return a\nvalue"),
    HeldOutQuestion("Can I assign to a variable before declaring it global in the same function?", "global",
                    'must not be used in the same code\nblock textually preceding that "global" statement'),
    HeldOutQuestion("How does Python turn __secret attribute names inside a class into something else?",
                    "atom-identifiers", "Private name mangling"),
    HeldOutQuestion("Why does a mutable default argument keep its contents between calls?", "function",
                    "Default parameter values are evaluated from left to right when the\nfunction definition is "
                    "executed"),
    HeldOutQuestion("Which words like match and case are keywords only in some places?", "identifiers",
                    "These are\nknown as *soft keywords*"),
    HeldOutQuestion("How do I left-pad a numeric string with zeros while keeping the minus sign first?",
                    "string-methods", "A leading sign prefix"),
    HeldOutQuestion("Does the program stop and print a stack trace when an exception is never caught?",
                    "exceptions", "When an exception is not handled at all, the interpreter terminates"),
    HeldOutQuestion("Where can I find the order in which a class's base classes are searched for methods?",
                    "specialattrs", "This attribute is a tuple of classes that are considered when"),
)  # fmt: skip

_SPACE = re.compile(r"\s+")


def _flat(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def corpus() -> dict[str, str]:
    """``<topic>.txt`` → the topic's text, as ``help("topic")`` has it in this Python."""
    from pydoc_data.topics import topics

    return {f"{name}.txt": text for name, text in sorted(topics.items())}


def answer_documents(documents: dict[str, str]) -> list[frozenset[str]]:
    """For each question, the documents that hold its answer phrase (fails loudly if a Python changed the text)."""
    return documents_holding(QUESTIONS, documents, "this Python's pydoc_data")


def documents_holding(questions: Sequence[HeldOutQuestion], documents: dict[str, str],
                      where: str) -> list[frozenset[str]]:
    """For each of ``questions``, the documents holding its answer phrase; its own topic must be one of them."""
    flat = {name: _flat(text) for name, text in documents.items()}
    found = []
    for item in questions:
        names = frozenset(name for name, text in flat.items() if _flat(item.answer) in text)
        if f"{item.topic}.txt" not in names:
            raise AssertionError(f"answer of {item.question!r} not in {item.topic}.txt of {where}")
        found.append(names)
    return found


def load(store: RagStore, names: Sequence[str] | None = None) -> dict[str, str]:
    """Upload the corpus (or only ``names``) as plain-text documents, as a user would."""
    return upload(store, corpus(), names)


def upload(store: RagStore, documents: dict[str, str], names: Sequence[str] | None = None) -> dict[str, str]:
    """Upload ``documents`` (or only ``names``) as plain-text documents, as a user would."""
    chosen = {name: documents[name] for name in (names or documents)}
    for name, text in chosen.items():
        store.add_text(text, name)
    return chosen


@dataclass
class HeldOutScore:
    """Top-``k`` recall: right document, and the passage holding the answer."""

    questions: int = 0
    right_document: int = 0
    right_passage: int = 0
    document_misses: list[str] = field(default_factory=list)
    passage_misses: list[str] = field(default_factory=list)


def evaluate(
    store: RagStore,
    mode: SearchMode | None = None,
    k: int = 5,
    *,
    questions: Sequence[HeldOutQuestion] = QUESTIONS,
    min_relevance: float | None = None,
) -> HeldOutScore:
    holders = dict(zip(QUESTIONS, answer_documents(corpus()), strict=True))
    return score_questions(store, questions, holders, mode, k, min_relevance=min_relevance)


def score_questions(
    store: RagStore,
    questions: Sequence[HeldOutQuestion],
    holders: dict[HeldOutQuestion, frozenset[str]],
    mode: SearchMode | None = None,
    k: int = 5,
    *,
    min_relevance: float | None = None,
) -> HeldOutScore:
    """Top-``k`` search for each question: is a document holding the answer among the hits, and a passage?"""
    documents = {document.name for document in store.list_documents()}
    score = HeldOutScore()
    for item in questions:
        right = holders[item] & documents
        hits = store.search(item.question, k=k, mode=mode, min_relevance=min_relevance)
        answer = _flat(item.answer)
        score.questions += 1
        if any(hit.document_name in right for hit in hits):
            score.right_document += 1
        else:
            score.document_misses.append(item.question)
        if any(hit.document_name in right and answer in _flat(hit.text) for hit in hits):
            score.right_passage += 1
        else:
            score.passage_misses.append(item.question)
    return score

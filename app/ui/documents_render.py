"""Pure rendering for the Documents tab: the library table and search results."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from app.markup import markdown_literal
from app.store import Document, SearchHit
from app.store.prompt import relevance_words

CSS = ""
"""Styles of the Documents tab (added to the page's CSS by app/ui/__init__.py)."""


def documents_frame(documents: Sequence[Document]) -> pd.DataFrame:
    rows = [
        {
            "Name": document.name,
            "Format": document.format,
            "Size": _size(document.size_bytes),
            "Chunks": document.chunk_count,
            "Added": document.added_at.astimezone().strftime("%Y-%m-%d %H:%M"),
            "Access": "private" if document.private else "shared",
            "Id": document.id[:8],
        }
        for document in documents
    ]
    return pd.DataFrame(rows, columns=["Name", "Format", "Size", "Chunks", "Added", "Access", "Id"])


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def search_markdown(query: str, hits: Sequence[SearchHit]) -> str:
    """Search results for a ``gr.Markdown``: the documents' text is literal (a passage may hold markup).

    Relevance is said in words (strong / partial / weak match), never as the raw score: a fused rank score
    like 0.033 means nothing to a reader. Weak matches are marked as not used in answers.
    """
    if not hits:
        return f"No passage matches *{markdown_literal(query)}*."
    blocks = []
    for rank, hit in enumerate(hits, start=1):
        location = f" — {markdown_literal(hit.location)}" if hit.location else ""
        text = " ".join(hit.text.split())
        if len(text) > 600:
            text = text[:600] + "…"
        words = relevance_words(hit.match)
        if hit.match == "weak":
            words += " (not used in answers)"
        blocks.append(f"**{rank}. {markdown_literal(hit.document_name)}**{location} · {words}\n\n"
                      f"> {markdown_literal(text)}")
    return "\n\n".join(blocks)

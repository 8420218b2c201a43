"""Text from outside the app on a page: Markdown with a strict allow-list, or literal text.

A model's answer, a document's passage and everything an agent says (its id,
model names, errors, URLs) are data. The page must render them without
letting them add markup: a remote ``<img>`` (fetched at render and each time
the chat is reopened: a leak), a ``<form>`` with a password field, or a
``position:fixed`` overlay all survive Gradio's own sanitizer (issue 13.2).

* :func:`markdown_html` renders Markdown to HTML here, with raw HTML off (it
  shows as text), images shown as links (nothing is fetched), every link
  followed by its target. The chat shows that HTML as is
  (``render_markdown=False``), so no second Markdown parser with other rules
  ever sees model text.
* :func:`markdown_literal` makes outside text literal inside Markdown that
  Gradio renders (``gr.Markdown``): every ASCII punctuation character is
  backslash-escaped, so no link, image, tag or emphasis can form.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

LINK_ATTRIBUTES = 'rel="noopener noreferrer nofollow" target="_blank"'
TARGET_SHOWN_CHARS = 120
"""A link's target is shown in full up to this length, then cut (a long ``data:`` URL would fill the chat)."""
_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")
_WHITESPACE = re.compile(r"\s+")


def _target(url: str) -> str:
    shown = url if len(url) <= TARGET_SHOWN_CHARS else url[: TARGET_SHOWN_CHARS - 1] + "…"
    return f' <span class="slb-link-target">({html.escape(shown)})</span>'


def _render_image(renderer: Any, tokens: Sequence[Token], index: int, options: Any, env: Any) -> str:
    """An image becomes a link to it with its target shown: nothing is fetched when the page renders."""
    token = tokens[index]
    source = str(token.attrGet("src") or "")
    alt = "".join(child.content for child in token.children or [] if child.type in ("text", "code_inline"))
    label = html.escape(f"image: {alt}" if alt else "image")
    return f'<a href="{html.escape(source)}" {LINK_ATTRIBUTES}>{label}</a>' + _target(source)


def _render_link_open(renderer: Any, tokens: Sequence[Token], index: int, options: Any, env: Any) -> str:
    token = tokens[index]
    href = str(token.attrGet("href") or "")
    return f'<a href="{html.escape(href)}" {LINK_ATTRIBUTES}>'


def _render_link_close(renderer: Any, tokens: Sequence[Token], index: int, options: Any, env: Any) -> str:
    """``</a>`` and the link's target, unless the link text already is the target (an autolink)."""
    depth, start = 0, index
    while start > 0:
        start -= 1
        if tokens[start].type == "link_close":
            depth += 1
        elif tokens[start].type == "link_open":
            if depth == 0:
                break
            depth -= 1
    opening = tokens[start]
    href = str(opening.attrGet("href") or "")
    text = "".join(token.content for token in tokens[start + 1:index] if token.type in ("text", "code_inline"))
    if opening.markup in ("autolink", "linkify") or text.strip() == href:
        return "</a>"
    return "</a>" + _target(href)


def _parser() -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False, "typographer": False})
    parser.enable(["table", "strikethrough"])
    parser.add_render_rule("image", _render_image)
    parser.add_render_rule("link_open", _render_link_open)
    parser.add_render_rule("link_close", _render_link_close)
    return parser


_MARKDOWN = _parser()


def markdown_html(text: str) -> str:
    """Markdown to HTML with no raw HTML (escaped, shown as text), no image (a link instead), links with targets.

    markdown-it refuses ``javascript:``, ``vbscript:``, ``file:`` and non-image ``data:`` links itself.
    """
    return _MARKDOWN.render(text or "")


def text_html(text: str) -> str:
    """Plain text as HTML: escaped, line breaks kept."""
    return html.escape(text or "").replace("\n", "<br>")


def markdown_literal(text: object) -> str:
    """``text`` as literal text inside Markdown: ASCII punctuation backslash-escaped, whitespace runs folded.

    For names and errors from agents in a ``gr.Markdown``: ``![x](http://…)`` or ``<img …>`` show as typed.
    """
    return _PUNCTUATION.sub(r"\\\1", _WHITESPACE.sub(" ", str(text)).strip())

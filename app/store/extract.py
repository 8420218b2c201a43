"""Turn an uploaded file into plain text split by its own structure.

Every reader returns an :class:`ExtractedDocument`: one plain text plus the
sections it is made of (a markdown or HTML heading, a DOCX heading, a PDF
page), each a character span of that text. The chunker cuts inside
sections, so a chunk never mixes two chapters or two pages and always knows
where it came from. Files come from users: every parser failure becomes a
typed, readable error, never a stack trace.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

from app.store.errors import BadInputError, EncryptedDocumentError, StoreError, TooLargeError, UnsupportedFormatError

logger = logging.getLogger(__name__)

FORMATS_BY_EXTENSION: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(FORMATS_BY_EXTENSION)
MAX_FILENAME_CHARS = 255

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HEADING_SEPARATOR = " > "


@dataclass(frozen=True)
class Section:
    """A span ``text[start:end]`` of the document under one heading or on one page."""

    start: int
    end: int
    heading: str | None = None
    page: int | None = None


@dataclass(frozen=True)
class ExtractedDocument:
    """The plain text of a document and its sections (character offsets refer to ``text``)."""

    text: str
    sections: tuple[Section, ...]
    format: str

    def section_text(self, section: Section) -> str:
        return self.text[section.start : section.end]


# -- file names --------------------------------------------------------------


def safe_filename(filename: str) -> str:
    """Keep only the base name of a user-supplied file name.

    The name is only ever shown, never used as a path, but a name such as
    ``../../etc/passwd`` or ``C:\\Users\\me\\secret.txt`` must still not
    carry directories into the UI or logs. Control characters are removed;
    a name that is empty afterwards (``..``, ``/``) is refused.
    """
    if not isinstance(filename, str):
        raise BadInputError("file name must be text")
    name = unicodedata.normalize("NFC", filename).replace("\\", "/")
    name = _CONTROL_CHARS.sub("", name.rsplit("/", 1)[-1]).strip()
    if name in {"", ".", ".."}:
        raise BadInputError(f"file name {filename!r} has no usable base name")
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, extension = name.rpartition(".")
        keep = MAX_FILENAME_CHARS - len(extension) - 1
        name = (
            f"{stem[:keep]}.{extension}" if dot and 0 < len(extension) < 16 and keep > 0 else name[:MAX_FILENAME_CHARS]
        )
    return name


def detect_format(filename: str) -> str:
    """The reader for a file name's extension, or :class:`UnsupportedFormatError`."""
    name = safe_filename(filename)
    dot = name.rfind(".")
    extension = name[dot:].lower() if dot > 0 else ""
    fmt = FORMATS_BY_EXTENSION.get(extension)
    if fmt is None:
        hint = " (save it as .docx)" if extension == ".doc" else ""
        shown = extension or "no extension"
        raise UnsupportedFormatError(
            f"{name!r}: {shown} is not supported{hint}; upload one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return fmt


# -- entry point -------------------------------------------------------------


def extract(data: bytes, filename: str, *, max_chars: int | None = None) -> ExtractedDocument:
    """Read ``data`` according to ``filename``'s extension.

    ``max_chars`` bounds the extracted text, which can be far larger than the
    upload for compressed formats (DOCX is a zip).
    """
    fmt = detect_format(filename)
    if not data:
        raise BadInputError(f"{safe_filename(filename)!r} is empty")
    try:
        if fmt == "pdf":
            document = _extract_pdf(data)
        elif fmt == "docx":
            document = _extract_docx(data, max_chars=max_chars)
        else:
            document = extract_text(decode_text(data), fmt)
    except BadInputError as error:
        # Readers describe the problem; the caller also needs to know which file it was.
        raise type(error)(f"{safe_filename(filename)!r}: {error}") from error
    except StoreError:
        raise
    except ImportError as error:
        raise StoreError(f"reading {fmt} files needs a package that is not installed: {error}") from error
    except RecursionError as error:
        raise BadInputError(f"{safe_filename(filename)!r} is nested too deeply to read") from error
    except Exception as error:  # noqa: BLE001 - parsers of untrusted files raise anything; report it as bad input
        logger.debug("reading %s as %s failed", filename, fmt, exc_info=True)
        raise BadInputError(f"{safe_filename(filename)!r} could not be read as {fmt}: {error}") from error
    if max_chars is not None and len(document.text) > max_chars:
        raise TooLargeError(
            f"{safe_filename(filename)!r} holds {len(document.text)} characters of text; the limit is {max_chars}"
        )
    if not document.text.strip():
        hint = " (a scanned PDF needs OCR first)" if fmt == "pdf" else ""
        raise BadInputError(f"{safe_filename(filename)!r} contains no text{hint}")
    return document


def extract_text(text: str, fmt: str = "text") -> ExtractedDocument:
    """Split already-decoded text: markdown by headings, HTML by headings, anything else as one section."""
    if fmt == "markdown":
        return _split_markdown(_clean_text(text))
    if fmt == "html":
        return _extract_html(text)
    clean = _clean_text(text)
    return ExtractedDocument(text=clean, sections=(Section(0, len(clean)),), format="text")


def decode_text(data: bytes) -> str:
    """Decode a text upload: BOMs honoured, UTF-8 first, then Windows-1252; binary refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:8192]:
        raise BadInputError("it looks like a binary file, not text")
    return data.decode("cp1252", errors="replace")


def _clean_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL_CHARS.sub("", text)


# -- markdown ------------------------------------------------------------------

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_MARKUP = re.compile(r"`+|(?<!\w)[*_]+|[*_]+(?!\w)")  # emphasis marks, not snake_case


def _split_markdown(text: str) -> ExtractedDocument:
    """Sections per ATX (``# Title``) or setext (``Title\\n===``) heading; fenced code is never a heading."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    body_start = 0
    heading: str | None = None
    fence: str | None = None
    previous_line: tuple[int, str] | None = None  # (offset, text) of the previous non-heading line

    def close(end: int) -> None:
        if text[body_start:end].strip():
            sections.append(Section(body_start, end, heading))

    def open_heading(level: int, title: str, body_from: int) -> None:
        nonlocal heading, body_start
        title = _INLINE_MARKUP.sub("", title).strip() or "(untitled)"
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        heading = _HEADING_SEPARATOR.join(part for _, part in stack)
        body_start = body_from

    offset = 0
    for line in text.splitlines(keepends=True):
        line_start, offset = offset, offset + len(line)
        stripped = line.rstrip("\n")
        fence_match = _FENCE.match(stripped)
        if fence is not None:
            if fence_match and fence_match.group(1)[0] == fence[0] and len(fence_match.group(1)) >= len(fence):
                fence = None
            previous_line = None
            continue
        if fence_match:
            fence = fence_match.group(1)
            previous_line = None
            continue
        atx = _ATX_HEADING.match(stripped)
        if atx:
            close(line_start)
            open_heading(len(atx.group(1)), atx.group(2), offset)
            previous_line = None
            continue
        setext = _SETEXT_UNDERLINE.match(stripped)
        if setext and previous_line is not None and previous_line[1].strip():
            title_start, title = previous_line
            close(title_start)
            open_heading(1 if setext.group(1)[0] == "=" else 2, title.strip(), offset)
            previous_line = None
            continue
        previous_line = (
            (line_start, stripped) if stripped.strip() and not stripped.startswith((" " * 4, "\t")) else None
        )
    close(len(text))
    return ExtractedDocument(text=text, sections=tuple(sections), format="markdown")


# -- html ----------------------------------------------------------------------

_HTML_SKIP = frozenset(
    {"script", "style", "noscript", "template", "svg", "head", "iframe", "object", "canvas", "button", "nav"}
)
_HTML_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "br", "dd", "details", "div", "dl", "dt", "fieldset",
        "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "nav", "ol", "p", "section",
        "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul", "caption",
    }
)  # fmt: skip
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}


def _extract_html(html: str) -> ExtractedDocument:
    """Visible text of a page, split by ``<h1>``–``<h6>``; scripts, styles and comments dropped."""
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, NavigableString, ProcessingInstruction, Tag

    soup = BeautifulSoup(html, "html.parser")
    title_tag = soup.find("title")
    page_title = " ".join(title_tag.get_text(" ").split()) if isinstance(title_tag, Tag) else ""
    blocks: list[tuple[str | None, list[str]]] = [(page_title or None, [])]
    stack: list[tuple[int, str]] = []
    inline: list[str] = []

    def flush() -> None:
        paragraph = " ".join("".join(inline).split())
        inline.clear()
        if paragraph:
            blocks[-1][1].append(paragraph)

    def walk(node: Tag) -> None:
        for child in node.children:
            if isinstance(child, (Comment, Declaration, Doctype, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                inline.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            name = (child.name or "").lower()
            if name in _HTML_SKIP:
                continue
            if name in _HTML_HEADINGS:
                flush()
                title = " ".join(child.get_text(" ").split()) or "(untitled)"
                level = _HTML_HEADINGS[name]
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, title))
                blocks.append((_HEADING_SEPARATOR.join(part for _, part in stack), []))
            elif name == "pre":
                flush()
                code = child.get_text().strip("\n")
                if code.strip():
                    blocks[-1][1].append(code)
            elif name in _HTML_BLOCKS:
                flush()
                walk(child)
                flush()
            else:
                walk(child)

    body = soup.find("body")
    walk(body if isinstance(body, Tag) else soup)
    flush()
    return _assemble([(heading, None, paragraphs) for heading, paragraphs in blocks], "html", heading_lines=True)


# -- pdf -------------------------------------------------------------------------


def _extract_pdf(data: bytes) -> ExtractedDocument:
    """One section per page, labelled with its 1-based page number."""
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise BadInputError("not a PDF file (it does not start with %PDF)")
    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")
        except (DependencyError, NotImplementedError) as error:
            raise EncryptedDocumentError(f"PDF is encrypted in a way that cannot be opened here: {error}") from error
        if opened == PasswordType.NOT_DECRYPTED:
            raise EncryptedDocumentError("PDF is password-protected; upload an unprotected copy")
    pages: list[tuple[str | None, int | None, list[str]]] = []
    try:
        for number, page in enumerate(reader.pages, start=1):
            page_text = _clean_text(page.extract_text() or "").strip()
            if page_text:
                pages.append((None, number, [page_text]))
    except FileNotDecryptedError as error:
        raise EncryptedDocumentError("PDF is password-protected; upload an unprotected copy") from error
    return _assemble(pages, "pdf", heading_lines=False)


# -- docx ------------------------------------------------------------------------

_HEADING_STYLE = re.compile(r"^heading\s*(\d)", re.IGNORECASE)


def _extract_docx(data: bytes, *, max_chars: int | None) -> ExtractedDocument:
    """Paragraphs and tables in reading order, split by the Title / Heading N paragraph styles."""
    if data.startswith(_OLE_MAGIC):
        raise EncryptedDocumentError(
            "this is a password-protected Office file or an old binary .doc, not a .docx; "
            "save it as an unprotected .docx"
        )
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise BadInputError("not a valid .docx file (it is not a zip archive)")
    if max_chars is not None:
        # A zip bomb would be expanded by python-docx before any text limit applies; check the declared sizes first.
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
        if expanded > max(max_chars * 8, 64 * 2**20):
            raise TooLargeError(f".docx expands to {expanded} bytes, too large to read")

    from docx import Document as open_docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = open_docx(io.BytesIO(data))
    blocks: list[tuple[str | None, int | None, list[str]]] = [(None, None, [])]
    stack: list[tuple[int, str]] = []
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            text = _clean_text(block.text).strip()
            style_name = (block.style.name if block.style is not None else "") or ""
            match = _HEADING_STYLE.match(style_name)
            level = 0 if style_name.lower() == "title" else int(match.group(1)) if match else None
            if level is not None and text:
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, text))
                blocks.append((_HEADING_SEPARATOR.join(part for _, part in stack), None, []))
            elif text:
                blocks[-1][2].append(text)
        elif isinstance(block, Table):
            for row in block.rows:
                cells: list[str] = []
                for cell in row.cells:
                    cell_text = " ".join(_clean_text(cell.text).split())
                    if cell_text and (not cells or cells[-1] != cell_text):  # merged cells repeat their text
                        cells.append(cell_text)
                if cells:
                    blocks[-1][2].append(" | ".join(cells))
    return _assemble(blocks, "docx", heading_lines=True)


# -- shared ----------------------------------------------------------------------


def _assemble(
    blocks: Sequence[tuple[str | None, int | None, list[str]]], fmt: str, *, heading_lines: bool
) -> ExtractedDocument:
    """Join blocks into one text (paragraphs separated by blank lines) and record each block's span."""
    parts: list[str] = []
    sections: list[Section] = []
    position = 0
    for heading, page, paragraphs in blocks:
        body = "\n\n".join(paragraph for paragraph in paragraphs if paragraph.strip())
        if not body:
            continue
        if parts:
            parts.append("\n\n")
            position += 2
        if heading_lines and heading:
            line = heading.rsplit(_HEADING_SEPARATOR, 1)[-1] + "\n\n"
            parts.append(line)
            position += len(line)
        sections.append(Section(position, position + len(body), heading, page))
        parts.append(body)
        position += len(body)
    return ExtractedDocument(text="".join(parts), sections=tuple(sections), format=fmt)

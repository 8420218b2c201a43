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
import posixpath
import re
import unicodedata
import xml.parsers.expat
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
#
# A .docx is a zip of XML parts. It is read here as a stream (expat, no tree), so neither the parser nor a
# zip bomb decides how much memory an upload takes: the XML a part may expand to is capped, the parse stops
# at the character limit, and only the parts that hold text (the main document and its styles) are ever
# decompressed. The text rules are python-docx's (tests/test_rag.py compares them on a rich document).

DOCX_MAX_XML_BYTES = 64 * 2**20
"""Most XML the main document part may expand to (a 1.8 MB zip bomb declared 600 MB)."""
DOCX_MAX_ELEMENTS = 2_000_000
"""Most XML elements read from it (a formatted page has a few hundred): bounds the parse time of dense markup
with little text, which the character limit does not."""
_DOCX_MAX_SIDE_PART_BYTES = 8 * 2**20  # relationships and styles
_DOCX_MAX_DEPTH = 256
_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main "
_OFFICE_DOCUMENT = "/officeDocument"
_STYLES = "/styles"
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
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        parts = {info.filename.lstrip("/").lower(): info for info in archive.infolist()}
        document_name = _docx_target(archive, parts, "_rels/.rels", "", _OFFICE_DOCUMENT) or "word/document.xml"
        document = parts.get(document_name.lower())
        if document is None:
            raise BadInputError("not a valid .docx file (it has no main document part)")
        folder, _, base = document_name.rpartition("/")
        styles_name = _docx_target(archive, parts, f"{folder}/_rels/{base}.rels".lstrip("/"), folder, _STYLES)
        styles = _DocxStyles()
        if styles_name and styles_name.lower() in parts:
            _stream_xml(archive, parts[styles_name.lower()], styles, _DOCX_MAX_SIDE_PART_BYTES)
        reader = _DocxReader(styles, max_chars)
        _stream_xml(archive, document, reader, DOCX_MAX_XML_BYTES)
    if not reader.saw_document:
        raise BadInputError("not a Word document (its main part is not WordprocessingML)")
    return _assemble(reader.blocks, "docx", heading_lines=True)


def _stream_xml(archive: zipfile.ZipFile, info: zipfile.ZipInfo, handler: _XmlHandler, limit: int) -> None:
    """Feed one zip member to ``handler`` through expat in 64 KiB pieces, never more than ``limit`` bytes."""
    if info.file_size > limit:
        raise TooLargeError(
            f"its {info.filename} expands to {info.file_size / 2**20:.0f} MiB of XML; the limit is "
            f"{limit / 2**20:.0f} MiB (split the document, or save it as .txt)"
        )
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = True
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd  # no DTD, hence no entity expansion (billion laughs)
    parser.EntityDeclHandler = _refuse_dtd
    parser.StartElementHandler = handler.start
    parser.EndElementHandler = handler.end
    parser.CharacterDataHandler = handler.text
    read = 0
    with archive.open(info) as stream:
        while chunk := stream.read(65536):
            read += len(chunk)
            if read > limit:  # the declared size lied; zipfile stops at it anyway, this is the second guard
                raise TooLargeError(f"its {info.filename} expands to more than {limit / 2**20:.0f} MiB of XML")
            parser.Parse(chunk, False)
    parser.Parse(b"", True)


def _refuse_dtd(*_: object) -> None:
    raise BadInputError("its XML declares a DTD or entities, which Word never writes")


def _docx_target(archive: zipfile.ZipFile, parts: dict[str, zipfile.ZipInfo], rels_name: str, folder: str,
                 type_suffix: str) -> str | None:
    """The part a relationships file points to with a relationship type ending in ``type_suffix``."""
    info = parts.get(rels_name.lower())
    if info is None:
        return None
    relationships = _DocxRelationships(type_suffix)
    _stream_xml(archive, info, relationships, _DOCX_MAX_SIDE_PART_BYTES)
    if relationships.target is None:
        return None
    target = relationships.target
    path = target.lstrip("/") if target.startswith("/") else posixpath.join(folder, target)
    return posixpath.normpath(path).lstrip("/")


class _XmlHandler:
    """Callbacks for :func:`_stream_xml` (expat names are ``namespace-uri local-name``)."""

    def start(self, name: str, attributes: dict[str, str]) -> None:
        pass

    def end(self, name: str) -> None:
        pass

    def text(self, data: str) -> None:
        pass


class _DocxRelationships(_XmlHandler):
    def __init__(self, type_suffix: str) -> None:
        self.type_suffix = type_suffix
        self.target: str | None = None

    def start(self, name: str, attributes: dict[str, str]) -> None:
        if (self.target is None and name.endswith(" Relationship") and attributes.get("TargetMode") != "External"
                and attributes.get("Type", "").endswith(self.type_suffix)):
            self.target = attributes.get("Target")


class _DocxStyles(_XmlHandler):
    """Paragraph style names by style id, and the default paragraph style (python-docx's lookup rules)."""

    def __init__(self) -> None:
        self.names: dict[str, str | None] = {}
        self.default: str | None = None
        self._style: tuple[str | None, bool, bool] | None = None  # (id, is a paragraph style, is the default)

    def start(self, name: str, attributes: dict[str, str]) -> None:
        if name == _W + "style":
            kind = attributes.get(_W + "type", "paragraph")
            default = attributes.get(_W + "default", "").lower() in ("1", "true", "on")
            self._style = (attributes.get(_W + "styleId"), kind == "paragraph", default)
            style_id, paragraph, _ = self._style
            if paragraph and style_id is not None and style_id not in self.names:
                self.names[style_id] = None
            if paragraph and default:
                self.default = None
        elif name == _W + "name" and self._style is not None:
            style_id, paragraph, default = self._style
            value = attributes.get(_W + "val")
            if paragraph and style_id is not None and self.names.get(style_id) is None:
                self.names[style_id] = value
            if paragraph and default:
                self.default = value

    def end(self, name: str) -> None:
        if name == _W + "style":
            self._style = None

    def name_of(self, style_id: str | None) -> str:
        if style_id is not None and style_id in self.names:
            return self.names[style_id] or ""
        return self.default or ""


_RUN_TEXT = {_W + "tab": "\t", _W + "ptab": "\t", _W + "cr": "\n", _W + "noBreakHyphen": "-"}


class _DocxReader(_XmlHandler):
    """The body's paragraphs and top-level tables as python-docx reads them, built while the XML streams past.

    Only ``w:r`` and ``w:hyperlink/w:r`` children of a paragraph count (python-docx's ``Paragraph.text``),
    a table row's cells are its ``w:tc`` (a horizontally merged cell counts once, a vertically merged one
    repeats the text above it), and a cell's text is its own paragraphs (nested tables are not read).
    """

    def __init__(self, styles: _DocxStyles, max_chars: int | None) -> None:
        self.styles = styles
        self.max_chars = max_chars
        self.blocks: list[tuple[str | None, int | None, list[str]]] = [(None, None, [])]
        self.saw_document = False
        self._stack: list[str] = []
        self._headings: list[tuple[int, str]] = []
        self._chars = 0
        self._elements = 0
        # the paragraph being read: its depth, pieces and style id
        self._paragraph_depth: int | None = None
        self._pieces: list[str] = []
        self._style_id: str | None = None
        self._in_text = False
        # the top-level table being read
        self._table_depth: int | None = None
        self._above: dict[int, str] = {}  # grid offset -> cell text of the previous row (vertical merges)
        self._row: list[tuple[int, str]] = []
        self._row_offset = 0
        self._cell: tuple[int, int, str | None, list[str]] | None = None  # (offset, span, vMerge, paragraphs)

    def start(self, name: str, attributes: dict[str, str]) -> None:
        stack = self._stack
        depth = len(stack)
        self._elements += 1
        if self._elements > DOCX_MAX_ELEMENTS:
            raise TooLargeError(f"it has more than {DOCX_MAX_ELEMENTS} XML elements")
        if depth >= _DOCX_MAX_DEPTH:
            raise BadInputError("its XML is nested too deeply to read")
        parent = stack[-1] if stack else ""
        stack.append(name)
        if depth == 0:
            self.saw_document = name == _W + "document"
        paragraph = self._paragraph_depth
        if paragraph is not None:
            offset = depth - paragraph
            if offset == 3 and name == _W + "t" and parent == _W + "r":  # p/hyperlink/r/t is checked in text()
                self._in_text = self._counted_run(depth - 1)
            elif offset == 2 and name == _W + "t" and parent == _W + "r":
                self._in_text = True
            elif name in _RUN_TEXT and parent == _W + "r" and self._counted_run(depth - 1):
                self._add(_RUN_TEXT[name])
            elif name == _W + "br" and parent == _W + "r" and self._counted_run(depth - 1):
                if attributes.get(_W + "type", "textWrapping") == "textWrapping":
                    self._add("\n")
            elif offset == 2 and name == _W + "pStyle" and parent == _W + "pPr":
                self._style_id = attributes.get(_W + "val")
            return
        if name == _W + "p" and (parent == _W + "body" and depth == 2 or self._cell_depth() == depth - 1):
            self._paragraph_depth = depth
            self._pieces = []
            self._style_id = None
            return
        table = self._table_depth
        if name == _W + "tbl" and depth == 2 and parent == _W + "body":
            self._table_depth = depth
            self._above = {}
        elif table is None:
            return
        elif name == _W + "tr" and depth == table + 1:
            self._row, self._row_offset = [], 0
        elif name == _W + "gridBefore" and depth == table + 3 and parent == _W + "trPr":
            self._row_offset = _int_attribute(attributes, 0)
        elif name == _W + "tc" and depth == table + 2:
            self._cell = (self._row_offset, 1, None, [])
        elif self._cell is not None and depth == table + 4 and parent == _W + "tcPr":
            offset, span, merge, paragraphs = self._cell
            if name == _W + "gridSpan":
                self._cell = (offset, max(1, _int_attribute(attributes, 1)), merge, paragraphs)
            elif name == _W + "vMerge":
                self._cell = (offset, span, attributes.get(_W + "val", "continue"), paragraphs)

    def end(self, name: str) -> None:
        stack = self._stack
        stack.pop()
        depth = len(stack)
        if self._in_text and name == _W + "t":
            self._in_text = False
        if depth == self._paragraph_depth:
            self._paragraph_depth = None
            self._end_paragraph()
            return
        table = self._table_depth
        if table is None or self._paragraph_depth is not None:
            return
        if depth == table + 2 and name == _W + "tc" and self._cell is not None:
            offset, span, merge, paragraphs = self._cell
            text = self._above.get(offset, "") if merge == "continue" else "\n".join(paragraphs)
            self._row.append((offset, text))
            self._row_offset = offset + span
            self._cell = None
        elif depth == table + 1 and name == _W + "tr":
            self._above = dict(self._row)
            cells: list[str] = []
            for _, cell in self._row:
                cell_text = " ".join(_clean_text(cell).split())
                if cell_text and (not cells or cells[-1] != cell_text):  # merged cells repeat their text
                    cells.append(cell_text)
            if cells:
                self.blocks[-1][2].append(" | ".join(cells))
        elif depth == table:
            self._table_depth = None

    def text(self, data: str) -> None:
        if self._in_text and self._stack[-1] == _W + "t":
            self._add(data)

    def _counted_run(self, run_depth: int) -> bool:
        """A ``w:r`` at ``run_depth`` is part of the paragraph's text: a child of it or of its hyperlink."""
        paragraph = self._paragraph_depth
        if paragraph is None:
            return False
        return run_depth == paragraph + 1 or (run_depth == paragraph + 2
                                              and self._stack[paragraph + 1] == _W + "hyperlink")

    def _cell_depth(self) -> int | None:
        return self._table_depth + 2 if self._table_depth is not None and self._cell is not None else None

    def _add(self, text: str) -> None:
        self._chars += len(text)
        if self.max_chars is not None and self._chars > self.max_chars:
            raise TooLargeError(f"it holds more than {self.max_chars} characters of text; the limit is "
                                f"{self.max_chars}")
        self._pieces.append(text)

    def _end_paragraph(self) -> None:
        raw = "".join(self._pieces)
        self._pieces = []
        if self._cell is not None:
            self._cell[3].append(raw)
            return
        text = _clean_text(raw).strip() if raw else ""
        if not text:
            return
        style_name = self.styles.name_of(self._style_id)
        match = _HEADING_STYLE.match(style_name)
        level = 0 if style_name.lower() == "title" else int(match.group(1)) if match else None
        if level is not None:
            while self._headings and self._headings[-1][0] >= level:
                self._headings.pop()
            self._headings.append((level, text))
            self.blocks.append((_HEADING_SEPARATOR.join(part for _, part in self._headings), None, []))
        else:
            self.blocks[-1][2].append(text)


def _int_attribute(attributes: dict[str, str], default: int) -> int:
    try:
        return int(attributes.get(_W + "val", default))
    except ValueError:
        return default


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

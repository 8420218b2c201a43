"""One document library for several instances (issue 16): PostgreSQL holds it, each instance's LanceDB indexes it.

Real PostgreSQL (the worker's server, a fresh database per test), real LanceDB in a folder per instance, the
real MiniLM shared by every store of the module. Instances are RagStores attached as app/server.py attaches
them; the reconcile interval stays long (30 s) where a test shows that notifications carry the change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from app.store import NotFoundError, RagStore, StoreError, postgres_local
from app.store.embedding import Embedder
from app.store.shared_documents import SharedDocuments, share_documents
from app.store.shared_library import LibraryModelMismatch
from broker.mqtt.local_broker import free_port

WAIT_S = 20.0
"""Longest wait for a change to reach another instance (it takes well under a second on an idle box)."""

ROUTER_NOTES = """# Router notes

## Guest network

The guest network password is stored in the drawer under the printer; it rotates every first Monday.

## Firmware

Firmware 7.2 fixed the E1074 reboot loop; never install 7.1 again.
"""


class CountingEmbedder:
    """The shared model, counting the passages each instance embeds (queries are not counted)."""

    def __init__(self, model: Embedder) -> None:
        self.model = model
        self.passages = 0

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
        self.passages += len(texts)
        return self.model.encode(texts, batch_size=batch_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def model() -> Embedder:
    embedder = Embedder(threads=1)
    embedder.warm_up()
    return embedder


@pytest.fixture()
def open_instance(model: Embedder, tmp_path: Path) -> Iterator[Callable[..., RagStore]]:
    """Opens a store in a folder of its own attached to a database, as app/server.py does; closes them all."""
    stores: list[RagStore] = []

    def open_one(url: str | None, name: str, *, embedding_model: str = "all-MiniLM-L6-v2", **options: Any) -> RagStore:
        store = RagStore(tmp_path / name, embedding_model=embedding_model, embedder=CountingEmbedder(model))  # type: ignore[arg-type]
        stores.append(store)
        if url is not None:
            share_documents(store, url, **options)
        return store

    yield open_one
    for store in stores:
        store.close()


def wait_until(condition: Callable[[], Any], timeout: float = WAIT_S, what: str = "the change") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not arrive within {timeout:.0f} s")


def ids(store: RagStore, user: str | None = None) -> set[str]:
    return {document.id for document in store.list_documents(user)}


def shared(store: RagStore) -> SharedDocuments:
    assert store.shared is not None
    return store.shared


def test_an_upload_on_one_instance_is_searched_on_the_other_without_embedding_again(postgres_url, open_instance):
    first = open_instance(postgres_url, "a")
    second = open_instance(postgres_url, "b")
    document = first.add_text(ROUTER_NOTES, "router.md")
    assert first.embedder.passages == document.chunk_count

    hits = wait_until(lambda: second.search("where is the guest wifi password kept?", k=2), what="the upload")
    assert hits[0].document_id == document.id
    assert "drawer under the printer" in hits[0].text
    copied = second.get_document(document.id)
    assert (copied.name, copied.sha256, copied.chunk_count, copied.owner) == (
        document.name, document.sha256, document.chunk_count, document.owner)
    assert second.embedder.passages == 0, "the second instance copied the vectors, it did not embed again"
    assert second.search("E1074", k=1, mode="fts")[0].document_id == document.id  # keyword index is fed too
    status = second.sync_status()
    assert status is not None and status["connected"] and status["local_documents"] == 1
    assert status["shared_documents"] == 1 and status["words"].startswith("in step")


def test_a_deletion_on_any_instance_deletes_everywhere_and_private_documents_keep_their_owner(
    postgres_url, open_instance
):
    first = open_instance(postgres_url, "a")
    second = open_instance(postgres_url, "b")
    shared_doc = first.add_text(ROUTER_NOTES, "router.md")
    private_doc = first.add_text("Alice's salary review is on the fourteenth of May.", "alice.txt",
                                 owner="alice", private=True)
    wait_until(lambda: ids(second, "alice") == {shared_doc.id, private_doc.id}, what="both uploads")

    copied = second.get_document(private_doc.id, "alice")
    assert copied.private and copied.owner == "alice"
    assert ids(second, "bob") == {shared_doc.id}
    assert not second.search("when is the salary review?", k=3, user="bob")
    assert second.search("when is the salary review?", k=3, user="alice")[0].document_id == private_doc.id
    with pytest.raises(NotFoundError):  # someone else's private document does not exist for bob, here either
        second.delete_document(private_doc.id, "bob")

    second.delete_document(shared_doc.id)
    assert shared_doc.id not in ids(second)
    wait_until(lambda: shared_doc.id not in ids(first), what="the deletion")
    assert not first.search("guest network password", k=3)
    second.delete_document(private_doc.id, "alice")
    wait_until(lambda: not ids(first, "alice"), what="the private deletion")
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM rag_chunks").fetchone() == (0,)
        assert connection.execute("SELECT count(*) FROM rag_deleted_documents").fetchone() == (2,)


def test_an_instance_opened_later_reconciles_and_shares_what_only_it_had(postgres_url, open_instance):
    first = open_instance(postgres_url, "a")
    kept = first.add_text(ROUTER_NOTES, "router.md")
    gone = first.add_text("The old printer's toner is model TN-2420.", "printer.txt")
    first.delete_document(gone.id)
    # An instance that worked alone before (its own library) joins, e.g. after --database-url was set.
    late = open_instance(None, "late")
    own = late.add_text("The NAS backs up to the blue USB disk every Sunday night.", "nas.txt")
    assert late.embedder.passages == own.chunk_count
    late.close()
    late = open_instance(postgres_url, "late")

    wait_until(lambda: ids(late) == {kept.id, own.id}, what="the reconcile on open")
    wait_until(lambda: own.id in ids(first), what="the late instance's own document")
    assert first.search("where do backups go?", k=1)[0].document_id == own.id
    assert late.embedder.passages == 0, "joining copies vectors both ways, it embeds nothing"


def test_the_same_file_uploaded_on_two_instances_is_one_document(postgres_url, open_instance):
    first = open_instance(postgres_url, "a")
    second = open_instance(postgres_url, "b")
    answers: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda s=store, n=name: answers.__setitem__(n, s.add_text(ROUTER_NOTES, "r.md")))
               for store, name in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers["a"].id == answers["b"].id, "both uploads answer with the one shared document"
    wait_until(lambda: ids(first) == ids(second) == {answers["a"].id}, what="one document on both")
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM rag_documents").fetchone() == (1,)
    # Uploaded again later: the local duplicate check answers at once, nothing is embedded.
    before = second.embedder.passages
    again = second.add_text(ROUTER_NOTES, "router copy.md")
    assert again.duplicate and again.id == answers["a"].id and second.embedder.passages == before


def test_sync_survives_the_database_going_away_and_coming_back(tmp_path, open_instance):
    port = free_port()
    server = postgres_local.start(tmp_path / "postgres", port)
    try:
        first = open_instance(server.url, "a")
        second = open_instance(server.url, "b")
        before = first.add_text(ROUTER_NOTES, "router.md")
        wait_until(lambda: before.id in ids(second), what="the first upload")

        server.stop()
        wait_until(lambda: not second.sync_status()["connected"], what="noticing the outage")
        during = first.add_text("The office alarm code changes on the first of each month.", "alarm.txt")
        assert first.search("alarm code", k=1)[0].document_id == during.id, "uploads and search go on locally"
        assert first.sync_status()["unpublished"] == 1
        with pytest.raises(StoreError, match="unreachable"):  # it would stay on the other instance
            second.delete_document(before.id)
        assert before.id in ids(second)
        assert "unreachable" in second.sync_status()["words"]

        server = postgres_local.start(tmp_path / "postgres", port)
        wait_until(lambda: during.id in ids(second), what="the upload made during the outage")
        status = wait_until(lambda: (s := first.sync_status())["connected"] and s["unpublished"] == 0 and s,
                            what="the first instance's reconnection")
        assert status["behind_s"] is not None and status["behind_s"] < WAIT_S
        second.delete_document(before.id)
        wait_until(lambda: before.id not in ids(first), what="a deletion after the outage")
        assert second.embedder.passages == 0
    finally:
        server.stop()


def test_a_library_of_another_embedding_model_is_refused(postgres_url, open_instance):
    first = open_instance(postgres_url, "a")
    document = first.add_text(ROUTER_NOTES, "router.md")
    with pytest.raises(LibraryModelMismatch, match="all-MiniLM-L6-v2.*--embedding-model"):
        open_instance(postgres_url, "other", embedding_model="intfloat/e5-small-v2")

    # A document of another model in the library (an instance of another configuration) is never copied.
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("UPDATE rag_documents SET embedding_model = 'intfloat/e5-small-v2'")
    with pytest.raises(LibraryModelMismatch):
        open_instance(postgres_url, "b")
    shared(first).wake()
    status = wait_until(lambda: (s := first.sync_status())["refused"] == 1 and s, what="the refusal")
    assert "another embedding model refused" in status["words"]
    assert ids(first) == {document.id}  # its own copy stays; it was embedded with this instance's model


def test_two_app_processes_share_the_library(mosquitto, topic_prefix, postgres_url, tmp_path):
    """Real ``python -m app`` twice (app/server.py wiring): uploaded through one's API, searched through the other's."""
    from gradio_client import Client

    from tests.app_support import start_app

    apps = []
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once: each loads Gradio and the model
            apps.extend(pool.map(lambda name: start_app(tmp_path / name, mosquitto, topic_prefix=topic_prefix,
                                                        extra=["--database-url", postgres_url]), ("a", "b")))
        first, second = (Client(app.url, verbose=False) for app in apps)
        added = first.predict(None, ROUTER_NOTES, "router.md", api_name="/rag_add")
        document_id = added["added"][0]["id"]
        hits = wait_until(lambda: second.predict("where is the guest wifi password kept?", 2,
                                                 api_name="/rag_search"), what="the upload on the other app")
        assert hits[0]["document_id"] == document_id
        assert second.predict(document_id, api_name="/rag_delete") == {"deleted": document_id}
        wait_until(lambda: not first.predict(api_name="/rag_list"), what="the deletion on the other app")
    finally:
        for app in apps:
            app.stop()

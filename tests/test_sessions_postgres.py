"""Chats shared through a real PostgreSQL (issue 16, several front ends): what only a shared database has.

The behaviour every backend shares (CRUD, owners, errors, prompt history) runs against PostgreSQL too, in
tests/test_sessions.py. Here: two stores (two app instances) on one database, writers racing on one chat, two
instances creating the schema at the same moment, the server going away and coming back, and the real app
keeping its chats in ``SLB_DATABASE_URL`` across a restart with a new data folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from gradio_client import Client

from app.store import postgres_local
from app.store.errors import NotFoundError, StoreError
from app.store.sessions import make_title
from app.store.sessions_postgres import DatabaseUnavailableError, PostgresSessionStore
from broker.coordinator.contract import QueryEvent, QueryRequest
from broker.mqtt.local_broker import free_port
from tests.app_scripted import ScriptedCoordinator, agent, answer, serve


@pytest.fixture
def two_stores(postgres_url: str) -> Iterator[tuple[PostgresSessionStore, PostgresSessionStore]]:
    """Two stores on one database, as two app instances have."""
    first, second = PostgresSessionStore(postgres_url), PostgresSessionStore(postgres_url)
    yield first, second
    first.close()
    second.close()


def test_two_stores_see_each_others_writes(two_stores: tuple[PostgresSessionStore, PostgresSessionStore]) -> None:
    first, second = two_stores
    chat = first.create_session(owner="alice", settings={"system_prompt": "Be brief."})
    first.add_message(chat.id, "user", "What is MQTT?", owner="alice")
    answer_message = second.add_message(chat.id, "assistant", "A protocol.", owner="alice", agents=["desk"])

    seen = second.get_session(chat.id, owner="alice")
    assert (seen.title, seen.message_count, seen.settings.system_prompt) == ("What is MQTT?", 2, "Be brief.")
    assert first.get_history(chat.id, owner="alice")[-1] == answer_message
    assert [info.id for info in second.list_sessions(owner="alice")] == [chat.id]
    assert second.list_sessions(owner="bob") == []

    second.rename_session(chat.id, "MQTT", owner="alice")
    second.update_settings(chat.id, {"mode": "quality"}, owner="alice")
    renamed = first.get_session(chat.id, owner="alice")
    assert (renamed.title, renamed.title_is_custom, renamed.settings.mode) == ("MQTT", True, "quality")

    assert first.truncate_from(chat.id, answer_message.id, owner="alice") == 1
    assert [message.content for message in second.get_history(chat.id, owner="alice")] == ["What is MQTT?"]
    first.delete_session(chat.id, owner="alice")
    with pytest.raises(NotFoundError):
        second.get_history(chat.id, owner="alice")
    with pytest.raises(NotFoundError):
        second.add_message(chat.id, "user", "too late", owner="alice")


def test_writers_on_two_stores_lose_nothing_and_keep_order(
    two_stores: tuple[PostgresSessionStore, PostgresSessionStore],
) -> None:
    """Eight threads over two stores append to one new chat at once: every message is there once, each writer's
    in the order it wrote them, ids follow the order of commits, and the first question that landed titles it."""
    threads_count, per_thread = 8, 25
    chat = two_stores[0].create_session()
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def writer(worker: int) -> None:
        store = two_stores[worker % 2]
        try:
            start.wait()
            for index in range(per_thread):
                store.add_message(chat.id, "user" if index % 2 == 0 else "assistant", f"w{worker}-m{index}")
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    history = two_stores[1].get_history(chat.id)
    contents = [message.content for message in history]
    assert len(contents) == threads_count * per_thread == len(set(contents))
    ids = [message.id for message in history]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for worker in range(threads_count):
        assert [text for text in contents if text.startswith(f"w{worker}-")] == [
            f"w{worker}-m{index}" for index in range(per_thread)]
    first_question = next(message for message in history if message.role == "user")
    info = two_stores[0].get_session(chat.id)
    assert info.title == make_title(first_question.content) and info.message_count == threads_count * per_thread


def test_two_instances_create_the_schema_at_the_same_moment(postgres_url: str) -> None:
    count = 4
    start = threading.Barrier(count)
    stores: list[PostgresSessionStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            start.wait()
            stores.append(PostgresSessionStore(postgres_url))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not errors, errors[:3]
        chat = stores[0].create_session("made by one")
        assert [store.get_session(chat.id).title for store in stores] == ["made by one"] * count
        with psycopg.connect(postgres_url) as raw:
            assert raw.execute("SELECT version FROM slb_schema WHERE component = 'sessions'").fetchone() == (2,)
    finally:
        for store in stores:
            store.close()


def test_the_database_going_away_gives_a_clear_error_and_the_next_call_after_it_returns_works(
    tmp_path: Path,
) -> None:
    """A server of its own (stopping the shared one would break other tests); the URL carries a password (trust
    authentication ignores it) that no error may show."""
    port = free_port()
    server = postgres_local.start(tmp_path / "data", port)
    url = server.url.replace("postgres@", "postgres:s3cret-pw@")
    store = PostgresSessionStore(url, wait_s=2.0, connect_timeout_s=1.0)
    try:
        chat = store.create_session("kept")
        store.add_message(chat.id, "user", "before the outage")
        server.stop()
        for call in (lambda: store.add_message(chat.id, "user", "during the outage"),
                     lambda: store.list_sessions(), lambda: store.get_history(chat.id)):
            with pytest.raises(DatabaseUnavailableError) as error:
                call()
            assert error.value.http_status == 503 and isinstance(error.value, StoreError)
            assert "chat database" in str(error.value) and "s3cret-pw" not in str(error.value)

        server = postgres_local.start(tmp_path / "data", port)
        assert [message.content for message in store.get_history(chat.id)] == ["before the outage"]
        store.add_message(chat.id, "assistant", "after it came back")
        assert store.get_session(chat.id).message_count == 2
    finally:
        store.close()
        server.stop()
    with pytest.raises(StoreError, match="closed"):
        store.list_sessions()


def _script(request: QueryRequest) -> list[QueryEvent]:
    return answer(request, "desk", "llama3.2:1b", ["Answer to: ", request.messages[-1].content])


def test_the_app_keeps_its_chats_in_the_database_across_a_restart_with_a_new_data_dir(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLB_DATABASE_URL", postgres_url)
    coordinator = ScriptedCoordinator(agents=[agent("desk")], script=_script)
    with serve(coordinator, tmp_path / "first") as running:
        client = Client(running.url, verbose=False, download_files=False)
        job = client.submit("Where are my chats kept?", "", api_name="/chat")
        job.result(timeout=60)
        session_id = job.outputs()[-1]["session_id"]
    assert not (tmp_path / "first" / "sessions.sqlite3").exists()

    with serve(coordinator, tmp_path / "second") as running:
        client = Client(running.url, verbose=False, download_files=False)
        assert [info["id"] for info in client.predict(api_name="/sessions_list")] == [session_id]
        history = client.predict(session_id, api_name="/session_history")
        assert [message["content"] for message in history] == [
            "Where are my chats kept?", "Answer to: Where are my chats kept?"]

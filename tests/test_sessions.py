"""Chat sessions on a real SQLite file: CRUD, titles, prompt history, concurrent writers."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError
from app.store.sessions import DEFAULT_TITLE, SessionStore, estimate_tokens, make_title


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    sessions = SessionStore(tmp_path / "chat.sqlite3")
    yield sessions
    sessions.close()


def test_create_list_get(store: SessionStore) -> None:
    first = store.create_session()
    second = store.create_session("Planning")
    assert first.title == DEFAULT_TITLE and not first.title_is_custom
    assert second.title == "Planning" and second.title_is_custom
    assert first.message_count == 0
    assert store.get_session(first.id) == first
    assert [session.id for session in store.list_sessions()] == [second.id, first.id]
    assert len(store.list_sessions(limit=1)) == 1


def test_list_orders_by_latest_activity_and_counts_messages(store: SessionStore) -> None:
    old = store.create_session()
    new = store.create_session()
    time.sleep(0.01)
    store.add_message(old.id, "user", "hello again")
    store.add_message(old.id, "assistant", "hi")
    listed = store.list_sessions()
    assert [session.id for session in listed] == [old.id, new.id]
    assert listed[0].message_count == 2 and listed[1].message_count == 0
    assert listed[0].updated_at > listed[0].created_at


def test_title_from_first_question_unless_renamed(store: SessionStore) -> None:
    session = store.create_session()
    store.add_message(session.id, "system", "You are helpful.")
    store.add_message(session.id, "user", "   How do I   install the agent\non a Raspberry Pi?  ")
    store.add_message(session.id, "user", "Second question must not retitle")
    assert store.get_session(session.id).title == "How do I install the agent on a Raspberry Pi?"

    renamed = store.rename_session(session.id, "  Pi setup ")
    assert renamed.title == "Pi setup" and renamed.title_is_custom

    custom = store.create_session("Mine")
    store.add_message(custom.id, "user", "a question")
    assert store.get_session(custom.id).title == "Mine"


def test_long_question_title_is_cut_at_a_word() -> None:
    title = make_title("word " * 40)
    assert len(title) <= 60 and title.endswith("…") and not title.endswith(" …")
    assert make_title("x" * 100).startswith("x" * 50)
    assert make_title("   ") == DEFAULT_TITLE


def test_history_keeps_answer_metadata(store: SessionStore) -> None:
    session = store.create_session()
    question = store.add_message(session.id, "user", "What is MQTT?")
    answer = store.add_message(
        session.id,
        "assistant",
        "A publish/subscribe protocol [1].",
        agents=["gpu-desktop", "laptop"],
        models=["llama3.1:8b", "llama3.2:1b"],
        mode="all",
        citations=[{"number": 1, "document_name": "mqtt.pdf", "page": 3, "snippet": "MQTT is..."}],
        stats={"tokens_per_s": 41.5, "ttft_s": 0.2},
    )
    history = store.get_history(session.id)
    assert [message.id for message in history] == [question.id, answer.id]
    stored = history[1]
    assert stored.agents == ["gpu-desktop", "laptop"]
    assert stored.models == ["llama3.1:8b", "llama3.2:1b"]
    assert stored.mode == "all"
    assert stored.citations[0]["page"] == 3
    assert stored.stats == {"tokens_per_s": 41.5, "ttft_s": 0.2}
    assert history[0].agents == [] and history[0].citations == [] and history[0].mode is None
    assert stored.to_prompt() == {"role": "assistant", "content": "A publish/subscribe protocol [1]."}

    from app.store.prompt import Citation

    citation = Citation(number=1, document_id="d", document_name="a.md", snippet="s", score=0.5, chunk_id="d:0")
    with_model = store.add_message(session.id, "assistant", "again [1]", citations=[citation])
    assert store.get_history(session.id)[-1].citations == [citation.model_dump(mode="json")] == with_model.citations


def test_delete_cascades_to_messages(store: SessionStore, tmp_path: Path) -> None:
    session = store.create_session()
    for index in range(3):
        store.add_message(session.id, "user", f"question {index}")
    keep = store.create_session()
    store.add_message(keep.id, "user", "stay")
    store.delete_session(session.id)
    with pytest.raises(NotFoundError):
        store.get_history(session.id)
    with sqlite3.connect(tmp_path / "chat.sqlite3") as raw:
        assert raw.execute("SELECT COUNT(*) FROM messages WHERE session_id = ?", (session.id,)).fetchone()[0] == 0
        assert raw.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unknown_ids_raise_not_found(store: SessionStore) -> None:
    for call in (
        lambda: store.get_session("nope"),
        lambda: store.get_history("nope"),
        lambda: store.delete_session("nope"),
        lambda: store.rename_session("nope", "x"),
        lambda: store.add_message("nope", "user", "x"),
        lambda: store.history_for_prompt("nope", 100),
    ):
        with pytest.raises(NotFoundError, match="nope"):
            call()
    assert issubclass(NotFoundError, StoreError)


def test_bad_input_is_refused(store: SessionStore) -> None:
    session = store.create_session()
    with pytest.raises(BadInputError, match="role"):
        store.add_message(session.id, "robot", "x")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="title"):
        store.rename_session(session.id, "   ")
    with pytest.raises(TooLargeError):
        store.rename_session(session.id, "t" * 500)
    with pytest.raises(BadInputError, match="stats"):
        store.add_message(session.id, "assistant", "x", stats={"bad": object()})
    with pytest.raises(BadInputError, match="agents"):
        store.add_message(session.id, "assistant", "x", agents="gpu")  # type: ignore[arg-type]
    with pytest.raises(TooLargeError):
        store.add_message(session.id, "user", "x" * 1_000_001)
    assert store.get_history(session.id) == []  # nothing half-written
    assert store.get_session(session.id).title == DEFAULT_TITLE


def test_history_for_prompt_fits_budget_oldest_first(store: SessionStore) -> None:
    session = store.create_session()
    for index in range(10):
        store.add_message(session.id, "user", f"question {index} " + "q" * 80)
        store.add_message(session.id, "assistant", f"answer {index} " + "a" * 80)
    store.add_message(session.id, "user", "final question")
    history = store.get_history(session.id)
    per_message = history[0].estimated_tokens
    trimmed = store.history_for_prompt(session.id, budget_tokens=per_message * 4 + 10)
    assert trimmed[-1].content == "final question"
    assert [message.id for message in trimmed] == [message.id for message in history[-len(trimmed) :]]
    assert sum(message.estimated_tokens for message in trimmed) <= per_message * 4 + 10
    assert len(trimmed) == 5
    assert store.history_for_prompt(session.id, budget_tokens=10**6) == history


def test_history_for_prompt_always_keeps_newest_question(store: SessionStore) -> None:
    session = store.create_session()
    store.add_message(session.id, "user", "earlier")
    store.add_message(session.id, "assistant", "reply")
    store.add_message(session.id, "user", "huge " * 1000)
    trimmed = store.history_for_prompt(session.id, budget_tokens=10)
    assert [message.content for message in trimmed] == ["huge " * 1000]
    assert store.history_for_prompt(store.create_session().id, 100) == []
    assert estimate_tokens("abcd" * 10) == 10


def test_many_threads_write_and_lose_nothing(store: SessionStore) -> None:
    threads_count, per_thread = 8, 50
    sessions = [store.create_session() for _ in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def writer(worker: int) -> None:
        try:
            start.wait()
            for index in range(per_thread):
                session = sessions[(worker + index) % len(sessions)]
                store.add_message(session.id, "user" if index % 2 else "assistant", f"w{worker}-m{index}")
                if index % 10 == 0:
                    store.list_sessions()
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    contents = [message.content for session in sessions for message in store.get_history(session.id)]
    assert len(contents) == threads_count * per_thread
    assert set(contents) == {f"w{worker}-m{index}" for worker in range(threads_count) for index in range(per_thread)}
    assert sum(session.message_count for session in store.list_sessions()) == threads_count * per_thread


def test_reopen_keeps_data(tmp_path: Path) -> None:
    first = SessionStore(tmp_path / "db" / "chat.sqlite3")
    session = first.create_session()
    first.add_message(session.id, "user", "persist me")
    first.close()
    with pytest.raises(StoreError):
        first.list_sessions()
    second = SessionStore(tmp_path / "db" / "chat.sqlite3")
    assert second.get_history(session.id)[0].content == "persist me"
    assert second.get_session(session.id).title == "persist me"
    second.close()

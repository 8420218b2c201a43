"""Chat sessions on a real SQLite file and a real PostgreSQL database: CRUD, titles, prompt history, concurrent
writers. Every test that takes ``store`` runs against both backends (same answers, same errors); what only one of
them has (a SQLite file's migration, PostgreSQL shared by two stores) is tested on its own."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.store.errors import BadInputError, NotFoundError, StoreError, TooLargeError
from app.store.sessions import (
    DEFAULT_TITLE,
    SHARED_USER,
    ChatSettings,
    SessionStore,
    SqlSessionStore,
    estimate_tokens,
    make_title,
)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SqlSessionStore:
    if request.param == "postgres":
        from app.store.sessions_postgres import PostgresSessionStore

        sessions: SqlSessionStore = PostgresSessionStore(request.getfixturevalue("postgres_url"))
    else:
        sessions = SessionStore(tmp_path / "chat.sqlite3")
    yield sessions
    sessions.close()


def raw_sql(store: SqlSessionStore, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` (``?`` placeholders) on the store's database behind its back, committed; the rows it gives."""
    if isinstance(store, SessionStore):
        with sqlite3.connect(store.db_path) as raw:
            return [tuple(row) for row in raw.execute(sql, parameters).fetchall()]
    import psycopg

    with psycopg.connect(store.url) as raw:  # type: ignore[attr-defined]
        cursor = raw.execute(sql.replace("?", "%s"), parameters)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []


def test_create_list_get(store: SqlSessionStore) -> None:
    first = store.create_session()
    second = store.create_session("Planning")
    assert first.title == DEFAULT_TITLE and not first.title_is_custom
    assert second.title == "Planning" and second.title_is_custom
    assert first.message_count == 0
    assert store.get_session(first.id) == first
    assert [session.id for session in store.list_sessions()] == [second.id, first.id]
    assert len(store.list_sessions(limit=1)) == 1


def test_list_orders_by_latest_activity_and_counts_messages(store: SqlSessionStore) -> None:
    old = store.create_session()
    new = store.create_session()
    time.sleep(0.01)
    store.add_message(old.id, "user", "hello again")
    store.add_message(old.id, "assistant", "hi")
    listed = store.list_sessions()
    assert [session.id for session in listed] == [old.id, new.id]
    assert listed[0].message_count == 2 and listed[1].message_count == 0
    assert listed[0].updated_at > listed[0].created_at


def test_title_from_first_question_unless_renamed(store: SqlSessionStore) -> None:
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


def test_history_keeps_answer_metadata(store: SqlSessionStore) -> None:
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


def test_delete_cascades_to_messages(store: SqlSessionStore) -> None:
    session = store.create_session()
    for index in range(3):
        store.add_message(session.id, "user", f"question {index}")
    keep = store.create_session()
    store.add_message(keep.id, "user", "stay")
    store.delete_session(session.id)
    with pytest.raises(NotFoundError):
        store.get_history(session.id)
    assert raw_sql(store, "SELECT COUNT(*) FROM messages WHERE session_id = ?", (session.id,)) == [(0,)]
    assert raw_sql(store, "SELECT COUNT(*) FROM messages") == [(1,)]
    if isinstance(store, SessionStore):
        assert raw_sql(store, "PRAGMA journal_mode") == [("wal",)]


def test_unknown_ids_raise_not_found(store: SqlSessionStore) -> None:
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


def test_bad_input_is_refused(store: SqlSessionStore) -> None:
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


def test_history_for_prompt_fits_budget_oldest_first(store: SqlSessionStore) -> None:
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


def test_history_for_prompt_always_keeps_newest_question(store: SqlSessionStore) -> None:
    session = store.create_session()
    store.add_message(session.id, "user", "earlier")
    store.add_message(session.id, "assistant", "reply")
    store.add_message(session.id, "user", "huge " * 1000)
    trimmed = store.history_for_prompt(session.id, budget_tokens=10)
    assert [message.content for message in trimmed] == ["huge " * 1000]
    assert store.history_for_prompt(store.create_session().id, 100) == []
    assert estimate_tokens("abcd" * 10) == 10


def test_many_threads_write_and_lose_nothing(store: SqlSessionStore) -> None:
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


# ---------------------------------------------------------------------------- issue 14: settings, outcomes, users

OLD_SCHEMA = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT NOT NULL, title_is_custom INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL,
    created_at REAL NOT NULL, agents TEXT NOT NULL DEFAULT '[]', models TEXT NOT NULL DEFAULT '[]', mode TEXT,
    citations TEXT NOT NULL DEFAULT '[]', stats TEXT NOT NULL DEFAULT '{}');
CREATE INDEX messages_by_session ON messages(session_id, id);
CREATE INDEX sessions_by_activity ON sessions(updated_at DESC);
INSERT INTO sessions VALUES ('old1', 'Before users', 1, 1700000000.0, 1700000100.0);
INSERT INTO messages (session_id, role, content, created_at, agents, models, mode)
    VALUES ('old1', 'user', 'What is MQTT?', 1700000000.0, '[]', '[]', NULL),
           ('old1', 'assistant', 'A protocol.', 1700000050.0, '["desk"]', '["llama3.2:1b"]', 'auto');
"""


def test_a_database_of_the_previous_version_opens_and_keeps_its_chats(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:
        raw.executescript(OLD_SCHEMA)
    store = SessionStore(path)
    try:
        [info] = store.list_sessions()
        assert (info.id, info.title, info.message_count, info.owner) == ("old1", "Before users", 2, SHARED_USER)
        assert info.settings == ChatSettings()
        question, answer = store.get_history("old1")
        assert answer.status == "ok" and answer.error is None and answer.tried == [] and answer.agents == ["desk"]
        # The migrated file takes the new columns: settings, outcomes, a new message.
        store.update_settings("old1", {"system_prompt": "Be brief.", "temperature": 0.2})
        store.add_message("old1", "assistant", "", status="error", error="no agent", tried=["desk"])
        assert store.get_session("old1").settings.system_prompt == "Be brief."
    finally:
        store.close()
    again = SessionStore(path)  # opening a migrated file again changes nothing
    try:
        assert [message.status for message in again.get_history("old1")] == ["ok", "ok", "error"]
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        again.close()


def test_chat_settings_round_trip_and_bad_values_change_nothing(store: SqlSessionStore) -> None:
    chosen = ChatSettings(system_prompt="You answer in French.", temperature=0.7, max_tokens=256, mode="quality",
                          agent="gpu-desktop", use_rag=True, aggregation="synthesize")
    session = store.create_session("Réglages", settings=chosen)
    assert session.settings == chosen == store.get_session(session.id).settings
    assert store.list_sessions()[0].settings == chosen

    updated = store.update_settings(session.id, {"mode": "  llama3.2:1b ", "agent": "  "})
    assert updated.settings.mode == "llama3.2:1b" and updated.settings.agent is None
    assert updated.settings.system_prompt == ""  # a dict replaces the settings; missing keys take the defaults

    for bad, word in (({"temperature": 3}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                      ({"aggregation": "vote"}, "aggregation"), ({"mode": " "}, "mode"),
                      ({"system_prompt": "x" * 20_001}, "system_prompt"), ({"colour": "red"}, "colour"),
                      ({"system_prompt": "\ud800"}, "surrogate")):
        with pytest.raises(BadInputError, match=word):
            store.update_settings(session.id, bad)
    assert store.get_session(session.id).settings == updated.settings
    with pytest.raises(BadInputError):
        store.create_session(settings={"temperature": -1})
    assert len(store.list_sessions()) == 1

    # Settings a newer version wrote: this chat gets the defaults.
    raw_sql(store, "UPDATE sessions SET settings = ? WHERE id = ?", ('{"future": 1}', session.id))
    assert store.get_session(session.id).settings == ChatSettings()


def test_a_failed_answer_is_kept_with_its_error_and_left_out_of_later_prompts(store: SqlSessionStore) -> None:
    session = store.create_session()
    store.add_message(session.id, "user", "first question")
    store.add_message(session.id, "assistant", "first answer", agents=["desk"])
    store.add_message(session.id, "user", "question that failed")
    failed = store.add_message(session.id, "assistant", "half an ans", status="error",
                               error="pi-sim: runtime crashed", tried=["pi-sim", "desk"], models=["llama3.2:1b"])
    store.add_message(session.id, "user", "question that was stopped at once")
    store.add_message(session.id, "assistant", "", status="stopped", error="stopped")
    store.add_message(session.id, "user", "question stopped halfway")
    store.add_message(session.id, "assistant", "partial", status="stopped", error="stopped", agents=["desk"])
    store.add_message(session.id, "user", "new question")

    stored = store.get_history(session.id)[3]
    assert stored == failed
    assert (stored.status, stored.error, stored.tried, stored.agents) == (
        "error", "pi-sim: runtime crashed", ["pi-sim", "desk"], [])
    prompt = [message.content for message in store.history_for_prompt(session.id, 10_000)]
    assert prompt == ["first question", "first answer", "question stopped halfway", "partial", "new question"]

    # The newest question stays even when its own answer failed (it is asked again by regenerate).
    store.add_message(session.id, "assistant", "", status="error", error="timeout")
    assert store.history_for_prompt(session.id, 10_000)[-1].content == "new question"
    with pytest.raises(BadInputError, match="status"):
        store.add_message(session.id, "assistant", "x", status="maybe")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="answer"):
        store.add_message(session.id, "user", "x", status="error")


def test_truncate_from_removes_a_message_and_everything_after(store: SqlSessionStore) -> None:
    session = store.create_session()
    ids = [store.add_message(session.id, role, f"{role} {index}").id
           for index in range(3) for role in ("user", "assistant")]
    other = store.create_session()
    kept_elsewhere = store.add_message(other.id, "user", "another chat")

    assert store.truncate_from(session.id, ids[4]) == 2
    assert [message.id for message in store.get_history(session.id)] == ids[:4]
    with pytest.raises(NotFoundError, match="message"):
        store.truncate_from(session.id, ids[5])  # already gone
    with pytest.raises(NotFoundError):
        store.truncate_from(session.id, kept_elsewhere.id)  # a message of another chat
    with pytest.raises(BadInputError):
        store.truncate_from(session.id, "3")  # type: ignore[arg-type]
    assert store.get_history(other.id) == [kept_elsewhere]

    assert store.truncate_from(session.id, ids[0]) == 4  # the whole chat: the next first question retitles it
    store.add_message(session.id, "user", "a different start")
    assert store.get_session(session.id).title == "a different start"


def test_users_see_only_their_own_chats(store: SqlSessionStore) -> None:
    alice = store.create_session("alice's", owner="alice")
    store.add_message(alice.id, "user", "secret plan", owner="alice")
    bob = store.create_session("bob's", owner="bob")
    shared = store.create_session("no login")

    assert [info.id for info in store.list_sessions(owner="alice")] == [alice.id]
    assert [info.id for info in store.list_sessions(owner="bob")] == [bob.id]
    assert [info.id for info in store.list_sessions()] == [shared.id]
    assert store.get_session(alice.id, owner="alice").owner == "alice"

    # bob gets exactly what an unknown id gets, for every call: nothing says the chat exists.
    calls = {
        "get_session": lambda sid: store.get_session(sid, owner="bob"),
        "get_history": lambda sid: store.get_history(sid, owner="bob"),
        "history_for_prompt": lambda sid: store.history_for_prompt(sid, 100, owner="bob"),
        "rename_session": lambda sid: store.rename_session(sid, "mine now", owner="bob"),
        "update_settings": lambda sid: store.update_settings(sid, {"mode": "all"}, owner="bob"),
        "add_message": lambda sid: store.add_message(sid, "user", "hi", owner="bob"),
        "truncate_from": lambda sid: store.truncate_from(sid, 1, owner="bob"),
        "delete_session": lambda sid: store.delete_session(sid, owner="bob"),
    }
    for name, call in calls.items():
        with pytest.raises(NotFoundError) as theirs:
            call(alice.id)
        with pytest.raises(NotFoundError) as unknown:
            call("0" * 32)
        assert str(theirs.value) == str(unknown.value).replace("0" * 32, alice.id), name
    with pytest.raises(NotFoundError):
        store.get_history(alice.id)  # the shared user (no login) is not alice either
    after = store.get_session(alice.id, owner="alice")
    assert (after.title, after.message_count, after.settings) == ("alice's", 1, ChatSettings())
    with pytest.raises(BadInputError, match="owner"):
        store.list_sessions(owner="")

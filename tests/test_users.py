"""Per-user chats (issue 14.8) and every question stored with its outcome (14.4), regenerate and edit (14.7).

The users file and flags are checked as units; the rest runs through the real web app (``create_app`` under
uvicorn, tests/app_scripted.py) with ``gradio_client`` logged in as two users and as a script with the API key,
so the login, the API user's middleware, the script API, the service and SQLite are all the real ones. The
coordinator is scripted: a failover that fails on every machine is not something a real cluster does on demand.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client

from app.service import AppService
from app.settings import AppSettings, fold_user_flags
from app.store import SHARED_USER, SessionStore
from app.users import UserDirectory, UsersError, hash_password, parse_users_file, verify_password
from broker.coordinator.contract import QueryEvent, QueryFailed, QueryRequest, QueryStarted, TextDelta
from tests.app_scripted import ScriptedCoordinator, ServedApp, agent, answer, serve

API_KEY = "users-key-" + uuid.uuid4().hex[:8]
ALICE = ("alice", "alice-" + uuid.uuid4().hex[:6])
BOB = ("bob", "bob:with:colons-" + uuid.uuid4().hex[:6])


# ---------------------------------------------------------------------------- units: the users file and flags


def test_passwords_are_salted_hashes_and_a_wrong_one_fails() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second and first.startswith("scrypt$") and "correct" not in first
    assert verify_password("correct horse", first) and not verify_password("correct hors", first)
    directory = UserDirectory.build([("alice", "pw1")], {"bob": second})
    assert directory.names == ["alice", "bob"]
    assert directory.check("alice", "pw1") and directory.check("bob", "correct horse")
    assert not directory.check("alice", "pw2") and not directory.check("carol", "pw1")
    with pytest.raises(UsersError, match="twice"):
        UserDirectory.build([("bob", "x")], {"bob": second})


def test_the_users_file_takes_only_hashes_and_says_which_line_is_wrong() -> None:
    line = f"bob:{hash_password('pw')}"
    assert list(parse_users_file(f"# team\n\n{line}\n")) == ["bob"]
    for text, words in (
        ("carol:plain-password", "line 1.*python -m app.users"),
        (f"# x\nbad name:{hash_password('pw')}", "line 2.*not allowed"),
        (f"{line}\n{line}", "line 2.*twice"),
        ("dave", "line 1.*expected"),
        ("erin:scrypt$3$8$1$AAAA$AAAA", "line 1.*out of range"),
        ("frank:scrypt$16384$8$1$!!$AAAA", "line 1.*damaged"),
    ):
        with pytest.raises(UsersError, match=words):
            parse_users_file(text)


def test_repeated_user_flags_and_the_settings_that_check_them(tmp_path: Path) -> None:
    argv = ["--port", "1", "--ui-user", "a:1", "--ui-user=b:2:3", "--ui-users", '["c:4"]']
    folded = fold_user_flags(argv)
    assert folded[:2] == ["--port", "1"] and folded[2] == "--ui-users"
    assert json.loads(folded[3]) == ["a:1", "b:2:3", "c:4"]  # in command-line order
    assert fold_user_flags(["--port", "1"]) == ["--port", "1"]

    settings = AppSettings(ui_users=json.loads(folded[3]), data_dir=tmp_path)
    assert settings.login_enabled and settings.user_directory().names == ["a", "b", "c"]
    assert settings.user_directory().check("b", "2:3")
    assert not AppSettings(data_dir=tmp_path).login_enabled and AppSettings(data_dir=tmp_path).user_directory() is None
    for bad, words in (({"ui_users": ["a:1", "a:2"]}, "twice"), ({"ui_users": ["nopassword"]}, "name:password"),
                       ({"api_user": "(shared)"}, "not allowed"),
                       ({"ui_users_file": tmp_path / "missing.txt"}, "cannot read")):
        with pytest.raises(ValueError, match=words):
            AppSettings(data_dir=tmp_path, **bad)
    assert "1" not in repr(settings.ui_users)  # passwords from flags never show in a repr or a log


# ---------------------------------------------------------------------------- the real app, three users


def _script(request: QueryRequest) -> list[QueryEvent]:
    """``fail`` in the question: started on pi-sim, some text, then a failure; otherwise desk answers."""
    question = request.messages[-1].content
    if "fail" in question:
        return [QueryStarted(request.request_id, ["pi-sim"], ["llama3.2:1b"], request.mode),
                TextDelta(request.request_id, "Half an ", "pi-sim", "llama3.2:1b"),
                QueryFailed(request.request_id, "pi-sim: the runtime crashed; no other agent has the model",
                            "failed", "Half an ")]
    return answer(request, "desk", "llama3.1:8b", ["Answer to: ", question])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    folder = tmp_path_factory.mktemp("users-app")
    users_file = folder / "users.txt"
    users_file.write_text(f"# the team\n{BOB[0]}:{hash_password(BOB[1])}\n")
    coordinator = ScriptedCoordinator(agents=[agent("desk"), agent("pi-sim")], script=_script)
    with serve(coordinator, folder, ui_users=[f"{ALICE[0]}:{ALICE[1]}"], ui_users_file=users_file,
               api_key=API_KEY) as running:
        yield running


def _client(served: ServedApp, *, auth: tuple[str, str] | None = None, key: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return Client(served.url, auth=auth, headers=headers, verbose=False, download_files=False)


def _last(client: Client, api_name: str, *args: Any) -> dict[str, Any]:
    """The final item of a streaming endpoint (chat, session_regenerate, session_edit)."""
    job = client.submit(*args, api_name=api_name)
    job.result(timeout=60)
    return job.outputs()[-1]


def test_each_user_and_the_api_key_see_only_their_own_chats(served: ServedApp) -> None:
    alice, bob, script = _client(served, auth=ALICE), _client(served, auth=BOB), _client(served, key=API_KEY)
    mine = _last(alice, "/chat", "alice's secret plan", "")
    theirs = _last(bob, "/chat", "bob's question", "")
    scripted = _last(script, "/chat", "a script's question", "")
    assert mine["status"] == theirs["status"] == scripted["status"] == "ok"

    def listed(client: Client) -> list[str]:
        return [info["id"] for info in client.predict(api_name="/sessions_list")]

    assert listed(alice) == [mine["session_id"]]
    assert listed(bob) == [theirs["session_id"]]
    assert listed(script) == [scripted["session_id"]]
    assert [info["owner"] for info in script.predict(api_name="/sessions_list")] == ["api"]

    # Another user's id is answered like an id that never existed, by every endpoint that takes one.
    for api_name, args in (("/session_history", ()), ("/session_rename", ("stolen",)), ("/session_delete", ()),
                           ("/session_settings", ({"mode": "all"},))):
        with pytest.raises(Exception, match="does not exist") as error:
            bob.predict(mine["session_id"], *args, api_name=api_name)
        assert "alice" not in str(error.value)
    with pytest.raises(Exception, match="does not exist"):
        _last(bob, "/chat", "may I join?", mine["session_id"])
    with pytest.raises(Exception, match="does not exist"):
        _last(script, "/session_regenerate", mine["session_id"])
    history = alice.predict(mine["session_id"], api_name="/session_history")
    assert [message["content"] for message in history] == ["alice's secret plan", "Answer to: alice's secret plan"]


def test_logins_and_keys_are_checked(served: ServedApp) -> None:
    ok = httpx.post(f"{served.url}/login", data={"username": BOB[0], "password": BOB[1]})
    assert ok.status_code == 200
    assert httpx.post(f"{served.url}/login", data={"username": BOB[0], "password": "wrong"}).status_code == 400
    assert httpx.post(f"{served.url}/login", data={"username": "nobody", "password": BOB[1]}).status_code == 400
    # Without a login the UI's API is closed; a wrong key is refused, not ignored.
    assert httpx.get(f"{served.url}/gradio_api/info").status_code == 401
    wrong = httpx.get(f"{served.url}/gradio_api/info", headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert httpx.get(f"{served.url}/gradio_api/info", headers={"X-API-Key": API_KEY}).status_code == 200
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_a_failed_answer_is_stored_with_its_error_and_what_was_tried(served: ServedApp) -> None:
    alice = _client(served, auth=ALICE)
    first = _last(alice, "/chat", "first question", "")
    session_id = first["session_id"]
    failed = _last(alice, "/chat", "please fail", session_id)
    assert failed["status"] == "error" and failed["agents"] == [] and failed["tried"] == ["pi-sim"]
    assert "runtime crashed" in failed["error"]

    history = alice.predict(session_id, api_name="/session_history")
    stored = history[-1]
    assert (stored["role"], stored["status"], stored["content"], stored["tried"], stored["agents"]) == (
        "assistant", "error", "Half an ", ["pi-sim"], [])
    assert "runtime crashed" in stored["error"] and stored["models"] == ["llama3.2:1b"]

    served.coordinator.queries.clear()
    _last(alice, "/chat", "next question", session_id)
    sent = [message.content for message in served.coordinator.queries[-1].messages]
    assert sent == ["first question", "Answer to: first question", "next question"]
    assert served.coordinator.queries[-1].conversation == session_id


def test_chat_settings_shape_the_question_and_stay_with_the_chat(served: ServedApp) -> None:
    alice = _client(served, auth=ALICE)
    created = alice.predict("Tuned", {"system_prompt": "Answer in one line.", "temperature": 0.3},
                            api_name="/session_create")
    session_id = created["id"]
    changed = alice.predict(session_id, {"max_tokens": 64, "agent": "desk", "mode": "quality"},
                            api_name="/session_settings")
    assert changed["settings"] | {} == {"system_prompt": "Answer in one line.", "temperature": 0.3,
                                         "max_tokens": 64, "mode": "quality", "agent": "desk", "use_rag": False,
                                         "aggregation": "consensus"}
    with pytest.raises(Exception, match="temperature"):
        alice.predict(session_id, {"temperature": 9}, api_name="/session_settings")

    served.coordinator.queries.clear()
    _last(alice, "/chat", "hello", session_id)
    request = served.coordinator.queries[-1]
    assert request.messages[0].role == "system" and request.messages[0].content == "Answer in one line."
    assert request.options == {"temperature": 0.3, "num_predict": 64}
    assert (request.mode, request.agent) == ("quality", "desk")

    _last(alice, "/chat", "anyone", session_id, "auto", "", None, "")  # the caller's mode and "any agent" win
    request = served.coordinator.queries[-1]
    assert (request.mode, request.agent) == ("auto", None)
    assert alice.predict(session_id, api_name="/session_settings")["settings"]["agent"] == "desk"


def test_regenerate_and_edit_replace_the_end_of_the_chat(served: ServedApp) -> None:
    alice = _client(served, auth=ALICE)
    session_id = _last(alice, "/chat", "one", "")["session_id"]
    _last(alice, "/chat", "please fail now", session_id)
    again = _last(alice, "/session_regenerate", session_id)
    assert again["status"] == "error"  # asked again: fails again, and replaces the earlier failure
    history = alice.predict(session_id, api_name="/session_history")
    assert [(m["role"], m["status"]) for m in history] == [("user", "ok"), ("assistant", "ok"), ("user", "ok"),
                                                          ("assistant", "error")]
    question_id = history[2]["id"]
    edited = _last(alice, "/session_edit", session_id, question_id, "two")
    assert edited["status"] == "ok" and edited["text"] == "Answer to: two"
    history = alice.predict(session_id, api_name="/session_history")
    assert [m["content"] for m in history] == ["one", "Answer to: one", "two", "Answer to: two"]
    regenerated = _last(alice, "/session_regenerate", session_id)
    assert regenerated["text"] == "Answer to: two"
    assert len(alice.predict(session_id, api_name="/session_history")) == 4

    with pytest.raises(Exception, match="not a question"):
        _last(alice, "/session_edit", session_id, history[1]["id"], "an answer is not a question")
    with pytest.raises(Exception, match="empty"):
        _last(alice, "/session_edit", session_id, history[0]["id"], "   ")
    assert len(alice.predict(session_id, api_name="/session_history")) == 4  # refused edits delete nothing
    empty = alice.predict("", api_name="/session_create")["id"]
    with pytest.raises(Exception, match="no question"):
        _last(alice, "/session_regenerate", empty)


def test_without_a_login_everyone_shares_one_user(tmp_path: Path) -> None:
    coordinator = ScriptedCoordinator(agents=[agent("desk")], script=_script)
    with serve(coordinator, tmp_path, api_key=API_KEY) as running:
        anyone, keyed = _client(running), _client(running, key=API_KEY)
        session_id = _last(anyone, "/chat", "shared question", "")["session_id"]
        assert [info["id"] for info in keyed.predict(api_name="/sessions_list")] == [session_id]
        assert keyed.predict(api_name="/sessions_list")[0]["owner"] == SHARED_USER


async def test_a_question_that_could_not_be_sent_is_stored_with_why(tmp_path: Path) -> None:
    """The document search fails before the query goes out: the chat still shows the question and the error."""

    def broken_documents() -> Any:
        raise OSError("the disk with the document index is gone")

    sessions = SessionStore(tmp_path / "chat.sqlite3")
    service = AppService(AppSettings(data_dir=tmp_path, rag_warm_up=False),
                         ScriptedCoordinator(agents=[agent("desk")], script=_script), sessions, broken_documents)
    try:
        session = sessions.create_session(owner="alice", settings={"use_rag": True})
        with pytest.raises(OSError):
            await service.ask("what do my notes say?", session_id=session.id, user="alice")
        question, failed = sessions.get_history(session.id, owner="alice")
        assert question.content == "what do my notes say?"
        assert (failed.status, failed.agents, failed.tried) == ("error", [], [])
        assert "could not be sent (OSError)" in (failed.error or "")
        stream = await service.ask("and without them?", session_id=session.id, user="alice", use_rag=False)
        async for _ in stream:
            pass
        assert sessions.get_history(session.id, owner="alice")[-1].content == "Answer to: and without them?"
    finally:
        sessions.close()

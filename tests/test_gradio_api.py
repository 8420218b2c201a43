"""Every Gradio ``api_name`` of a running ``python -m app``, through ``gradio_client`` as scripts use it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.app_support import OLLAMA_AGENT, SIMULATED_AGENT, UI_USER, RunningApp, wait_for_app
from tests.ollama_double import reply_text

pytest_plugins = ["tests.app_fixtures"]

pytestmark = pytest.mark.slow

API_NAMES = {
    "/chat", "/query", "/cancel", "/status", "/health", "/models", "/plan", "/reassign", "/sessions_list",
    "/session_create", "/session_history", "/session_delete", "/session_rename", "/rag_add", "/rag_search",
    "/rag_list", "/rag_delete",
}


@pytest.fixture(scope="module")
def client(app_cluster: RunningApp) -> Client:
    return Client(app_cluster.url, verbose=False)


def _ollama_model(client: Client) -> str:
    status = client.predict(api_name="/status")
    return next(agent["model"] for agent in status["agents"] if agent["id"] == OLLAMA_AGENT)


def test_every_api_name_is_published(client: Client) -> None:
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert API_NAMES <= set(endpoints)
    assert not any(name.startswith("/ui_") for name in endpoints), "UI helpers stay out of the documented API"


def test_status_health_models_plan(client: Client) -> None:
    health = client.predict(api_name="/health")
    assert health["healthy"] is True and health["connected_clients"] == 2
    status = client.predict(api_name="/status")
    agents = {agent["id"]: agent for agent in status["agents"]}
    assert agents[SIMULATED_AGENT]["simulated"] is True
    models = {item["name"]: item for item in client.predict(api_name="/models")}
    assert OLLAMA_AGENT in models[_ollama_model(client)]["agents"], "each model says which machines have it"
    assert {holder["state"] for item in models.values() for holder in item["holders"]} <= {"ready", "loaded", "local"}
    plan = client.predict(api_name="/plan")
    assert plan["applied"] is False
    assert {entry["agent_id"] for entry in plan["entries"]} >= {OLLAMA_AGENT, SIMULATED_AGENT}
    for entry in plan["entries"]:
        assert entry["reason"]
    applied = client.predict(api_name="/reassign")
    assert applied["applied"] is True
    assert not any(entry["change"] for entry in applied["entries"]), "a re-plan right after one changes nothing"


def test_chat_stores_the_session_with_who_answered(client: Client) -> None:
    model = _ollama_model(client)
    job = client.submit("hello gradio client", "", model, "consensus", False, api_name="/chat")
    items = list(job)
    final = job.outputs()[-1]
    assert final["done"] is True
    assert final["text"] == reply_text("hello gradio client")
    assert final["agents"] == [OLLAMA_AGENT] and final["models"] == [model]
    assert len(items) >= 2, "the answer streams"
    session_id = final["session_id"]
    history = client.predict(session_id, api_name="/session_history")
    assert [message["role"] for message in history] == ["user", "assistant"]
    assert history[1]["agents"] == [OLLAMA_AGENT] and history[1]["models"] == [model]
    assert history[1]["content"] == final["text"]
    second = client.predict("and a follow up", session_id, model, "consensus", False, api_name="/chat")
    assert second["session_id"] == session_id
    assert len(client.predict(session_id, api_name="/session_history")) == 4


def test_sessions_crud(client: Client) -> None:
    created = client.predict("Planning notes", api_name="/session_create")
    assert created["title"] == "Planning notes"
    listed = client.predict(api_name="/sessions_list")
    assert created["id"] in [item["id"] for item in listed]
    renamed = client.predict(created["id"], "Renamed notes", api_name="/session_rename")
    assert renamed["title"] == "Renamed notes"
    assert client.predict(created["id"], api_name="/session_delete") == {"deleted": created["id"]}
    assert created["id"] not in [item["id"] for item in client.predict(api_name="/sessions_list")]
    with pytest.raises(AppError, match="does not exist"):
        client.predict(created["id"], api_name="/session_history")
    with pytest.raises(AppError, match="empty"):
        client.predict(client.predict("", api_name="/session_create")["id"], "   ", api_name="/session_rename")


def test_query_all_mode_returns_every_answer_and_agreement(client: Client) -> None:
    final = client.predict("compare every machine", "all", "consensus", False, api_name="/query")
    assert final["done"] and final["error"] is None
    assert {answer["agent_id"] for answer in final["answers"]} == {OLLAMA_AGENT, SIMULATED_AGENT}
    assert 0.0 <= final["agreement"] <= 1.0
    assert final["aggregation"] == "consensus"
    assert SIMULATED_AGENT in final["simulated_agents"]
    simulated = next(answer for answer in final["answers"] if answer["agent_id"] == SIMULATED_AGENT)
    assert simulated["simulated"] is True


def test_documents_add_search_cite_delete(client: Client, tmp_path: Path) -> None:
    guide = tmp_path / "ferry-guide.md"
    guide.write_text(
        "# Ferries\n\nThe night ferry to the island of Velmora leaves from pier 9 at 23:40 every Tuesday.\n\n"
        "# Trains\n\nTrains to the mountains depart hourly from the central station.\n"
    )
    added = client.predict([handle_file(str(guide))], "", "", api_name="/rag_add")
    assert added["names"] == ["ferry-guide.md"]
    document_id = added["added"][0]["id"]
    text = client.predict(None, "Glossary: a quokka is a small wallaby.", "glossary.txt", api_name="/rag_add")
    assert text["names"] == ["glossary.txt"]
    names = {item["name"] for item in client.predict(api_name="/rag_list")}
    assert {"ferry-guide.md", "glossary.txt"} <= names
    hits = client.predict("when does the boat to Velmora leave", 3, api_name="/rag_search")
    assert hits[0]["document_name"] == "ferry-guide.md"
    assert "pier 9" in hits[0]["text"]
    answer = client.predict("when does the night ferry to Velmora leave?", "auto", "consensus", True,
                            api_name="/query")
    assert answer["citations"] and answer["citations"][0]["document_name"] == "ferry-guide.md"
    assert client.predict(document_id, api_name="/rag_delete") == {"deleted": document_id}
    after = client.predict("Velmora ferry pier", 3, api_name="/rag_search")
    assert all(hit["document_name"] != "ferry-guide.md" for hit in after)
    with pytest.raises(AppError, match="not supported"):
        bad = tmp_path / "program.exe"
        bad.write_bytes(b"MZ\x00\x00")
        client.predict([handle_file(str(bad))], "", "", api_name="/rag_add")


def test_cancel_stops_the_job_on_the_agent(client: Client, app_cluster: RunningApp) -> None:
    double = app_cluster.double
    assert double is not None
    model = _ollama_model(client)
    aborted_before = double.stats.streams_aborted_by_client
    double.config.reply_tokens = 3000  # ~7 s at 400 tokens/s
    try:
        job = client.submit("a very long answer please", model, "consensus", False, api_name="/query")
        request_id = wait_for_app(
            lambda: next((item["request_id"] for item in job.outputs() if item["text"]), None), 20, "first text"
        )
        started = time.monotonic()
        assert client.predict(request_id, api_name="/cancel")["cancelled"] is True
        final = job.result(timeout=20)
        assert final["error_code"] == "cancelled"
        assert time.monotonic() - started < 5
        wait_for_app(lambda: double.stats.streams_aborted_by_client > aborted_before, 10,
                     "the agent to stop its backend stream")
    finally:
        double.config.reply_tokens = None


def test_bare_app_needs_login_and_explains_missing_ollama(bare_app: RunningApp) -> None:
    health = httpx.get(f"{bare_app.url}/health", timeout=10).json()
    assert health["healthy"] is False and health["connected_clients"] == 0
    assert "ollama.com" in health["message"] and "--backend-url" in health["message"]
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types for a refused login
        Client(bare_app.url, verbose=False).predict(api_name="/health")
    logged_in = Client(bare_app.url, auth=UI_USER, verbose=False)
    assert logged_in.predict(api_name="/health")["healthy"] is False
    answer = logged_in.predict("anyone there?", "auto", "consensus", False, api_name="/query")
    assert answer["done"] and answer["error_code"] in {"no_agent", "busy"}


def test_uploads_over_the_limit_are_refused(bare_app: RunningApp, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("lorem ipsum " * 10_000)  # 120 KB, over the app's 50 KB limit
    client = Client(bare_app.url, auth=UI_USER, verbose=False)
    with pytest.raises(Exception, match="(?i)size|large|limit"):  # noqa: B017 - Gradio refuses it at upload
        client.predict([handle_file(str(big))], "", "", api_name="/rag_add")
    with pytest.raises(AppError, match="limit"):
        client.predict(None, "x" * 60_000, "pasted.txt", api_name="/rag_add")

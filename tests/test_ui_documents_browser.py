"""RAG as a person and a script see it (issue 14.10): relevance in words, citations in the /v1 and /api answers,
upload progress with time left, private documents; in Debian's Chromium and through real HTTP requests.

One app (the shared ``app_cluster``: an agent on the Ollama test double and a simulated one, real LanceDB and
MiniLM) and one browser for the module. Screenshots go to tests/artifacts/ui_documents_*.png.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.app_support import ARTIFACTS, OLLAMA_AGENT, RunningApp
from tests.test_ui_browser import TIMEOUT_MS, browser  # noqa: F401 - the module's browser fixture
from tests.test_ui_rendering_browser import gradio_call

pytest_plugins = ["tests.app_fixtures"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FERRY_GUIDE = (
    "# Ferries\n\nThe night ferry to the island of Velmora leaves from pier 9 at 23:40 every Tuesday. Tickets are "
    "sold on board.\n\n# Trains\n\nTrains to the mountains depart hourly from the central station.\n"
)
RELATED = "When does the night ferry to Velmora leave?"
UNRELATED = "Who painted the Mona Lisa?"
NO_PASSAGE_NOTE = "no passage of those documents is relevant"


@pytest.fixture(scope="module")
def ferry_guide(app_cluster: RunningApp) -> Iterator[str]:
    """The guide in the shared library (shared, so every caller may be cited from it); its document id.

    Deleted at the end: the app is shared by the whole session, and other modules search the same library.
    """
    added = gradio_call(app_cluster.url, "rag_add", [None, FERRY_GUIDE, "velmora-ferries.md"])
    document_id = added["added"][0]["id"]
    yield document_id
    assert gradio_call(app_cluster.url, "rag_delete", [document_id]) == {"deleted": document_id}


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def _ollama_model(app: RunningApp) -> str:
    return next(agent["model"] for agent in app.status()["agents"] if agent["id"] == OLLAMA_AGENT)


def _system_prompt_seen(app: RunningApp, question: str) -> str:
    """The system text the Ollama double received with ``question`` (the RAG sources or the no-passage note)."""
    assert app.double is not None
    for body in reversed(app.double.requests_to("/api/chat") + app.double.requests_to("/v1/chat/completions")):
        messages = body.get("messages") or []
        if any(message.get("role") == "user" and message.get("content") == question for message in messages):
            return "\n".join(str(m.get("content")) for m in messages if m.get("role") == "system")
    raise AssertionError(f"the double never received {question!r}")


def _check_citation(citation: dict[str, Any], document_id: str) -> None:
    assert citation["number"] == 1 and citation["document_id"] == document_id
    assert citation["document_name"] == "velmora-ferries.md" and citation["section"] == "Ferries"
    assert "pier 9" in citation["snippet"]
    assert citation["match"] in ("strong", "partial") and citation["match_label"] == f"{citation['match']} match"
    assert 0.32 <= citation["relevance"] <= 1.0


# -- the APIs ------------------------------------------------------------------------------------------------


def test_openai_answers_carry_citations_and_clients_still_parse_them(app_cluster: RunningApp, ferry_guide: str) -> None:
    model = _ollama_model(app_cluster)
    client = openai.OpenAI(base_url=f"{app_cluster.url}/v1", api_key=app_cluster.api_key, max_retries=0)
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": RELATED}], extra_body={"rag": True}
    )
    assert response.choices[0].message.content and response.choices[0].finish_reason == "stop"
    citations = response.model_extra["citations"]
    _check_citation(citations[0], ferry_guide)
    assert all(citation["section"] != "Trains" for citation in citations)  # same document, unrelated: not cited
    system = _system_prompt_seen(app_cluster, RELATED)
    assert "[1] velmora-ferries.md (Ferries)" in system and "pier 9" in system

    # Streamed: only the final chunk (the one with finish_reason) carries them; the SDK reads every chunk.
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": RELATED}], stream=True, extra_body={"rag": True}
    ))
    finals = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["citations"][0]["document_id"] == ferry_guide
    assert all("citations" not in (chunk.model_extra or {}) for chunk in chunks if chunk is not finals[0])

    # Nothing relevant: nothing cited, and the model is told so instead of getting unrelated text.
    unrelated = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": UNRELATED}], extra_body={"rag": True}
    )
    assert unrelated.model_extra["citations"] == []
    system = _system_prompt_seen(app_cluster, UNRELATED)
    assert NO_PASSAGE_NOTE in system and "Velmora" not in system
    # Without rag the field is absent (plain OpenAI shape).
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}])
    assert "citations" not in (plain.model_extra or {})


def test_ollama_chat_answers_carry_citations(app_cluster: RunningApp, ferry_guide: str) -> None:
    model = _ollama_model(app_cluster)
    body = {"model": model, "messages": [{"role": "user", "content": RELATED}], "rag": True}
    whole = httpx.post(f"{app_cluster.url}/api/chat", json={**body, "stream": False}, headers=app_cluster.headers,
                       timeout=60)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["done"] is True and answer["message"]["content"]
    _check_citation(answer["citations"][0], ferry_guide)

    with httpx.stream("POST", f"{app_cluster.url}/api/chat", json=body, headers=app_cluster.headers,
                      timeout=60) as streamed:
        lines = [json.loads(line) for line in streamed.iter_lines() if line.strip()]
    assert lines[-1]["done"] is True
    _check_citation(lines[-1]["citations"][0], ferry_guide)
    assert all("citations" not in line for line in lines[:-1])

    plain = httpx.post(f"{app_cluster.url}/api/chat", json={**body, "rag": False, "stream": False},
                       headers=app_cluster.headers, timeout=60).json()
    assert "citations" not in plain


# -- the Documents tab ---------------------------------------------------------------------------------------


def _open_documents(page: Page, app: RunningApp) -> None:
    page.goto(app.url)
    expect(page.locator("#slb-message textarea")).to_be_visible()
    page.get_by_role("tab", name="Documents").click()
    expect(page.locator("#slb-add-docs")).to_be_visible()


def test_a_large_paste_shows_chunks_and_time_left_then_is_private(
    page: Page, app_cluster: RunningApp, ferry_guide: str
) -> None:
    # 80 short sections: 80 chunks, five batches of 16, a few seconds of embedding; the estimate comes after the first.
    manual = "\n\n".join(
        f"# Valve {step}\n\nOpen valve {step} a quarter turn, wait for the gauge of line {step} to settle, then "
        f"close valve {step + 1} before starting pump {step % 7}." for step in range(80)
    )
    _open_documents(page, app_cluster)
    page.get_by_text("…or paste text").click()
    page.locator("#slb-paste-name input").fill("valve-manual.md")
    page.locator("#slb-paste-text textarea").fill(manual)
    page.locator("#slb-doc-private input").check()
    page.locator("#slb-paste-add").click()
    result = page.locator("#slb-upload-result")
    expect(result).to_contain_text(re.compile(r"embedded \d+/80 chunks, about \d+ (s|min)( \d+ s)? left"),
                                   timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "ui_documents_time_left.png"))
    expect(result).to_contain_text("Added valve-manual.md: 80 chunks, private", timeout=120_000)
    table = page.locator("#slb-documents")
    expect(table).to_contain_text("valve-manual.md")
    expect(table).to_contain_text("private")
    # Without a login everybody is the same user, so the owner (everyone) still finds it.
    listed = [document for document in gradio_call(app_cluster.url, "rag_list", [])
              if document["name"] == "valve-manual.md" and document["private"]]
    assert listed
    # The app is shared by the session: leave its library as it was found.
    assert gradio_call(app_cluster.url, "rag_delete", [listed[0]["id"]]) == {"deleted": listed[0]["id"]}


def test_search_results_say_how_strong_a_match_is(page: Page, app_cluster: RunningApp, ferry_guide: str) -> None:
    _open_documents(page, app_cluster)
    search_box = page.locator("#slb-search input, #slb-search textarea").first
    results = page.locator("#slb-search-results")
    search_box.fill("when does the boat to Velmora leave")
    page.locator("#slb-search-button").click()
    expect(results).to_contain_text("velmora-ferries.md")
    expect(results).to_contain_text(re.compile(r"(strong|partial) match"))
    expect(results).not_to_contain_text("score")
    page.screenshot(path=str(ARTIFACTS / "ui_documents_relevance.png"), full_page=True)
    search_box.fill("who won the football world cup")
    page.locator("#slb-search-button").click()
    expect(results).to_contain_text("weak match (not used in answers)")
    expect(results).not_to_contain_text(re.compile(r"(strong|partial) match"))


def test_chat_sources_say_how_strong_a_match_is(page: Page, app_cluster: RunningApp, ferry_guide: str) -> None:
    page.goto(app_cluster.url)
    expect(page.locator("#slb-message textarea")).to_be_visible()
    if not page.locator("#slb-rag input").is_visible():  # the toggle sits in the folded chat settings
        page.locator("#slb-settings").get_by_text(re.compile("^Chat settings")).first.click()
    page.locator("#slb-rag input").check()
    page.locator("#slb-message textarea").fill(RELATED)
    page.locator("#slb-send").click()
    chatbot = page.locator("#slb-chatbot")
    expect(chatbot).to_contain_text("answered by", timeout=30_000)  # finished: no re-render folds the sources
    expect(chatbot).to_contain_text("Sources (")
    chatbot.get_by_text(re.compile(r"Sources \(\d+\)")).last.click()
    expect(chatbot).to_contain_text("velmora-ferries.md")
    expect(chatbot).to_contain_text(re.compile(r"(strong|partial) match"))
    page.screenshot(path=str(ARTIFACTS / "ui_documents_chat_sources.png"))

"""The UI in a real browser: Debian's Chromium driven by Playwright (never a downloaded browser).

Screenshots go to tests/artifacts/ (gitignored) so a person can look at what
the test saw.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.app_support import ARTIFACTS, OLLAMA_AGENT, SIMULATED_AGENT, UI_USER, RunningApp, wait_for_app
from tests.ollama_double import reply_text

pytest_plugins = ["tests.app_fixtures"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def _shot(page: Page, name: str, *, full: bool = False) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)


def _ollama_model(app: RunningApp) -> str:
    return next(agent["model"] for agent in app.status()["agents"] if agent["id"] == OLLAMA_AGENT)


def _open(page: Page, app: RunningApp) -> None:
    page.goto(app.url)
    expect(page.locator("#slb-message textarea")).to_be_visible()
    expect(page.locator("#slb-chat-notice")).to_contain_text("machines ready")


def _open_settings(page: Page) -> None:
    """The chat settings (mode, machine, RAG, ...) live in a folded accordion."""
    if not page.locator("#slb-mode").is_visible():
        page.locator("#slb-settings").get_by_text(re.compile("^Chat settings")).first.click()
    expect(page.locator("#slb-mode")).to_be_visible()


def _model_label(app: RunningApp, model: str) -> str:
    """The picker's label of a model: its name and the machines that have it (as /v1/models lists them)."""
    models = httpx.get(f"{app.url}/v1/models", headers=app.headers, timeout=10).json()["data"]
    agents = next(item["slb_agents"] for item in models if item["id"] == model)
    return f"model: {model} · {', '.join(agents)}"


def _choose_mode(page: Page, label: str) -> None:
    _open_settings(page)
    page.locator("#slb-mode input").click()
    page.get_by_role("option", name=label, exact=True).click()
    expect(page.locator("#slb-mode input")).to_have_value(label)


def _ask(page: Page, question: str) -> None:
    page.locator("#slb-message textarea").fill(question)
    page.locator("#slb-send").click()


def _last_answer(page: Page):
    return page.locator('#slb-chatbot [data-testid="bot"]').last


def test_chat_streams_an_answer_that_names_its_agent(page: Page, app_cluster: RunningApp) -> None:
    model = _ollama_model(app_cluster)
    double = app_cluster.double
    assert double is not None
    _open(page, app_cluster)
    _shot(page, "ui_chat_start")
    _choose_mode(page, _model_label(app_cluster, model))
    double.config.reply_tokens = 60
    question = "tell me about the cluster"
    try:
        double.config.tokens_per_s = 40  # slow enough to catch the stream half way
        _ask(page, question)
        expect(_last_answer(page)).to_contain_text("Echo:")
        _shot(page, "ui_chat_streaming")
        expect(_last_answer(page)).to_contain_text(f"answered by {OLLAMA_AGENT} ({model})", timeout=30_000)
    finally:
        double.config.tokens_per_s = 400
        double.config.reply_tokens = None
    text = _last_answer(page).inner_text()
    assert reply_text(question, 60) in " ".join(text.split())
    _shot(page, "ui_chat_answered")
    # The new session is in the list, titled after the question; it reopens after a new chat.
    sessions = page.locator("#slb-sessions")
    expect(sessions).to_contain_text(question)
    page.locator("#slb-new-chat").click()
    expect(page.locator('#slb-chatbot [data-testid="bot"]')).to_have_count(0)
    sessions.get_by_text(re.compile(re.escape(question))).first.click()
    expect(_last_answer(page)).to_contain_text(f"answered by {OLLAMA_AGENT}")


def test_all_mode_shows_every_agent_side_by_side(page: Page, app_cluster: RunningApp) -> None:
    _open(page, app_cluster)
    _choose_mode(page, "all (every agent)")
    expect(page.locator("#slb-aggregation")).to_be_visible()
    _ask(page, "what do all of you say")
    answer = page.locator('#slb-chatbot [data-testid="bot"]', has_text="combined by consensus").last
    expect(answer).to_be_visible(timeout=30_000)
    # Every agent's answer is right under the combined one, as cards side by side.
    page.locator("#slb-chatbot").get_by_text("Every agent's answer (2)").click()
    panel = page.locator("#slb-chatbot .slb-answers").last
    expect(panel).to_contain_text(OLLAMA_AGENT)
    expect(panel).to_contain_text(SIMULATED_AGENT)
    expect(panel.locator(".slb-sim")).to_have_count(1)
    expect(answer).to_contain_text("agreement")
    expect(answer).to_contain_text(f"{SIMULATED_AGENT} (")
    expect(answer).to_contain_text("simulated")
    _shot(page, "ui_chat_all_mode", full=True)


def test_stop_button_cancels_on_the_agent(page: Page, app_cluster: RunningApp) -> None:
    double = app_cluster.double
    assert double is not None
    model = _ollama_model(app_cluster)
    _open(page, app_cluster)
    _choose_mode(page, _model_label(app_cluster, model))
    aborted = double.stats.streams_aborted_by_client
    double.config.reply_tokens = 4000  # ten seconds of text at 400 tokens/s
    try:
        _ask(page, "a long story please")
        expect(_last_answer(page)).to_contain_text("Echo:")
        page.locator("#slb-stop").click()
        expect(_last_answer(page)).to_contain_text("(stopped)", timeout=8_000)
        wait_for_app(lambda: double.stats.streams_aborted_by_client > aborted, 10, "the agent to stop its backend")
    finally:
        double.config.reply_tokens = None
    _shot(page, "ui_chat_stopped")


def test_documents_upload_list_search_and_cite(page: Page, app_cluster: RunningApp, tmp_path: Path) -> None:
    document = tmp_path / "harbour-notes.md"
    document.write_text(
        "# Harbour\n\nThe lighthouse keeper of Port Quillon feeds the seals every morning at seven.\n\n"
        "# Market\n\nThe fish market opens on Saturdays only.\n"
    )
    manual = tmp_path / "pump-manual.md"  # big enough (~100 chunks) for the progress bar to be seen
    manual.write_text("\n\n".join(
        f"# Step {step}\n\n" + " ".join(f"Check valve {step}.{part} before turning the pump on." for part in range(40))
        for step in range(35)
    ))
    _open(page, app_cluster)
    page.get_by_role("tab", name="Documents").click()
    page.locator("#slb-upload input[type=file]").set_input_files([str(manual), str(document)])
    expect(page.locator("#slb-upload")).to_contain_text(re.compile(r"harbour-notes\s*\.md"))  # both uploaded
    page.locator("#slb-add-docs").click()
    expect(page.locator("#slb-upload-result")).to_contain_text("embedded", timeout=30_000)  # the progress bar
    _shot(page, "ui_documents_progress")
    expect(page.locator("#slb-upload-result")).to_contain_text("Added harbour-notes.md", timeout=90_000)
    expect(page.locator("#slb-upload-result")).to_contain_text("Added pump-manual.md")
    expect(page.locator("#slb-documents")).to_contain_text("harbour-notes.md")
    page.locator("#slb-search input, #slb-search textarea").first.fill("who feeds the seals")
    page.locator("#slb-search-button").click()
    expect(page.locator("#slb-search-results")).to_contain_text("harbour-notes.md")
    expect(page.locator("#slb-search-results")).to_contain_text("lighthouse keeper")
    _shot(page, "ui_documents", full=True)
    # RAG in the chat: the answer carries the citation.
    page.get_by_role("tab", name="Chat").click()
    _open_settings(page)
    page.locator("#slb-rag input").check()
    _ask(page, "who feeds the seals in Port Quillon?")
    expect(page.locator("#slb-chatbot")).to_contain_text("Sources (", timeout=30_000)
    page.locator("#slb-chatbot").get_by_text(re.compile(r"Sources \(\d+\)")).last.click()
    expect(page.locator("#slb-chatbot")).to_contain_text("harbour-notes.md")
    _shot(page, "ui_chat_citations")


def test_cluster_tab_lists_agents_models_and_plans(page: Page, app_cluster: RunningApp) -> None:
    model = _ollama_model(app_cluster)
    _open(page, app_cluster)
    page.get_by_role("tab", name="Cluster").click()
    table = page.locator("#slb-agents")
    expect(table).to_contain_text(OLLAMA_AGENT)
    expect(table).to_contain_text(SIMULATED_AGENT)
    expect(table).to_contain_text(model)
    expect(table.locator("tr", has_text=SIMULATED_AGENT)).to_contain_text("simulated")
    expect(table.locator("tr", has_text=OLLAMA_AGENT)).not_to_contain_text("simulated")
    expect(table.locator("tr", has_text=OLLAMA_AGENT)).to_contain_text(re.compile(r"ollama .*\d+ slots? \(measured\)"))
    expect(table.locator("tr", has_text=OLLAMA_AGENT)).to_contain_text("failover continues")
    expect(page.locator("#slb-placement")).to_contain_text(OLLAMA_AGENT)
    page.locator("#slb-preview").click()
    expect(page.locator("#slb-plan")).to_contain_text("What-if")
    time.sleep(2.5)  # let the live timer add a few points to the plots
    expect(page.locator("#slb-plot-scores canvas, #slb-plot-scores svg").first).to_be_visible()
    _shot(page, "ui_cluster", full=True)
    page.locator("#slb-reassign").click()
    expect(page.locator("#slb-plan")).to_contain_text("Applied plan")


def test_login_and_missing_ollama_message(page: Page, bare_app: RunningApp) -> None:
    page.goto(bare_app.url)
    page.get_by_label(re.compile("username", re.I)).fill(UI_USER[0])
    page.get_by_label(re.compile("password", re.I)).fill(UI_USER[1])
    _shot(page, "ui_login")
    page.get_by_role("button", name=re.compile("login", re.I)).click()
    notice = page.locator("#slb-chat-notice")
    expect(notice).to_contain_text("ollama.com")
    expect(notice).to_contain_text("--backend-url")
    _shot(page, "ui_no_agent")

"""The chat tab as a person uses it (issue 14), in Debian's Chromium at 1440×900 and on a 390×844 phone.

One app (the shared ``app_cluster``: an agent on the Ollama test double and a simulated one) and one browser for
the module. Each test starts from a fresh page; screenshots go to tests/artifacts/ui_chat_*.png.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from tests.app_support import ARTIFACTS, OLLAMA_AGENT, SIMULATED_AGENT, RunningApp
from tests.test_ui_browser import TIMEOUT_MS, browser  # noqa: F401 - the module's browser fixture

pytest_plugins = ["tests.app_fixtures"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}


def _context_page(browser: Browser, viewport: dict[str, int], *, phone: bool = False) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


@pytest.fixture()
def desktop(browser: Browser) -> Iterator[Page]:  # noqa: F811
    yield from _context_page(browser, DESKTOP)


@pytest.fixture()
def phone(browser: Browser) -> Iterator[Page]:  # noqa: F811
    yield from _context_page(browser, PHONE, phone=True)


def _shot(page: Page, name: str, *, full: bool = False) -> None:
    page.screenshot(path=str(ARTIFACTS / f"ui_chat_{name}.png"), full_page=full)


def _open(page: Page, app: RunningApp) -> None:
    page.goto(app.url)
    expect(page.locator("#slb-message textarea")).to_be_visible()
    expect(page.locator("#slb-chat-notice")).to_contain_text("machines ready")


def _ask(page: Page, question: str) -> None:
    page.locator("#slb-message textarea").fill(question)
    page.locator("#slb-send").click()


def _bot(page: Page) -> Locator:
    return page.locator('#slb-chatbot [data-testid="bot"]')


def _settings(page: Page) -> Locator:
    """The chat settings, opened."""
    box = page.locator("#slb-settings")
    if not page.locator("#slb-system-prompt").is_visible():
        box.get_by_text(re.compile("^Chat settings")).first.click()
    expect(page.locator("#slb-system-prompt")).to_be_visible()
    return box


def _choose(page: Page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=label, exact=True).click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(label)


def _reopen(page: Page, title: str) -> None:
    """Start a new chat, then open ``title`` from the list."""
    page.locator("#slb-new-chat").click()
    expect(_bot(page)).to_have_count(0)
    page.locator("#slb-sessions").get_by_text(re.compile(re.escape(title))).first.click()
    expect(_bot(page).first).to_be_visible()


def _fits(locator: Locator) -> bool:
    """The element shows its whole text (nothing cut off by an ellipsis or overflow)."""
    return bool(locator.evaluate("element => element.scrollWidth <= element.clientWidth + 1"))


def _chat_requests(app: RunningApp, since: int) -> list[dict[str, Any]]:
    assert app.double is not None
    return app.double.requests_to("/api/chat")[since:]


def test_quiet_notice_theme_switch_and_no_fake_trash_icon(desktop: Page, app_cluster: RunningApp) -> None:
    page = desktop
    _open(page, app_cluster)
    notice = page.locator("#slb-chat-notice")
    expect(notice).to_contain_text("2 of 2 machines ready")
    expect(notice).to_contain_text("details in Cluster")
    line = notice.locator("summary")
    assert line.bounding_box()["height"] <= 24 and notice.bounding_box()["height"] <= 40, "one quiet line"
    # The advice is one click away, folded under the line.
    notice.get_by_text("machines ready").click()
    expect(notice.locator("details p")).to_contain_text("agents online")
    # The chatbot's own clear icon would only empty the view: it is not there (Delete chat… is the real delete).
    _ask(page, "hello there")
    expect(_bot(page).last).to_contain_text("answered by", timeout=30_000)
    _shot(page, "desktop_light")
    # The light/dark switch in the header is remembered across visits.
    switch = page.locator("#slb-header button")
    dark_before = page.evaluate("document.body.classList.contains('dark')")
    switch.click()
    assert page.evaluate("document.body.classList.contains('dark')") != dark_before
    page.reload()
    expect(page.locator("#slb-message textarea")).to_be_visible()
    page.wait_for_timeout(300)
    assert page.evaluate("document.body.classList.contains('dark')") != dark_before, "the choice is remembered"
    _shot(page, "desktop_dark" if not dark_before else "desktop_light_again")
    page.locator("#slb-header button").click()
    assert page.evaluate("document.body.classList.contains('dark')") == dark_before


def test_busy_state_refuses_a_second_question_visibly_and_stop_works(desktop: Page, app_cluster: RunningApp) -> None:
    page = desktop
    double = app_cluster.double
    assert double is not None
    _open(page, app_cluster)
    _settings(page)
    _choose(page, "slb-machine", next(
        option for option in _machine_labels(page) if option.startswith(OLLAMA_AGENT)))
    double.config.reply_tokens = 4000  # ten seconds of text at 400 tokens/s
    try:
        _ask(page, "a long story please")
        send = page.locator("#slb-send")
        expect(send).to_be_disabled()
        expect(send).to_have_text("Answering…")
        expect(_bot(page).last).to_contain_text("Echo:")
        box = page.locator("#slb-message textarea")
        box.fill("a second question")
        box.press("Enter")
        expect(page.get_by_text("Still answering the last question")).to_be_visible()
        expect(box).to_have_value("a second question")
        _shot(page, "busy")
        expect(page.locator("#slb-stop")).to_be_enabled()
        page.locator("#slb-stop").click()
        expect(_bot(page).last).to_contain_text("(stopped)", timeout=8_000)
    finally:
        double.config.reply_tokens = None
    expect(send).to_be_enabled()
    expect(send).to_have_text("Send")
    expect(page.locator('#slb-chatbot [data-testid="user"]')).to_have_count(1)


def _machine_labels(page: Page) -> list[str]:
    """The machine picker's choices (opened, read, closed again)."""
    page.locator("#slb-machine input").click()
    expect(page.get_by_role("option").first).to_be_visible()
    labels = [str(label) for label in page.get_by_role("option").evaluate_all(
        "options => options.map(option => option.getAttribute('aria-label'))")]
    page.locator("#slb-machine input").blur()
    expect(page.get_by_role("option")).to_have_count(0)
    return labels


def test_chat_settings_are_used_saved_and_restored(desktop: Page, app_cluster: RunningApp) -> None:
    page = desktop
    _open(page, app_cluster)
    settings = _settings(page)
    labels = _machine_labels(page)
    assert labels[0] == "any machine" and any(label.startswith(OLLAMA_AGENT) for label in labels), labels
    assert any(label.startswith(SIMULATED_AGENT) for label in labels), labels
    ollama_label = next(label for label in labels if label.startswith(OLLAMA_AGENT))
    _choose(page, "slb-machine", ollama_label)
    page.locator("#slb-system-prompt textarea").fill("Answer like a pirate.")
    page.locator("#slb-temperature input, #slb-temperature textarea").fill("0.3")
    page.locator("#slb-max-tokens input, #slb-max-tokens textarea").fill("40")
    page.locator("#slb-rag input").check()
    expect(settings).to_contain_text(f"on {OLLAMA_AGENT}")
    _shot(page, "settings")
    before = len(_chat_requests(app_cluster, 0))
    question = "what is the capital of settings"
    _ask(page, question)
    expect(_bot(page).first).to_contain_text(f"answered by {OLLAMA_AGENT}", timeout=30_000)
    sent = _chat_requests(app_cluster, before)[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Answer like a pirate."} or any(
        message["role"] == "system" and "pirate" in message["content"] for message in sent["messages"]), sent
    assert sent["options"]["temperature"] == pytest.approx(0.3)
    assert sent["options"]["num_predict"] == 40
    # A new chat starts from the defaults; reopening the chat brings its own settings back.
    page.locator("#slb-new-chat").click()
    expect(page.locator("#slb-system-prompt textarea")).to_have_value("")
    expect(page.locator("#slb-machine input")).to_have_value("any machine")
    expect(page.locator("#slb-rag input")).not_to_be_checked()
    page.locator("#slb-sessions").get_by_text(re.compile(re.escape(question))).first.click()
    expect(page.locator("#slb-system-prompt textarea")).to_have_value("Answer like a pirate.")
    expect(page.locator("#slb-machine input")).to_have_value(ollama_label)
    expect(page.locator("#slb-rag input")).to_be_checked()
    expect(page.locator("#slb-temperature textarea, #slb-temperature input")).to_have_value("0.3")
    expect(page.locator("#slb-max-tokens textarea, #slb-max-tokens input")).to_have_value("40")
    expect(settings).to_contain_text("documents on")
    # A change made in a reopened chat is saved with it at once.
    page.locator("#slb-rag input").uncheck()
    expect(settings).not_to_contain_text("documents on")
    page.wait_for_timeout(500)
    page.reload()
    expect(page.locator("#slb-message textarea")).to_be_visible()
    page.locator("#slb-sessions").get_by_text(re.compile(re.escape(question))).first.click()
    _settings(page)
    expect(page.locator("#slb-system-prompt textarea")).to_have_value("Answer like a pirate.")
    expect(page.locator("#slb-rag input")).not_to_be_checked()


def _answer_again(page: Page, app: RunningApp, button: Locator) -> None:
    """Click ``button`` and wait for the new answer: slow enough (a second) that the busy state is seen."""
    double = app.double
    assert double is not None
    before = len(_chat_requests(app, 0))
    double.config.reply_tokens, double.config.tokens_per_s = 40, 40
    try:
        button.click()
        expect(page.locator("#slb-send")).to_have_text("Answering…")
        expect(page.locator("#slb-send")).to_have_text("Send", timeout=30_000)
    finally:
        double.config.reply_tokens, double.config.tokens_per_s = None, 400
    expect(_bot(page).last).to_contain_text(f"answered by {OLLAMA_AGENT}")
    assert len(_chat_requests(app, 0)) > before, "the question was asked again"


def test_regenerate_and_edit_the_last_question(desktop: Page, app_cluster: RunningApp) -> None:
    page = desktop
    _open(page, app_cluster)
    _settings(page)
    _choose(page, "slb-machine", next(label for label in _machine_labels(page) if label.startswith(OLLAMA_AGENT)))
    question = "first wording of a question"
    _ask(page, question)
    expect(_bot(page).last).to_contain_text("answered by", timeout=30_000)
    _answer_again(page, app_cluster, page.locator("#slb-regenerate"))
    expect(page.locator('#slb-chatbot [data-testid="user"]')).to_have_count(1)
    expect(page.locator('#slb-chatbot [data-testid="bot"]', has_text="answered by")).to_have_count(1)
    # The chatbot's own retry icon under the last answer does the same.
    _answer_again(page, app_cluster, page.locator("#slb-chatbot").get_by_role("button", name="Retry").last)
    expect(page.locator('#slb-chatbot [data-testid="user"]')).to_have_count(1)
    expect(page.locator('#slb-chatbot [data-testid="bot"]', has_text="answered by")).to_have_count(1)
    # Edit: the last question comes back into the box; Enter resends it and replaces the old turn.
    page.locator("#slb-edit-last").click()
    box = page.locator("#slb-message textarea")
    expect(box).to_have_value(question)
    expect(page.locator("#slb-send")).to_have_text("Resend")
    box.fill("second wording of a question")
    box.press("Enter")
    expect(page.locator("#slb-send")).to_have_text("Send", timeout=30_000)
    chat = page.locator("#slb-chatbot")
    expect(chat).to_contain_text("second wording")
    expect(chat).not_to_contain_text("first wording")
    expect(page.locator('#slb-chatbot [data-testid="user"]')).to_have_count(1)
    _shot(page, "edited")
    _reopen(page, "second wording")  # the whole chat was cut: its first question titles it again
    expect(chat).to_contain_text("second wording")
    expect(chat).not_to_contain_text("first wording")


def test_failed_answer_says_where_it_failed_and_retry_answers_it(desktop: Page, app_cluster: RunningApp) -> None:
    page = desktop
    double = app_cluster.double
    assert double is not None
    _open(page, app_cluster)
    _settings(page)
    _choose(page, "slb-machine", next(label for label in _machine_labels(page) if label.startswith(OLLAMA_AGENT)))
    question = "a question that fails"
    double.config.fail_chat_status = 500
    try:
        _ask(page, question)
        answer = _bot(page).last
        expect(answer).to_contain_text("Failed:", timeout=30_000)
        expect(answer).to_contain_text(f"failed on {OLLAMA_AGENT}")
        expect(answer).not_to_contain_text("answered by")
        expect(answer).to_contain_text(f"tried: {OLLAMA_AGENT}")
        retry = page.locator("#slb-regenerate")
        expect(retry).to_have_text("↻ Retry")
        _shot(page, "failed")
        _reopen(page, question)
        expect(_bot(page).last).to_contain_text("Failed:")
        expect(_bot(page).last).to_contain_text(f"failed on {OLLAMA_AGENT}")
        expect(retry).to_have_text("↻ Retry")
    finally:
        double.config.fail_chat_status = None
    retry.click()
    expect(_bot(page).last).to_contain_text(f"answered by {OLLAMA_AGENT}", timeout=30_000)
    expect(page.locator("#slb-chatbot")).not_to_contain_text("Failed:")
    expect(retry).to_have_text("↻ Regenerate")


def test_delete_asks_first(desktop: Page, app_cluster: RunningApp) -> None:
    page = desktop
    _open(page, app_cluster)
    question = "a chat to delete"
    _ask(page, question)
    expect(_bot(page).last).to_contain_text("answered by", timeout=30_000)
    sessions = page.locator("#slb-sessions")
    expect(sessions).to_contain_text(question)
    page.locator("#slb-manage").get_by_text("Rename or delete").click()
    page.locator("#slb-delete-chat").click()
    confirm = page.locator("#slb-confirm-delete")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(question)
    expect(sessions).to_contain_text(question)  # nothing deleted yet
    _shot(page, "delete_confirm")
    page.locator("#slb-confirm-delete-no").click()
    expect(confirm).to_be_hidden()
    expect(sessions).to_contain_text(question)
    # The chatbot's own trash icon empties nothing by itself: it asks the same question.
    page.locator("#slb-chatbot").get_by_role("button", name="Clear").click()
    expect(confirm).to_be_visible()
    expect(_bot(page).last).to_contain_text("answered by")
    expect(sessions).to_contain_text(question)
    page.locator("#slb-confirm-delete-yes").click()
    expect(sessions).not_to_contain_text(question)
    expect(_bot(page)).to_have_count(0)
    expect(confirm).to_be_hidden()


def test_phone_first_screen_labels_and_fan_out(phone: Page, app_cluster: RunningApp) -> None:
    page = phone
    _open(page, app_cluster)
    page.wait_for_timeout(500)  # the chat list folds itself on a phone
    _shot(page, "phone_start")
    box = page.locator("#slb-message textarea").bounding_box()
    send = page.locator("#slb-send").bounding_box()
    assert box is not None and send is not None
    assert box["y"] + box["height"] <= PHONE["height"], f"message box below the first screen: {box}"
    assert send["y"] + send["height"] <= PHONE["height"], f"Send below the first screen: {send}"
    assert page.locator("#slb-chat-notice").bounding_box()["height"] <= 40
    # The chat list is folded on a phone, one tap away.
    expect(page.locator("#slb-sessions")).to_be_hidden()
    page.locator("#slb-chats").get_by_text("Chats").first.click()
    expect(page.locator("#slb-sessions")).to_be_visible()
    page.locator("#slb-chats").get_by_text("Chats").first.click()
    # Labels whole: the RAG switch and every mode choice.
    _settings(page)
    rag_label = page.locator("#slb-rag").get_by_text("Use my documents (RAG)")
    expect(rag_label).to_be_visible()
    assert _fits(rag_label), "the RAG label is cut"
    page.locator("#slb-mode input").click()
    options = page.get_by_role("option")
    expect(options.first).to_be_visible()
    cut = [options.nth(index).inner_text() for index in range(options.count()) if not _fits(options.nth(index))]
    assert not cut, f"mode choices cut off: {cut}"
    _shot(page, "phone_settings")
    page.get_by_role("option", name="all (every agent)", exact=True).click()
    expect(page.locator("#slb-aggregation")).to_be_visible()
    page.locator("#slb-settings").get_by_text(re.compile("^Chat settings")).first.click()  # fold it again
    double = app_cluster.double
    assert double is not None
    double.config.reply_tokens = 300
    double.config.tokens_per_s = 60  # five seconds: the cards are seen while they stream
    try:
        _ask(page, "what do all of you say")
        cards = page.locator("#slb-chatbot .slb-card")
        expect(cards.first).to_be_visible(timeout=15_000)
        expect(page.locator("#slb-chatbot")).to_contain_text(SIMULATED_AGENT)
        # Each card streams inside the answer's own bubble, on the first screen (re-rendered on every update, so
        # measured in the page).
        page.wait_for_function("""() => [...document.querySelectorAll('#slb-chatbot .slb-card')].some(card => {
            const box = card.getBoundingClientRect();
            return box.height > 0 && box.top >= 0 && box.top < window.innerHeight; })""", timeout=5_000)
        _shot(page, "phone_fan_out")
        expect(_bot(page).filter(has_text="combined by")).to_have_count(1, timeout=30_000)
    finally:
        double.config.reply_tokens = None
        double.config.tokens_per_s = 400
    expect(page.locator("#slb-chatbot")).to_contain_text("Every agent's answer (2)")
    expect(page.locator("#slb-send")).to_be_enabled()
    box = page.locator("#slb-message textarea").bounding_box()
    assert box is not None and box["y"] + box["height"] <= PHONE["height"], "the box stays on the first screen"
    _shot(page, "phone_answered")

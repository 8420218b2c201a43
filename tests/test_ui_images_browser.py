"""An image with a question in the chat tab (issue 17 item 3), in Debian's Chromium.

Its own small app: one agent on the Ollama double serving ``llava:7b`` (takes images) and ``llama3.2:1b`` (does
not), so the image button is offered. The picked image goes with the question to the vision model (the double
records what the agent sent), the chat shows and keeps a note of it (not the image), Regenerate sends the image
again, and a file too large or not an image is refused with a clear message and nothing attached.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from broker.mqtt.local_broker import RunningBroker
from tests.app_support import ARTIFACTS, RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble
from tests.test_images import BOX, IMAGE, PLAIN, VISION
from tests.test_ui_browser import TIMEOUT_MS, browser  # noqa: F401 - the module's browser fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def vision_app(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    folder: Path = tmp_path_factory.mktemp("ui-images")
    double = OllamaDouble(models=[PLAIN, VISION], tokens_per_s=0, vision_models={VISION}).start()
    running = start_app(folder, mosquitto, topic_prefix=f"slbtest/uiimg{uuid.uuid4().hex[:8]}/v1",
                        extra=["--no-rag-warm-up"])
    running.double = double
    try:
        start_agent(running, folder, "vision-box", backend="ollama", backend_url=double.url, profile=BOX)

        def ready() -> bool:
            agent = next((agent for agent in running.status()["agents"] if agent["id"] == "vision-box"), {})
            return agent.get("model_state") == "ready" and VISION in agent.get("available_models", {})

        wait_for_app(ready, 60, "the agent with a vision model", running)
        yield running
    finally:
        running.stop()
        double.stop()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def _open(page: Page, app: RunningApp) -> None:
    page.goto(app.url)
    expect(page.locator("#slb-message textarea")).to_be_visible()
    expect(page.locator("#slb-attach")).to_be_enabled()
    expect(page.locator("#slb-attach")).to_contain_text("Attach image")


def _attach(page: Page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#slb-attach").click()
    chooser.value.set_files(str(path))


def _chat_bodies(app: RunningApp) -> list[dict[str, Any]]:
    assert app.double is not None
    return app.double.requests_to("/api/chat")


def test_an_image_goes_with_the_question_to_the_vision_model_and_the_chat_keeps_a_note(
        page: Page, vision_app: RunningApp, tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(base64.b64decode(IMAGE))
    _open(page, vision_app)
    _attach(page, picture)
    expect(page.locator("#slb-attachment")).to_contain_text("cat.png")
    expect(page.locator("#slb-remove-image")).to_be_visible()
    before = len(_chat_bodies(vision_app))
    page.locator("#slb-message textarea").fill("What is in this picture?")
    page.locator("#slb-send").click()
    bot = page.locator('#slb-chatbot [data-testid="bot"]')
    expect(bot.last).to_contain_text("answered by", timeout=30_000)
    expect(bot.last).to_contain_text(VISION)
    sent = _chat_bodies(vision_app)[before:]
    assert len(sent) == 1 and sent[0]["model"] == VISION
    assert sent[0]["messages"][-1] == {"role": "user", "content": "What is in this picture?", "images": [IMAGE]}
    question = page.locator('#slb-chatbot [data-testid="user"]').last
    expect(question).to_contain_text("image attached: cat.png")
    expect(question.locator("img")).to_have_count(0)  # a note, not the picture
    expect(page.locator("#slb-attachment")).to_have_text("")  # sent: the next question has none
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui_images_sent.png"))

    # Regenerate sends the image again (the page remembers it; the chat stores only the note).
    page.locator("#slb-regenerate").click()
    # The click returns before the new question is sent: wait for the runtime to see it, then for the answer.
    again = wait_for_app(lambda: _chat_bodies(vision_app)[before + 1:] or None, 30, "the regenerated question")
    expect(page.locator("#slb-send")).to_have_text("Send", timeout=30_000)
    expect(bot.last).to_contain_text("answered by")
    assert len(again) == 1 and again[0]["messages"][-1]["images"] == [IMAGE]

    # Reopened from the list, the question still shows its note.
    page.locator("#slb-new-chat").click()
    expect(bot).to_have_count(0)
    page.locator("#slb-sessions").get_by_text("What is in this picture?").first.click()
    expect(page.locator('#slb-chatbot [data-testid="user"]').last).to_contain_text("image attached: cat.png")


def test_a_file_too_large_or_not_an_image_is_refused_clearly(page: Page, vision_app: RunningApp,
                                                               tmp_path: Path) -> None:
    large = tmp_path / "large.png"
    large.write_bytes(base64.b64decode(IMAGE) + bytes(600 * 1024))
    text = tmp_path / "notes.png"
    text.write_text("only words")
    _open(page, vision_app)
    _attach(page, large)
    expect(page.get_by_text("large.png is 600 KB; an image may be at most 512 KB")).to_be_visible()
    expect(page.locator("#slb-attachment")).to_have_text("")
    _attach(page, text)
    expect(page.get_by_text("notes.png is not a PNG, JPEG, GIF or WebP image")).to_be_visible()
    expect(page.locator("#slb-attachment")).to_have_text("")
    expect(page.locator("#slb-remove-image")).to_be_hidden()

"""Images for vision models through the cluster (docs/api.md "Images"), on the Ollama double: an image request
comes back as the runtime answered it directly, the image reaches the runtime in Ollama's own format, a model
without vision is refused in Ollama's words, and remote URLs and oversized images get a clear 400 / 413. With
``--allow-remote-images`` the app fetches a URL itself (a local HTTP server plays the remote site): redirects
checked, image types and the size limit enforced, loopback and private addresses refused unless allowed.

Real parts: Mosquitto, ``python -m app``, ``python -m agent --backend ollama`` on the double (``llava:7b`` takes
images, ``llama3.2:1b`` does not). One app for the module.
"""

from __future__ import annotations

import base64
import http.server
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import ollama
import pytest

from app.api_common import ApiError
from app.errors import AppError, BadRequest
from app.images import attachment_from_file, checked_images, fetch_image, fetched_images, vision_models
from app.model_list import ListedModel
from app.ui.chat import attach_button_update, vision_mode
from broker.mqtt.local_broker import RunningBroker
from broker.scheduling.availability import ModelAvailability, ModelHolder
from tests.app_support import RunningApp, start_agent, start_app, wait_for_app
from tests.ollama_double import OllamaDouble

BOX = {"description": "test box", "cpu_brand": "test CPU", "cpu_physical_cores": 8, "cpu_logical_cores": 8,
       "cpu_max_ghz": 3.0, "ram_total_gb": 32, "os": "Linux", "arch": "x86_64", "gpus": []}
VISION = "llava:7b"
PLAIN = "llama3.2:1b"
PIXEL = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                       "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"))
IMAGE = PIXEL.decode()


@pytest.fixture(scope="module")
def app(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    folder: Path = tmp_path_factory.mktemp("images")
    double = OllamaDouble(models=[PLAIN, VISION], tokens_per_s=0, vision_models={VISION}).start()
    running = start_app(folder, mosquitto, topic_prefix=f"slbtest/img{uuid.uuid4().hex[:8]}/v1",
                        extra=["--no-rag-warm-up"])
    running.double = double
    try:
        start_agent(running, folder, "ollama", backend="ollama", backend_url=double.url, profile=BOX)

        def ready() -> bool:
            agent = next((agent for agent in running.status()["agents"] if agent["id"] == "ollama"), {})
            return agent.get("model_state") == "ready" and VISION in agent.get("available_models", {}) \
                and PLAIN in agent.get("available_models", {})

        wait_for_app(ready, 60, "the agent serving both models", running)
        yield running
    finally:
        running.stop()
        double.stop()


def runtime_bodies(app: RunningApp) -> list[dict[str, Any]]:
    assert app.double is not None
    return [body for method, path, body in app.double.stats.requests if path == "/api/chat"]


def test_an_ollama_image_question_is_answered_as_the_runtime_answers(app: RunningApp) -> None:
    messages = [{"role": "user", "content": "What is in this picture?", "images": [IMAGE]}]
    answer = ollama.Client(host=app.url, timeout=30).chat(model=VISION, messages=messages)
    assert app.double is not None
    direct = httpx.post(f"{app.double.url}/api/chat", json={"model": VISION, "messages": messages, "stream": False},
                        timeout=30).json()
    assert answer.message.content == direct["message"]["content"] and answer.message.content
    sent = runtime_bodies(app)[-2]  # the agent's request, before ours
    assert sent["messages"][-1]["images"] == [IMAGE]


def test_an_openai_image_part_reaches_the_runtime_as_ollama_images(app: RunningApp) -> None:
    body = {"model": VISION, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}}]}]}
    response = httpx.post(f"{app.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    sent = runtime_bodies(app)[-1]
    assert sent["messages"][-1] == {"role": "user", "content": "Describe it.", "images": [IMAGE]}
    assert app.double is not None
    direct = httpx.post(f"{app.double.url}/api/chat", json={**sent, "stream": False}, timeout=30).json()
    assert response.json()["choices"][0]["message"]["content"] == direct["message"]["content"]


def test_a_model_without_vision_refuses_images_in_ollamas_words(app: RunningApp) -> None:
    messages = [{"role": "user", "content": "What is this?", "images": [IMAGE]}]
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=app.url, timeout=30).chat(model=PLAIN, messages=messages)
    assert app.double is not None
    direct = httpx.post(f"{app.double.url}/api/chat", json={"model": PLAIN, "messages": messages, "stream": False},
                        timeout=30)
    assert direct.status_code == refused.value.status_code == 400
    assert refused.value.error == direct.json()["error"] == f"{PLAIN} does not support vision"


@pytest.mark.parametrize(("image_url", "status", "needle"), [
    ("https://example.com/cat.png", 400, "remote URL"),
    (f"data:image/png;base64,{base64.b64encode(bytes(600 * 1024)).decode()}", 413, "at most 524,288 bytes"),
    ("data:image/png;base64,not base64!", 400, "not valid base64"),
])
def test_remote_and_oversized_images_are_refused_clearly(app: RunningApp, image_url: str, status: int,
                                                         needle: str) -> None:
    body = {"model": VISION, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": image_url}}]}]}
    response = httpx.post(f"{app.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


# ---------------------------------------------------------------------- remote image URLs (--allow-remote-images)
# The app fetches them itself; here a local HTTP server (127.0.0.1 only) plays the remote site, so the loopback
# guard is switched off with allow_local=True except where the guard itself is tested.

PNG = base64.b64decode(PIXEL)


class _Site(http.server.BaseHTTPRequestHandler):
    """Pictures, a page, an oversized image, a redirect and a lying content type."""

    routes: dict[str, tuple[int, str, bytes, dict[str, str]]] = {
        "/pixel.png": (200, "image/png", PNG, {}),
        "/page.html": (200, "text/html", b"<html>not an image</html>", {}),
        "/big.png": (200, "image/png", PNG + bytes(600 * 1024), {}),
        "/liar.png": (200, "image/png", b"#!/bin/sh\necho not an image\n", {}),
        "/moved": (302, "text/plain", b"", {"Location": "/pixel.png"}),
        "/missing.png": (404, "text/plain", b"no", {}),
    }

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook
        status, media_type, body, headers = self.routes.get(self.path, (404, "text/plain", b"no", {}))
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_an_allowed_remote_image_is_fetched_by_the_app_redirects_included(site: str) -> None:
    groups = [[], [f"{site}/pixel.png", f"data:image/png;base64,{IMAGE}"], [f"{site}/moved"]]
    fetched = await fetched_images(groups, allow_remote=True, allow_local=True)
    assert fetched == [[], [IMAGE, f"data:image/png;base64,{IMAGE}"], [IMAGE]]
    assert checked_images(fetched, "messages") == [[], [IMAGE, IMAGE], [IMAGE]]


async def test_remote_urls_stay_refused_unless_the_setting_allows_them(site: str) -> None:
    groups = [[f"{site}/pixel.png"]]
    assert await fetched_images(groups, allow_remote=False, allow_local=True) == groups
    with pytest.raises(BadRequest, match="does not fetch images .*--allow-remote-images"):
        checked_images(groups, "messages")


async def test_loopback_and_private_addresses_are_refused_unless_local_fetches_are_allowed(site: str) -> None:
    for url in (f"{site}/pixel.png", f"http://localhost:{site.rsplit(':', 1)[1]}/pixel.png",
                "http://10.0.0.7/cat.png", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x.png"):
        with pytest.raises(BadRequest, match="private, loopback or local address"):
            await fetch_image(url, allow_local=False, param="messages[0]")


@pytest.mark.parametrize(("path", "error", "needle"), [
    ("/page.html", BadRequest, "is text/html, not a PNG, JPEG, GIF or WebP image"),
    ("/liar.png", BadRequest, "its bytes are not"),
    ("/big.png", ApiError, "over 524,288 bytes"),
    ("/missing.png", BadRequest, "answered HTTP 404"),
])
async def test_a_remote_url_that_is_no_image_within_the_limit_is_refused(site: str, path: str, error: type,
                                                                        needle: str) -> None:
    with pytest.raises(error, match=needle) as refused:
        await fetch_image(f"{site}{path}", allow_local=True, param="messages[0]")
    if error is ApiError:
        assert refused.value.http_status == 413


async def test_a_slow_remote_image_gives_up_after_the_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        started = time.monotonic()
        with pytest.raises(BadRequest, match="took over 0.5 s"):
            await fetch_image(f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png", allow_local=True,
                              param="messages[0]", timeout_s=0.5)
        assert time.monotonic() - started < 3
    finally:
        listener.close()


def test_the_app_refuses_a_remote_url_by_default_naming_the_setting(app: RunningApp, site: str) -> None:
    body = {"model": VISION, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": f"{site}/pixel.png"}}]}]}
    response = httpx.post(f"{app.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "--allow-remote-images" in response.json()["error"]["message"]


def test_an_attached_file_is_checked_by_its_bytes_and_size(tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(PNG)
    attached = attachment_from_file(picture)
    assert (attached.media_type, attached.size, attached.data) == ("image/png", len(PNG), IMAGE)
    assert attached.note() == f"[image attached: cat.png, {len(PNG)} bytes]"
    renamed = tmp_path / "notes.png"
    renamed.write_text("just text")
    with pytest.raises(BadRequest, match="notes.png is not a PNG, JPEG, GIF or WebP image"):
        attachment_from_file(renamed)
    large = tmp_path / "large.png"
    large.write_bytes(PNG + bytes(600 * 1024))
    with pytest.raises(ApiError, match="large.png is 600 KB; an image may be at most 512 KB"):
        attachment_from_file(large)


def _listed(name: str, state: str = "ready", tags: list[str] | None = None) -> ListedModel:
    holder = ModelHolder("box", name, state)
    return ListedModel(name, [holder], [], ModelAvailability(name, [holder], tags=tags or [],
                                                              in_catalog=tags is not None))


def test_the_chat_offers_images_only_with_a_vision_model_and_sends_them_to_one() -> None:
    plain = [_listed(PLAIN, tags=["tools"])]
    service = SimpleNamespace(models=lambda: plain)
    button = attach_button_update(service)  # type: ignore[arg-type]
    assert button["interactive"] is False and "no machine has a vision model" in button["label"]
    with pytest.raises(AppError, match="No machine has a vision model"):
        vision_mode("auto", plain)
    models = [*plain, _listed("moondream", "local"), _listed(VISION), _listed("gemma3:4b", "local", ["vision"])]
    assert vision_models(models) == ["moondream", VISION, "gemma3:4b"]
    service.models = lambda: models
    assert attach_button_update(service)["interactive"] is True  # type: ignore[arg-type]
    assert vision_mode("auto", models) == VISION  # the vision model most ready
    assert vision_mode("gemma3:4b", models) == "gemma3:4b"
    with pytest.raises(AppError, match=f"{re.escape(PLAIN)} does not take images: pick a vision model"):
        vision_mode(PLAIN, models)

"""Backend URLs with a login never show their password (issue 13.10).

``http://user:pass@host`` is shown as ``http://user:***@host`` wherever the
agent publishes or logs it, and in what the coordinator stores for ``/status``
and the cluster view; the login itself still reaches the runtime (as basic
auth). Real HTTP servers, a real agent process and real Mosquitto.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.backends.ollama_backend import OllamaBackend
from agent.backends.openai_backend import OpenAIBackend
from broker.mqtt.settings import MqttSettings
from broker.protocol import TopicKind
from broker.protocol.redaction import redact_url, redact_urls_in, split_credentials
from tests.ollama_double import OllamaDouble
from tests.test_agent_harness import Watcher, spawn_agent

LOGIN = ("admin", "s3cret-pw")


@pytest.mark.parametrize(("url", "shown"), [
    ("http://admin:s3cret@gpu-box:11434", "http://admin:***@gpu-box:11434"),
    ("https://admin:p%40ss@host/v1", "https://admin:***@host/v1"),
    ("http://token-only@host:8000", "http://***@host:8000"),
    ("http://host:8000/v1?api_key=abc&x=1", "http://host:8000/v1?api_key=***&x=1"),
    ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
    ("simulated://", "simulated://"),
    ("not a url", "not a url"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_urls_in_text_and_split_credentials() -> None:
    text = "backend unreachable at http://admin:s3cret@gpu-box:11434: [Errno 111] refused (http://b:c@d)"
    assert redact_urls_in(text) == "backend unreachable at http://admin:***@gpu-box:11434: [Errno 111] refused " \
                                   "(http://b:***@d)"
    assert split_credentials("http://admin:p%40ss@host:1/x") == ("http://host:1/x", ("admin", "p@ss"))
    assert split_credentials("http://host:1") == ("http://host:1", None)


class LoginServer:
    """A runtime behind basic auth: answers Ollama's and OpenAI's listing calls only with the right login."""

    def __init__(self) -> None:
        expected = "Basic " + base64.b64encode(":".join(LOGIN).encode()).decode()
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                seen.append(self.headers.get("Authorization"))
                bodies = {"/api/tags": {"models": []}, "/api/version": {"version": "0.5.0"},
                          "/v1/models": {"object": "list", "data": []}}
                ok = self.headers.get("Authorization") == expected and self.path in bodies
                data = json.dumps(bodies.get(self.path, {}) if ok else {"error": "unauthorized"}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def login_server() -> Iterator[LoginServer]:
    server = LoginServer()
    yield server
    server.close()


async def test_backends_show_the_url_redacted_and_still_send_the_login(login_server: LoginServer) -> None:
    url = f"http://{LOGIN[0]}:{LOGIN[1]}@{login_server.address}"
    for backend in (OllamaBackend(url), OpenAIBackend(url + "/v1")):
        assert backend.url == f"http://{LOGIN[0]}:***@{login_server.address}"
        health = await backend.health()
        assert health.reachable, health.error
    assert login_server.seen and all(header and header.startswith("Basic ") for header in login_server.seen)
    wrong = OpenAIBackend(f"http://{LOGIN[0]}:wrong-pw@{login_server.address}")
    health = await wrong.health()
    assert not health.reachable and "wrong-pw" not in (health.error or "")


def test_the_agent_publishes_and_logs_its_backend_url_without_the_password(
        mqtt_settings: MqttSettings, tmp_path: Path) -> None:
    watcher = Watcher(mqtt_settings, mqtt_settings.topic_prefix)
    with OllamaDouble() as double:
        host = double.url.removeprefix("http://")
        reachable = spawn_agent(mqtt_settings.broker_url, mqtt_settings.topic_prefix, "with-login", tmp_path / "a",
                                backend_url=f"http://{LOGIN[0]}:{LOGIN[1]}@{host}")
        unreachable = spawn_agent(mqtt_settings.broker_url, mqtt_settings.topic_prefix, "login-down",
                                  tmp_path / "b", backend_url=f"http://{LOGIN[0]}:{LOGIN[1]}@127.0.0.1:9")
        try:
            status = watcher.wait_for(TopicKind.STATUS, "with-login", lambda s: s.backend_reachable is True,
                                      timeout=20)
            assert status.backend_url == f"http://{LOGIN[0]}:***@{host}"
            down = watcher.wait_for(TopicKind.STATUS, "login-down", lambda s: s.backend_error is not None,
                                    timeout=20)
            assert down.backend_url == f"http://{LOGIN[0]}:***@127.0.0.1:9"
            raw = b"".join(message.payload for message in watcher.messages)
            assert LOGIN[1].encode() not in raw  # on the wire, not only after our own decoding
        finally:
            reachable.stop()
            unreachable.stop()
            watcher.close()
        for agent in (reachable, unreachable):
            log = agent.log(None)
            assert "127.0.0.1" in log and LOGIN[1] not in log, log[-3000:]

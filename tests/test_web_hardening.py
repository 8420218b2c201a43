"""The web process against floods and malformed input (issue 13: findings 5, 6, 8, 9 and 10, the app's part).

On the real ``python -m app`` of tests/app_fixtures.py (huge bodies, login and
API-key guessing), on the real app around a scripted coordinator in this
process (malformed JSON, unread Gradio results, redacted URLs) and in a child
process of its own (``/status`` polled while agents say a lot).
"""

from __future__ import annotations

import json
import logging
import re
import select
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.server import create_app
from app.settings import AppSettings
from broker.coordinator.contract import ModelAvailability, ModelHolder
from tests.app_scripted import ScriptedCoordinator, ServedApp, agent, answer, serve
from tests.app_support import UI_USER, RunningApp
from tests.support.processes import free_port, percentile, spawn, wait_until

pytest_plugins = ["tests.app_fixtures"]

pytestmark = pytest.mark.slow

MB = 1 << 20


def rss_bytes(pid: int) -> int:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found is not None
    return int(found.group(1)) * 1024


def send_large_body(url: str, path: str, total: int, *, declare_length: bool,
                    chunk: int = MB) -> tuple[int | None, bytes, int, float]:
    """POST ``total`` bytes of JSON to ``path``, streamed, stopping as soon as the server answers.

    Returns the status (None if none came), the response bytes, the body bytes sent and the seconds taken.
    """
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += f"Content-Length: {total}\r\n\r\n" if declare_length else "Transfer-Encoding: chunked\r\n\r\n"
    prefix, suffix = b'{"data": ["', b'", "auto", "consensus", false]}'
    started = time.monotonic()
    sent = 0
    answered = False
    sock.sendall(head.encode())
    sock.settimeout(5)

    def pieces() -> Iterator[bytes]:
        yield prefix
        left = total - len(prefix) - len(suffix)
        while left > 0:
            size = min(chunk, left)
            yield b"x" * size
            left -= size
        yield suffix

    try:
        for piece in pieces():
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            data = piece if declare_length else f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            sock.sendall(data)
            sent += len(piece)
        if not answered and not declare_length:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading: its answer is waiting
    response = b""
    sock.settimeout(30)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            response += data
            if b"\r\n\r\n" in response and _complete(response):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    found = re.match(rb"HTTP/1\.1 (\d{3})", response)
    return (int(found.group(1)) if found else None), response, sent, time.monotonic() - started


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


# ---------------------------------------------------------------------------- 13.5 body limits


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
def test_a_200_mb_body_to_the_gradio_api_is_refused_fast_without_the_app_growing(app_cluster: RunningApp,
                                                                                 declare_length: bool) -> None:
    pid = app_cluster.app.pid
    before = rss_bytes(pid)
    status, response, sent, seconds = send_large_body(app_cluster.url, "/gradio_api/call/query", 200 * MB,
                                                      declare_length=declare_length)
    time.sleep(0.5)
    grown = rss_bytes(pid) - before
    logging.getLogger(__name__).warning("200 MB to /gradio_api/call/query (%s): status %s after %.2f s, %d MB sent, "
                                        "app RSS %+d MB", "declared" if declare_length else "chunked", status,
                                        seconds, sent // MB, grown // MB)
    assert status == 413, response[:300]
    assert b"limit" in response
    assert seconds < 5
    assert sent < 60 * MB, "the body was read far past the limit"
    assert grown < 100 * MB, f"the app grew by {grown // MB} MB"
    assert httpx.get(f"{app_cluster.url}/health", timeout=10).status_code == 200


def test_every_route_has_a_body_limit_and_uploads_a_larger_one(tmp_path: Path) -> None:
    # API ~970 KB (the prompt plus room for images); Gradio ~270 KB; uploads ~2.6 MB
    settings = {"max_prompt_chars": 1000, "max_upload_mb": 0.1}
    with serve(ScriptedCoordinator(), tmp_path, **settings) as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            for path, size in (("/login", 2 * MB), ("/gradio_api/queue/join", MB), ("/gradio_api/call/health", MB),
                               ("/v1/chat/completions", 2 * MB), ("/api/chat", 2 * MB), ("/anything", 2 * MB)):
                response = client.post(path, content=b"x" * size, headers={"Content-Type": "application/json"})
                assert response.status_code == 413, (path, response.status_code, response.text[:200])
            upload = client.post("/gradio_api/upload", files=[("files", (f"doc{n}.txt", b"y" * 90_000, "text/plain"))
                                                              for n in range(8)])
            assert upload.status_code == 200, upload.text[:300]  # 720 KB in one request: over the JSON limit
            too_many = client.post("/gradio_api/upload", files=[("files", (f"d{n}.txt", b"y" * 90_000, "text/plain"))
                                                                for n in range(40)])
            assert too_many.status_code == 413


def _queue_entries(served: ServedApp) -> tuple[int, int]:
    """Sessions and messages Gradio's queue holds for results not yet fetched (read from Gradio's internals)."""
    mounted = next(route.app for route in served.server.config.app.routes  # type: ignore[attr-defined]
                   if hasattr(getattr(route, "app", None), "get_blocks"))
    queue = mounted.get_blocks()._queue
    messages = sum(entry.qsize() for entry in queue.pending_messages_per_session.values())
    return len(queue.pending_messages_per_session), messages


def test_unread_gradio_results_are_bounded_and_expire(tmp_path: Path) -> None:
    coordinator = ScriptedCoordinator(agents=[agent(f"agent-{n}", model="m", model_state="ready",
                                                    placement_reason="r" * 2000) for n in range(20)])
    with serve(coordinator, tmp_path, unread_result_ttl_s=10) as served:  # sweeps every 2.5 s
        with httpx.Client(base_url=served.url, timeout=30) as client:
            unread = client.post("/gradio_api/call/health", json={"data": []}).json()["event_id"]
            for _ in range(300):
                started = client.post("/gradio_api/call/status", json={"data": []})
                assert started.status_code == 200
            # a call still running at one sweep is counted by the next, so wait for a sweep after the last one ends
            wait_until(lambda: _queue_entries(served)[0] <= 256, 6, "the cap on unread results")
            sessions, messages = _queue_entries(served)
            logging.getLogger(__name__).warning("after 301 unread calls: %d sessions, %d messages held",
                                                sessions, messages)
            # the expiry drops a sweep's worth at once; only the cap leaves most of them in place
            assert sessions >= 200, "the cap dropped the oldest beyond 256, not everything"
            wait_until(lambda: _queue_entries(served)[1] == 0, 25, "unread results to expire")
            late = _read_events(client, f"/gradio_api/call/health/{unread}")
            assert "event: error" in late and "event: complete" not in late, late[:300]  # expired
            fresh = client.post("/gradio_api/call/health", json={"data": []}).json()["event_id"]
            read = client.get(f"/gradio_api/call/health/{fresh}")
            assert "event: complete" in read.text, read.text[:300]


def _read_events(client: httpx.Client, path: str) -> str:
    """A Gradio result stream's text; Gradio ends the stream of an unknown session abruptly after its error."""
    text = ""
    try:
        with client.stream("GET", path) as response:
            for piece in response.iter_text():
                text += piece
    except httpx.RemoteProtocolError:
        pass
    return text


# ---------------------------------------------------------------------------- 13.8 guessing


def test_login_guesses_are_throttled_and_the_right_password_works_after_the_window(bare_app: RunningApp) -> None:
    right = {"username": UI_USER[0], "password": UI_USER[1]}
    with httpx.Client(base_url=bare_app.url, timeout=30) as client:
        statuses = [client.post("/login", data={"username": UI_USER[0], "password": f"guess-{n}"}).status_code
                    for n in range(50)]
        checked = sum(1 for status in statuses if status in (400, 401))
        logging.getLogger(__name__).warning("50 wrong logins: %d checked, %d refused with 429", checked,
                                            statuses.count(429))
        assert statuses.count(429) >= 40 and checked <= 10, statuses
        other_user = client.post("/login", data={"username": "someone-else", "password": "x"})
        assert other_user.status_code == 429, "the address is locked for every user name"
        locked = client.post("/login", data=right)
        assert locked.status_code == 429, "while locked even the right password is not checked"
        wait = float(locked.headers["retry-after"])
        assert 0 < wait <= 300
        time.sleep(wait + 0.2)
        assert client.post("/login", data=right).status_code == 200
        assert client.get("/config").status_code == 200
        assert client.post("/login", data={"username": UI_USER[0], "password": "one-more-slip"}).status_code == 400


def test_api_key_guesses_are_throttled_and_the_right_key_works_after_the_window(app_cluster: RunningApp) -> None:
    with httpx.Client(base_url=app_cluster.url, timeout=30) as client:
        statuses = [client.get("/v1/models", headers={"Authorization": f"Bearer guess-{n}"}).status_code
                    for n in range(50)]
        logging.getLogger(__name__).warning("50 wrong API keys: %d checked (401), %d refused (429)",
                                            statuses.count(401), statuses.count(429))
        assert statuses.count(429) >= 35 and statuses.count(401) <= 15, statuses
        locked = client.get("/api/tags", headers=app_cluster.headers)
        assert locked.status_code == 429 and "try again" in locked.json()["error"]
        wait = float(locked.headers["retry-after"])
        time.sleep(wait + 0.2)
        assert client.get("/v1/models", headers=app_cluster.headers).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer one-slip"}).status_code == 401


# ---------------------------------------------------------------------------- 13.9 malformed JSON


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    coordinator = ScriptedCoordinator(agents=[agent("desk", model="m", model_state="ready")],
                                      available=[ModelAvailability("m", [ModelHolder("desk", "m", "ready")])])
    coordinator.script = lambda request: answer(request, "desk", "m", ["fine"])
    with serve(coordinator, tmp_path_factory.mktemp("scripted")) as served:
        yield served


DEEP = "[" * 100_000 + "]" * 100_000
MALFORMED = [  # (case, the content as JSON text, more JSON fields, a word the error names)
    ("deep nesting", '"hi"', f', "x": {DEEP}', "nested"),
    ("nesting just past the limit", '"hi"', ', "x": ' + "[" * 40 + "]" * 40, "nested"),
    ("lone surrogate", '"\\ud800"', "", "surrogate"),
    ("lone surrogate in a key", '"hi"', ', "\\udfff": 1', "surrogate"),
    ("NaN option", '"hi"', ', "options": {"temperature": NaN}', "NaN"),
    ("1e400 option", '"hi"', ', "options": {"num_ctx": 1e400}', "range"),
    ("-Infinity option", '"hi"', ', "options": {"top_p": -Infinity}', "Infinity"),
    ("huge integer", '"hi"', ', "options": {"seed": ' + "9" * 5000 + "}", "JSON"),
]


def malformed_body(path: str, content: str, extra: str) -> str:
    if path == "/api/generate":
        return f'{{"model": "auto", "stream": false, "prompt": {content}{extra}}}'
    return f'{{"model": "auto", "stream": false, "messages": [{{"role": "user", "content": {content}}}]{extra}}}'


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
@pytest.mark.parametrize(("case", "content", "extra", "needle"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_json_is_a_clear_400_never_a_500(scripted: ServedApp, path: str, case: str, content: str,
                                                   extra: str, needle: str) -> None:
    response = httpx.post(f"{scripted.url}{path}", content=malformed_body(path, content, extra),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400, (case, response.status_code, response.text[:300])
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert needle.lower() in message.lower(), (case, message)


def test_the_gradio_api_refuses_malformed_input_with_a_clear_error(scripted: ServedApp) -> None:
    with httpx.Client(base_url=scripted.url, timeout=30) as client:
        deep = client.post("/gradio_api/call/query", content='{"data": ' + "[" * 100_000 + "]" * 100_000 + "}",
                           headers={"Content-Type": "application/json"})
        assert deep.status_code in (400, 422), deep.text[:200]
        for data, needle in ((['"\\ud800"', '"auto"', '"consensus"', "false"], "surrogate"),
                             (['"hi"', '"auto"', '"consensus"', "false"], None)):
            started = client.post("/gradio_api/call/query", content='{"data": [' + ", ".join(data) + "]}",
                                  headers={"Content-Type": "application/json"})
            assert started.status_code == 200, started.text[:200]
            result = client.get(f"/gradio_api/call/query/{started.json()['event_id']}").text
            if needle is None:
                assert "event: complete" in result, result[:300]
            else:
                assert "event: error" in result and needle in result, result[:300]
        nan = client.post("/gradio_api/call/rag_search", content='{"data": ["herons", Infinity]}',
                          headers={"Content-Type": "application/json"})
        if nan.status_code == 200:
            result = client.get(f"/gradio_api/call/rag_search/{nan.json()['event_id']}").text
            assert "event: error" in result and "whole number" in result, result[:300]
        else:
            assert nan.status_code in (400, 422)


# ---------------------------------------------------------------------------- 13.6 /status stays cheap


@pytest.fixture(scope="module")
def heavy_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("heavy")
    port = free_port()
    child = spawn("heavy-app", ["-m", "tests.app_heavy", "--port", str(port), "--data-dir", str(folder / "data")],
                  folder)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 90, "the heavy app to start",
                   lambda: child.log(3000), ignore=(httpx.HTTPError,))
        yield url
    finally:
        child.stop()


def test_health_stays_fast_while_eight_clients_poll_a_heavy_status(heavy_app: str) -> None:
    quiet = [_timed_get(f"{heavy_app}/health") for _ in range(20)]
    status = httpx.get(f"{heavy_app}/status", timeout=120)
    assert status.status_code == 200
    size = len(status.content)
    body = status.json()
    stop = threading.Event()
    polls: list[float] = []

    def poll() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(f"{heavy_app}/status").read()
                polls.append(time.perf_counter() - started)

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(8)]
    for thread in pollers:
        thread.start()
    time.sleep(1.0)
    loaded = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        loaded.append(_timed_get(f"{heavy_app}/health"))
        time.sleep(0.05)
    stop.set()
    for thread in pollers:
        thread.join(timeout=180)
    logging.getLogger(__name__).warning(
        "/status %d KB; /health p50 %.3f s quiet, p50 %.3f / p95 %.3f / max %.3f s under 8 pollers "
        "(%d polls, p50 %.3f s)", size // 1024, statistics.median(quiet), statistics.median(loaded),
        percentile(loaded, 0.95), max(loaded), len(polls), statistics.median(polls) if polls else -1)
    assert size < 4 * MB, f"/status is {size // 1024} KB"
    assert percentile(loaded, 0.95) < 0.5 and max(loaded) < 1.5
    agent_entry = body["agents"][0]
    assert "secret-0" not in status.text, "backend URL credentials are on the open /status"
    assert len(agent_entry["hardware"]["gpus"]) <= 33
    assert body.get("agents_omitted", 0) + len(body["agents"]) == body["total_clients"]


def _timed_get(url: str) -> float:
    started = time.perf_counter()
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200
    return time.perf_counter() - started


# ---------------------------------------------------------------------------- 13.10 the app's part


def test_an_api_key_without_a_ui_login_warns_that_the_gradio_api_is_open(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.server")
    create_app(AppSettings(data_dir=tmp_path, rag_warm_up=False, api_key="k"), coordinator=ScriptedCoordinator())
    assert "/gradio_api" in caplog.text and "ui-username" in caplog.text
    caplog.clear()
    create_app(AppSettings(data_dir=tmp_path, rag_warm_up=False, api_key="k", ui_username="me", ui_password="pw"),
               coordinator=ScriptedCoordinator())
    assert "/gradio_api" not in caplog.text


def test_backend_urls_are_shown_redacted_everywhere_the_app_shows_them(tmp_path: Path) -> None:
    url = "http://admin:hunter2@10.0.0.5:8080/v1?api_key=sk-live-123"
    coordinator = ScriptedCoordinator(agents=[agent(
        "laptop", model="m", model_state="ready", backend="openai", backend_url=url, backend_reachable=False,
        backend_error=f"cannot connect to {url}: refused", runtime={"kind": "llama.cpp", "health_check": url})])
    with serve(coordinator, tmp_path) as served:
        shown: dict[str, Any] = {
            "/status": httpx.get(f"{served.url}/status", timeout=30).text,
            "/health": httpx.get(f"{served.url}/health", timeout=30).text,
        }
        for api in ("status", "health"):
            started = httpx.post(f"{served.url}/gradio_api/call/{api}", json={"data": []}, timeout=30).json()
            shown[api] = httpx.get(f"{served.url}/gradio_api/call/{api}/{started['event_id']}", timeout=30).text
    for where, text in shown.items():
        assert "hunter2" not in text and "sk-live-123" not in text, (where, text[:500])
    assert "admin:***@10.0.0.5:8080" in json.loads(shown["/status"])["agents"][0]["backend_url"]

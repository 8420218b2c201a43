"""The web process under hostile clients (issue 8.9), on the running apps of tests/app_fixtures.py.

Beyond tests/test_http_api.py and tests/test_gradio_api.py: file paths a
client names instead of uploading (absolute, ``..``, the app's own data),
upload limits at the raw upload route, the API key on every route and
method, the UI login on every Gradio route, cross-site "simple" POSTs, type
and size checks with a clear 4xx, CORS when listening beyond loopback, and
the Gradio version against the published advisories.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import gradio
import httpx
import pytest
from fastapi.testclient import TestClient

from app.server import create_app
from app.settings import AppSettings
from broker.coordinator.contract import ClusterSnapshot, LoadedModel, ModelAvailability
from tests.app_support import UI_USER, RunningApp

pytest_plugins = ["tests.app_fixtures"]

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GRADIO_ADVISORIES = {
    # advisory: first fixed version (from the GitHub advisory database and PyPA, checked 2026-11)
    "CVE-2026-27167": (6, 6, 0),
    "CVE-2026-28415": (6, 6, 0),
    "CVE-2026-28416": (6, 6, 0),
    "CVE-2026-28414 (absolute path traversal, Windows)": (6, 7, 0),
    "GHSA-j36p-7w88-g82j (FileExplorer path traversal)": (6, 16, 0),
}


def version_tuple(text: str) -> tuple[int, int, int]:
    parts = [int(part) for part in text.strip().split(".")[:3] if part.isdigit()]
    return (*parts, 0, 0, 0)[:3]  # type: ignore[return-value]


def gradio_call(client: httpx.Client, api: str, data: list[Any]) -> tuple[str, Any]:
    """Call a Gradio API route the way any HTTP client can; returns (``complete`` or ``error``, payload)."""
    started = client.post(f"/gradio_api/call/{api}", json={"data": data})
    assert started.status_code == 200, started.text
    stream = client.get(f"/gradio_api/call/{api}/{started.json()['event_id']}", timeout=120)
    event, payload = "", None
    for line in stream.text.splitlines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ").strip()
        elif line.startswith("data: ") and event in ("complete", "error"):
            payload = json.loads(line.removeprefix("data: "))
            if event == "complete":
                payload = payload[0]
    return event, payload


def file_data(path: str, name: str = "notes.txt") -> dict[str, Any]:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def document_names(client: httpx.Client) -> set[str]:
    event, documents = gradio_call(client, "rag_list", [])
    assert event == "complete", documents
    return {document["name"] for document in documents}


def queries_total(app: RunningApp) -> float:
    total = 0.0
    for line in httpx.get(f"{app.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("slb_queries_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture()
def web(app_cluster: RunningApp) -> httpx.Client:
    with httpx.Client(base_url=app_cluster.url, timeout=60) as client:
        yield client


@pytest.fixture()
def logged_in(bare_app: RunningApp) -> httpx.Client:
    with httpx.Client(base_url=bare_app.url, timeout=60) as client:
        response = client.post("/login", data={"username": UI_USER[0], "password": UI_USER[1]})
        assert response.status_code == 200, response.text
        yield client


# ---------------------------------------------------------------------------- files


def test_files_a_client_names_instead_of_uploading_are_refused(web: httpx.Client, app_cluster: RunningApp,
                                                               tmp_path: Path) -> None:
    secret = tmp_path / "secret-notes.txt"
    secret.write_text("zqxsecret the server's private notes")
    before = document_names(web)
    for path in (str(secret), str(ROOT / "docs" / "security.md"), "docs/api.md",
                 f"/tmp/gradio/../../{secret.relative_to('/')}", str(app_cluster.data_dir / "sessions.sqlite3.txt")):
        event, error = gradio_call(web, "rag_add", [[file_data(path)], "", ""])
        assert event == "error" and "not uploaded" in error["error"], (path, error)
    assert document_names(web) == before
    event, hits = gradio_call(web, "rag_search", ["zqxsecret private notes", 5])
    assert event == "complete" and all("zqxsecret" not in hit["text"] for hit in hits)
    for path in (str(secret), str(app_cluster.data_dir / "sessions.sqlite3"), str(ROOT / "README.md"),
                 "../../../../etc/hostname"):
        assert web.get(f"/gradio_api/file={path}").status_code in (403, 404), path


def test_uploaded_names_are_reduced_to_base_names(web: httpx.Client, tmp_path: Path) -> None:
    marker = f"travelled-{time.monotonic_ns()}.txt"
    uploaded = web.post("/gradio_api/upload", files={"files": (f"../../../../{tmp_path.relative_to('/')}/{marker}",
                                                                b"Notes about the heron colony at Lake Varn.",
                                                                "text/plain")})
    assert uploaded.status_code == 200, uploaded.text
    (stored,) = uploaded.json()
    assert Path(stored).name == marker and not (tmp_path / marker).exists()
    event, added = gradio_call(web, "rag_add", [[file_data(stored, f"../../etc/{marker}")], "", ""])
    assert event == "complete" and added["names"] == [marker], added
    for name, expected in (("../../etc/cron.d/evil.md", "evil.md"), ("/etc/absolute.md", "absolute.md"),
                           ("C:\\Users\\me\\windows.md", "windows.md")):
        event, added = gradio_call(web, "rag_add", [None, f"Text for {expected} {time.monotonic_ns()}", name])
        assert event == "complete" and added["names"] == [expected], added
    for name in ("..", "/", "../"):
        event, error = gradio_call(web, "rag_add", [None, "text", name])
        assert event == "error" and "name" in error["error"], error


def test_uploads_over_the_limit_are_refused_at_the_upload_route(logged_in: httpx.Client) -> None:
    big = logged_in.post("/gradio_api/upload", files={"files": ("big.txt", b"x" * 60_000, "text/plain")})
    assert big.status_code == 413 and "size" in big.text.lower()
    small = logged_in.post("/gradio_api/upload", files={"files": ("small.txt", b"x" * 1000, "text/plain")})
    assert small.status_code == 200


# ---------------------------------------------------------------------------- authentication


def test_ui_login_is_enforced_on_every_gradio_route(bare_app: RunningApp) -> None:
    with httpx.Client(base_url=bare_app.url, timeout=30) as anonymous:
        for path in ("/config", "/gradio_api/info", "/gradio_api/file=/etc/hostname"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.post("/gradio_api/call/health", json={"data": []}).status_code == 401
        assert anonymous.post("/gradio_api/upload", files={"files": ("a.txt", b"x", "text/plain")}).status_code == 401
        wrong = anonymous.post("/login", data={"username": UI_USER[0], "password": "not-it"})
        assert wrong.status_code in (400, 401)
        assert anonymous.get("/config").status_code == 401
        assert anonymous.get("/health").status_code == 200  # the plain health check stays open, by design
        right = anonymous.post("/login", data={"username": UI_USER[0], "password": UI_USER[1]})
        assert right.status_code == 200
        assert anonymous.get("/config").status_code == 200
        event, health = gradio_call(anonymous, "health", [])
        assert event == "complete" and health["healthy"] is False


REQUESTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("POST", "/api/show", {"model": "auto"}),
    ("POST", "/api/chat", {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("POST", "/api/generate", {"model": "auto", "prompt": "hi", "stream": False}),
    ("POST", "/api/pull", {"model": "qwen2.5:0.5b"}),
    ("DELETE", "/api/delete", {"model": "qwen2.5:0.5b"}),
    ("POST", "/api/create", {"model": "mine"}),  # the catch-alls too: no route under /api or /v1 skips the key
    ("GET", "/api/no-such-route", None),
    ("POST", "/v1/completions", {"model": "auto", "prompt": "hi"}),
    ("GET", "/v1/models/auto", None),
]


def test_api_key_is_enforced_on_every_route_and_method(app_cluster: RunningApp) -> None:
    before = queries_total(app_cluster)
    with httpx.Client(base_url=app_cluster.url, timeout=60) as client:
        for method, path, body in REQUESTS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {app_cluster.api_key}"},
                            {"X-API-Key": "wrong"}, {"Authorization": "Bearer x"}):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers.get("www-authenticate") == "Bearer"
            # A right key clears this address's wrong-key count, which after 10 in a row would be 429s (13.8).
            assert client.get("/api/version", headers=app_cluster.headers).status_code == 200
        assert queries_total(app_cluster) == before, "an unauthenticated request reached the cluster"
        assert client.get("/v1/models", headers={"X-API-Key": app_cluster.api_key or ""}).status_code == 200


def test_cross_site_simple_posts_are_refused(app_cluster: RunningApp) -> None:
    """A page elsewhere can POST text/plain without a preflight; CORS alone would let it run queries."""
    key = {"Authorization": f"Bearer {app_cluster.api_key}"}
    body = json.dumps({"model": "auto", "prompt": "from a web page", "stream": False})
    before = queries_total(app_cluster)
    with httpx.Client(base_url=app_cluster.url, timeout=60) as client:
        for origin in ("http://evil.example", "null", "http://192.168.1.66:7860"):
            for path in ("/api/generate", "/v1/chat/completions", "/api/pull"):
                response = client.post(path, content=body, headers={**key, "Origin": origin,
                                                                      "Content-Type": "text/plain"})
                assert response.status_code == 403 and "origin" in response.text.lower(), (origin, response.text)
        assert queries_total(app_cluster) == before
        for origin in ("http://localhost:5173", app_cluster.url):  # loopback pages and this app's own pages
            response = client.post("/api/generate", content=body, headers={**key, "Origin": origin})
            assert response.status_code == 200, (origin, response.text)


# ---------------------------------------------------------------------------- validation


BAD_REQUESTS = [
    ("/api/generate", {"model": "auto", "prompt": "x" * 100_001}, "limit"),
    ("/api/generate", {"model": "auto", "prompt": "x" * 60_000, "system": "y" * 60_000}, "limit"),
    ("/api/generate", {"model": "auto", "prompt": "hi", "images": ["aGk="]}, "image"),  # base64 of "hi": no image
    ("/api/generate", {"model": "auto", "prompt": 42}, "prompt"),
    ("/api/generate", {"model": "", "prompt": "hi"}, "model"),
    ("/api/chat", {"model": "auto", "messages": "hello"}, "messages"),
    ("/api/chat", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": "many"}},
     "num_predict"),
    ("/api/chat", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": [1]}, "stream"),
    ("/api/chat", {"model": "auto", "messages": [{"role": "user", "content": "x"}] * 501}, "too many messages"),
    ("/api/chat", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "options": {"stop": [1, 2]}},
     "stop"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     "max_tokens"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
     "temperature"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 9},
     "stop"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "allow-remote-images"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x"}] * 501},
     "too many messages"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x" * 100_001}]}, "limit"),
]


@pytest.mark.parametrize(("path", "body", "needle"), BAD_REQUESTS)
def test_prompts_and_parameters_are_validated_with_a_clear_400(app_cluster: RunningApp, path: str,
                                                               body: dict[str, Any], needle: str) -> None:
    response = httpx.post(f"{app_cluster.url}{path}", json=body, headers=app_cluster.headers, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert needle in message, message


def test_script_api_says_which_argument_is_wrong(web: httpx.Client) -> None:
    checks = [
        ("query", [123, "auto", "consensus", False], "prompt must be text"),
        ("query", ["hi", 456, "consensus", False], "mode must be text"),
        ("query", ["hi", "auto", "bogus", False], "aggregation"),
        ("query", ["hi", "auto", "consensus", "yes"], "use_rag"),
        ("query", ["x" * 100_001, "auto", "consensus", False], "limit"),
        ("chat", ["hi", 7, "auto", "consensus", False], "session_id must be text"),
        ("rag_search", ["herons", "many"], "k must be a whole number"),
        ("rag_search", ["herons", 1000], "k must be"),
        ("session_rename", ["no-such-session", "x" * 500], "limit"),
    ]
    for api, data, needle in checks:
        event, error = gradio_call(web, api, data)
        assert event == "error" and needle in (error or {}).get("error", ""), (api, data, error)


# ---------------------------------------------------------------------------- CORS and versions


class _IdleCoordinator:
    """Enough of a coordinator to build the app without a broker."""

    metrics = None

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(agents=[], ready_models=[], connected=False, generated_at=time.time())

    def model_names(self) -> list[str]:
        return []

    def models(self) -> list[ModelAvailability]:
        return []

    def loaded_models(self) -> list[LoadedModel]:
        return []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def test_no_cors_for_every_origin_when_listening_beyond_loopback(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.server")
    app = create_app(AppSettings(host="0.0.0.0", data_dir=tmp_path, rag_warm_up=False,
                                 cors_origins=["https://chat.example.org"]), coordinator=_IdleCoordinator())
    assert "without an API key" in caplog.text and "without a UI login" in caplog.text
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with TestClient(app) as client:
        for path in ("/v1/chat/completions", "/api/chat", "/gradio_api/info", "/gradio_api/upload", "/config"):
            for origin in ("http://evil.example", "http://192.168.1.50:7860", "null"):
                response = client.options(path, headers={"Origin": origin, **preflight})
                assert response.headers.get("access-control-allow-origin") is None, (path, origin)
                assert client.get(path, headers={"Origin": origin}).headers.get("access-control-allow-origin") \
                    is None
            for origin in ("http://localhost:3000", "https://chat.example.org"):
                response = client.options(path, headers={"Origin": origin, **preflight})
                assert response.headers.get("access-control-allow-origin") == origin, (path, origin)
                assert response.headers.get("access-control-allow-credentials") is None
    with pytest.raises(ValueError, match="wildcard"):
        AppSettings(host="0.0.0.0", cors_origins=["*"])


def test_gradio_is_at_a_version_with_the_known_advisories_fixed() -> None:
    installed = version_tuple(gradio.__version__)
    for advisory, fixed in GRADIO_ADVISORIES.items():
        assert installed >= fixed, f"gradio {gradio.__version__} is affected by {advisory} (fixed in {fixed})"
    floor = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("gradio"))
    minimum = version_tuple(floor.split(">=")[1].split(",")[0])
    assert minimum >= max(GRADIO_ADVISORIES.values()), f"requirements.txt still allows vulnerable versions: {floor}"

"""Plain ASGI middleware of the web process: HTTP metrics, request-body limits, login back-off, page headers.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streamed answers (SSE,
NDJSON, Gradio's event stream) pass through untouched and a client
disconnect still reaches the endpoint, which then cancels the query.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request

from app.throttle import FailureThrottle, retry_after_header

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_PREFIXES = ("/v1/", "/api/")
_KNOWN_ROUTES = (
    "/health",
    "/status",
    "/metrics",
    "/v1/chat/completions",
    "/v1/models",
    "/api/chat",
    "/api/generate",
    "/api/tags",
    "/api/version",
    "/api/show",
    "/api/ps",
)


class HttpMetrics:
    """Request counters and latencies of the web process, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "slb_http_requests",
            "HTTP requests answered by the web process, by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "slb_http_request_seconds",
            "Time until an HTTP response is complete (streams: until the last byte).",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "slb_http_requests_in_flight", "HTTP requests being answered now.", registry=self.registry
        )
        self.ui_streams = Gauge(
            "slb_ui_answers_streaming", "Chat answers streaming to browsers now.", registry=self.registry
        )


def route_label(path: str) -> str:
    """A bounded label for a path: the API routes by name, everything else (Gradio, files) grouped."""
    if path in _KNOWN_ROUTES:
        return path
    if path.startswith("/gradio_api/"):
        return "/gradio_api"
    if path.startswith(API_PREFIXES):
        return "/api/other" if path.startswith("/api/") else "/v1/other"
    return "/ui"


class MetricsMiddleware:
    """Count every HTTP request by route and status and time it to the end of its body."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope.get("path", ""))
        method = scope.get("method", "GET")
        status = {"code": 500}
        started = time.perf_counter()

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BodyTooLarge(Exception):
    """Raised into the app when a request body passes its limit; the middleware answers 413 instead."""


@dataclass(frozen=True)
class BodyLimits:
    """The largest request body per route family, in bytes (issue 13.5: every route has one)."""

    api: int
    """``/v1/*`` and ``/api/*``: a prompt of ``--max-prompt-chars`` with JSON's overhead."""
    gradio: int
    """``/gradio_api/*`` except uploads: a chat turn carries the chat so far, and pasted text may be a document."""
    upload: int
    """``/gradio_api/upload``: several files of ``--max-upload-mb`` in one request (Gradio limits each file)."""
    other: int = 1 << 20
    """Everything else (the login form, the page): small."""

    def for_path(self, path: str) -> int:
        if path.startswith(API_PREFIXES):
            return self.api
        if path.startswith("/gradio_api/upload"):
            return self.upload
        if path.startswith("/gradio_api/"):
            return self.gradio
        return self.other


class BodyLimitMiddleware:
    """Refuse request bodies over their route's limit with a 413, without holding them in memory.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read. Otherwise the
    body streams through to the app, counted; the moment it passes the limit the app's next read raises
    :class:`BodyTooLarge`, whatever it was about to answer is dropped, and the client gets the 413.
    """

    def __init__(self, app: ASGIApp, limits: BodyLimits | int) -> None:
        self.app = app
        self.limits = limits if isinstance(limits, BodyLimits) else BodyLimits(limits, limits, limits, limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope.get("path", ""))
        if _declared_length(scope) > limit:
            await self._refuse(scope, send, limit)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(f"request body over {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a body cut off by the limit: the 413 below replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
            # BodyTooLarge, or whatever the app (Gradio's own error middleware) made of it: answered below.
        if exceeded and not started:
            await self._refuse(scope, send, limit)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        message = f"request body is larger than the limit of {limit} bytes"
        path = scope.get("path", "")
        if path.startswith("/v1/"):
            payload: dict[str, Any] = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "too_large"}
            }
        elif path.startswith("/api/"):
            payload = {"error": message}
        else:
            payload = {"detail": message}
        await send_json(send, 413, payload, [(b"connection", b"close")])


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1


async def send_json(send: Send, status: int, payload: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete JSON response from middleware."""
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                        *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": data})


def client_address(scope: Scope) -> str:
    """The TCP peer's address (never a forwarded header: anyone can send one)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class LoginThrottleMiddleware:
    """Back-off on Gradio's ``POST /login`` per client address and per user name (issue 13.8).

    While either is locked the request is answered 429 with ``Retry-After`` before Gradio compares the
    password; otherwise Gradio's answer decides: 200 clears both, 400 or 401 counts a failure for both.
    """

    def __init__(self, app: ASGIApp, throttle: FailureThrottle, paths: tuple[str, ...] = ("/login", "/login/")) -> None:
        self.app = app
        self.throttle = throttle
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        body, after = await _read_body(receive)
        username = await _form_field(scope, body, "username")
        keys = (f"address:{client_address(scope)}", f"user:{username.strip().casefold()}")
        wait = self.throttle.retry_after(*keys)
        if wait > 0:
            await send_json(send, 429, {"detail": f"too many failed logins; try again in {retry_after_header(wait)} s"},
                            [(b"retry-after", retry_after_header(wait).encode())])
            return
        status = {"code": 0}

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, _replay(body, after, receive), watching_send)
        if status["code"] == 200:
            self.throttle.succeeded(*keys)
        elif status["code"] in (400, 401, 403):
            lock = self.throttle.failed(*keys)
            if lock:
                logger.warning("login: %d s back-off for %s after repeated failures", lock, " and ".join(keys))


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole request body (bounded by :class:`BodyLimitMiddleware` outside), and a non-body message if one came."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body), message
        body.extend(message.get("body", b""))
        if not message.get("more_body", False):
            return bytes(body), None


def _replay(body: bytes, after: Message | None, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then whatever comes next."""
    pending: list[Message] = [after] if after is not None else [{"type": "http.request", "body": body,
                                                                  "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _form_field(scope: Scope, body: bytes, name: str) -> str:
    """One field of a form body (urlencoded or multipart), or "" when there is none."""

    async def once() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form(max_files=0, max_fields=20)
        value = form.get(name)
        await form.close()
    except Exception:  # noqa: BLE001 - a malformed form has no user name; Gradio answers it as it does today
        return ""
    return value if isinstance(value, str) else ""


PAGE_SECURITY_POLICY = (
    "img-src 'self' data: blob:; media-src 'self' data: blob:; form-action 'self'; frame-ancestors 'self'; "
    "base-uri 'self'; object-src 'none'"
)
"""The pages' Content-Security-Policy. Only what a page may load and where a form may post, nothing about
scripts and styles (Gradio needs its inline ones): if model text ever slipped an ``<img>`` or a ``<form>`` past
the rendering, the browser would still fetch nothing from elsewhere and post nowhere else."""


class SecurityHeadersMiddleware:
    """Adds :data:`PAGE_SECURITY_POLICY` to HTML pages and ``nosniff`` / ``Referrer-Policy`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                content_type = next((value for name, value in headers if name.lower() == b"content-type"), b"")
                if content_type.startswith(b"text/html") and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", PAGE_SECURITY_POLICY.encode()))
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if b"referrer-policy" not in names:
                    headers.append((b"referrer-policy", b"same-origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)

"""Plain ASGI middleware of the web process: HTTP metrics and request-body limits.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streamed answers (SSE,
NDJSON, Gradio's event stream) pass through untouched and a client
disconnect still reaches the endpoint, which then cancels the query.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class BodyLimitMiddleware:
    """Refuse API request bodies over ``max_bytes`` with a 413 before any endpoint parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int, prefixes: tuple[str, ...] = API_PREFIXES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(scope, send)
                    return
        body = bytearray()
        more = True
        first: Message | None = None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                first = message
                break
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, first
            if not replayed:
                replayed = True
                if first is not None:
                    held, first = first, None
                    return held
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        if scope.get("path", "").startswith("/v1/"):
            payload: dict[str, Any] = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "too_large"}
            }
        else:
            payload = {"error": message}
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})

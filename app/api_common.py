"""What the OpenAI- and Ollama-compatible routes share: errors, request checks, reading an answer's stream.

Every answer is an :class:`~app.answer_stream.AnswerStream` from
:meth:`AppService.ask <app.service.AppService.ask>`. A non-streamed response
reads it to its end (:func:`run_to_end`); a streamed one first reads until
the query is routed (:func:`read_until_routed`), so a failure before any text
is a proper HTTP status rather than a broken stream. Either way the record
comes from the stream: nothing here folds events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from app.answer_stream import AnswerStream
from app.answers import AnswerRecord, restart_dict, restart_note
from app.errors import AppError, BadRequest, refuse_lone_surrogates
from app.model_list import find_listed
from app.service import AppService
from app.settings import LOOPBACK_ORIGINS, AppSettings
from app.throttle import FailureThrottle, retry_after_header
from broker.coordinator.contract import (
    ROUTING_MODES,
    AnswerRestarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryStarted,
    RoutingMode,
    TextDelta,
)

logger = logging.getLogger(__name__)

OWNER = "smart-llm-balancer"
FAILURE_STATUS = {"no_agent": 503, "busy": 503, "timeout": 504, "cancelled": 499, "failed": 502, "truncated": 502,
                  "invalid_output": 502}
"""HTTP status of each ``QueryFailed.code``; ``bad_request`` becomes a :class:`~app.errors.BadRequest`."""
VIRTUAL_MODELS = {
    RoutingMode.AUTO.value: "the agent with the lowest expected completion time",
    RoutingMode.QUALITY.value: "the largest model ready in the cluster",
    RoutingMode.ALL.value: "every agent answers; the answers are combined",
}
"""The routing modes, listed as models by ``/v1/models`` and ``/api/tags``."""


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have (OpenAI's and Ollama's need 4)."""


class ApiError(AppError):
    """An error only the HTTP API has (a missing key, a refused origin, an unknown model), with its status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.http_status = status
        self.headers = headers or {}


ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
"""The methods a catch-all route answers, so no request under /v1 or /api gets FastAPI's own error shape."""


def served_routes(router: APIRouter) -> dict[str, set[str]]:
    """Every path of ``router`` (with its prefix) and its methods, for the "use X instead" of a catch-all."""
    served: dict[str, set[str]] = {}
    for route in router.routes:
        if isinstance(route, APIRoute):
            served.setdefault(route.path, set()).update(route.methods or ())
    return served


def wrong_method(path: str, method: str, served: dict[str, set[str]]) -> ApiError | None:
    """A 405 naming the right method when ``path`` is served with another one."""
    methods = served.get(path)
    if not methods or method in methods:
        return None
    allowed = " or ".join(sorted(methods - {"HEAD"}))
    return ApiError(405, f"{path} takes {allowed}, not {method}", "method_not_allowed")


def now_iso() -> str:
    return datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")


def validation_message(error: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, and the offending field."""
    problems: list[str] = []
    first_param: str | None = None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part not in ("body",)]
        where = ".".join(location) or "body"
        first_param = first_param or where
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems[:5]), first_param


def openai_error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def error_response(request: Request, status: int, message: str, code: str | None = None, param: str | None = None):
    """The error in the shape of the API the request was for."""
    if request.url.path.startswith("/v1/"):
        return openai_error(status, message, code, param)
    return ollama_error(status, message)


def restart_marker(event: AnswerRestarted) -> str:
    """The text a streamed answer gets where a failover started it over, so a client that shows the raw stream
    never presents two answers as one (docs/api.md, "Failover")."""
    return f"\n\n[{restart_note(event)}. The text above is void; the new answer follows.]\n\n"


def restart_event(event: AnswerRestarted) -> dict[str, Any]:
    """The ``slb`` object of the stream chunk (SSE) or line (NDJSON) that carries :func:`restart_marker`."""
    return {"event": "restart", **restart_dict(event), "marker": restart_marker(event)}


def check_total(settings_max_chars: int, max_messages: int, texts: list[str]) -> None:
    if len(texts) > max_messages:
        raise BadRequest(f"too many messages: {len(texts)}; the limit is {max_messages}", code="too_many_messages")
    total = sum(len(text) for text in texts)
    if total > settings_max_chars:
        raise BadRequest(
            f"the prompt has {total} characters; the limit is {settings_max_chars}",
            code="context_length_exceeded",
            param="messages",
        )


def provenance_headers(record: AnswerRecord) -> dict[str, str]:
    return {"X-SLB-Agents": ",".join(record.agents), "X-SLB-Models": ",".join(record.models)}


def unfinished_error(record: AnswerRecord) -> AppError:
    """The error a non-streamed answer that did not finish becomes."""
    if record.failed is None or record.stopped:  # no final event: the stream was stopped
        return ApiError(FAILURE_STATUS["cancelled"], "the query was stopped before it finished", "cancelled")
    return failure_error(record.failed)


def failure_error(failed: QueryFailed) -> AppError:
    """The error a failed query becomes; a ``bad_request`` failure is the app's BadRequest."""
    if failed.code == "bad_request":
        return BadRequest(failed.error, code=failed.code)
    return ApiError(FAILURE_STATUS.get(failed.code, 502), failed.error, failed.code)


async def run_to_end(stream: AnswerStream, request: Request) -> AnswerRecord:
    """Read the answer to its end and close it; stop it on the agents if the client goes away meanwhile."""

    async def consume() -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                logger.info("client went away; cancelling its query")
                task.cancel()
                break
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        if not task.done():  # this request itself was cancelled: the reader goes first, then the stream closes
            task.cancel()
            await asyncio.wait({task})
        await stream.aclose()
    return stream.record


@dataclass
class RoutedAnswer:
    """A streamed answer whose routing is known: the events read so far, then the rest of the stream."""

    head: list[QueryEvent]
    stream: AnswerStream

    async def events(self) -> AsyncIterator[QueryEvent]:
        for event in self.head:
            yield event
        async for event in self.stream:
            yield event


async def read_until_routed(stream: AnswerStream, *, past_start: bool = False) -> RoutedAnswer:
    """Read until the query is routed, so an early failure becomes a proper HTTP status instead of a broken stream.

    ``past_start``: read on to the first text or the end (a request with tools: a runtime's refusal of tools
    comes after routing, and the runtime itself answers it with a status, not a stream).

    On a failure the stream is closed here and the error raised; otherwise the response body that reads
    :meth:`RoutedAnswer.events` owns the stream and closes it.
    """
    head: list[QueryEvent] = []
    try:
        async for event in stream:
            head.append(event)
            if isinstance(event, TextDelta | QueryFinished | QueryFailed) or (
                    isinstance(event, QueryStarted) and not past_start):
                break
    except BaseException:
        await stream.aclose()
        raise
    failed = next((event for event in head if isinstance(event, QueryFailed)), None)
    if failed is not None:
        await stream.aclose()
        raise failure_error(failed)
    return RoutedAnswer(head, stream)


def _no_constant(name: str) -> Any:
    raise BadRequest(f"the request body has {name}, which is not a JSON number; send a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the number {text[:40]} in the request body is out of range")
    return value


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than ``max_depth`` and text that is not valid Unicode (a lone surrogate such as
    ``"\\ud800"``: JSON can spell it, UTF-8 cannot carry it to an agent)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            refuse_lone_surrogates("the request body", item)
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise BadRequest(f"the request body is nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    refuse_lone_surrogates("the request body", key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


async def json_body(request: Request) -> Any:
    """The request's JSON, or a clear 400 (FastAPI's own parsing would answer 422 with a different shape).

    Beyond JSON itself: no NaN or Infinity, no number beyond a float's range (``1e400``), no nesting deeper than
    :data:`MAX_JSON_DEPTH`, no lone surrogate; each would otherwise fail later, as a 500.
    """
    raw = await request.body()
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer with too many digits
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_json_value(body)
    return body


def supplied_key(headers: Any) -> str:
    """The API key a request carries: ``Authorization: Bearer <key>``, else ``X-API-Key``; "" when none."""
    header = headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        supplied = headers.get("x-api-key", "")
    return supplied


class ApiContext:
    """The service and settings every route needs, the API-key check and the model-name resolution."""

    def __init__(self, service: AppService) -> None:
        self.service = service
        self.settings: AppSettings = service.settings
        self.key_guesses = FailureThrottle(free_failures=10)
        """Back-off per client address after wrong API keys (issue 13.8)."""

    def origin_allowed(self, request: Request, origin: str) -> bool:
        """Loopback pages, the configured ``--cors-origins``, and pages served by this app itself."""
        if re.match(LOOPBACK_ORIGINS, origin) or origin in self.settings.cors_origins:
            return True
        hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
        return any(origin in (f"http://{host}", f"https://{host}") for host in hosts if host)

    async def require_api_key(self, request: Request) -> None:
        """FastAPI dependency of /v1 and /api: the browser origin, then the bearer key when one is configured.

        A page on another site can send a "simple" cross-origin POST (``text/plain`` body, no preflight) that
        CORS does not stop; the body is parsed as JSON regardless, so without this check any website a user
        visits could run queries on the cluster through the user's browser (found by
        tests/test_security_web.py). Tools (SDKs, curl, Open WebUI's server) send no ``Origin``.
        """
        origin = request.headers.get("origin")
        if origin is not None and not self.origin_allowed(request, origin):
            raise ApiError(403, f"requests from web pages at {origin} are not allowed; list the origin in "
                                "--cors-origins to allow them", "origin_not_allowed")
        if self.settings.api_key is None or not self.settings.api_key.get_secret_value():
            return
        self.check_key(supplied_key(request.headers), request.client.host if request.client else "unknown")

    def check_key(self, supplied: str, client_host: str) -> None:
        """Refuse a missing or wrong API key (401), with a back-off per client address after repeated wrong ones
        (429): shared by /v1, /api and the API user of the UI's API (app/key_user.py)."""
        key = self.settings.api_key.get_secret_value() if self.settings.api_key is not None else ""
        address = f"address:{client_host}"
        wait = self.key_guesses.retry_after(address)
        if wait > 0:  # refused before the key is compared: a guesser learns nothing while locked out
            seconds = retry_after_header(wait)
            raise ApiError(429, f"too many requests with a wrong API key from this address; try again in {seconds} s",
                           "rate_limited", headers={"Retry-After": seconds})
        if not key or not supplied or not secrets.compare_digest(supplied.strip().encode(), key.encode()):
            lock = self.key_guesses.failed(address)
            if lock:
                logger.warning("API key: %d s back-off for %s after repeated wrong keys", lock, address)
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        self.key_guesses.succeeded(address)

    def resolve_mode(self, model: str) -> str:
        """The routing mode for a requested model, matched the way runtimes spell names (``x`` = ``x:latest``, a
        GGUF file by its base name); models no machine has are a 404 like OpenAI's and Ollama's."""
        name = model.strip()
        if name in ROUTING_MODES:
            return name
        models = self.service.models()
        found = find_listed(name, models)
        if found is not None:
            return found.name
        choices = ", ".join([*ROUTING_MODES, *(listed.name for listed in models)])
        raise ApiError(404, f"model {name!r} is not served by this cluster; use one of: {choices}", "model_not_found")


"""What the OpenAI- and Ollama-compatible routes share: errors, request checks, provenance, streaming helpers.

Every answer goes through :class:`~app.service.AppService`; these helpers turn
its event stream into a complete record (non-streamed responses) or read it
until the query is routed (streamed ones), so a failure before any text is a
proper HTTP status rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.service import AnswerRecord, AppService, AskEvent, answer_dict
from app.settings import LOOPBACK_ORIGINS, AppSettings
from broker.coordinator.contract import ROUTING_MODES, QueryFailed, QueryFinished, QueryStarted, TextDelta

logger = logging.getLogger(__name__)

OWNER = "smart-llm-balancer"
FAILURE_STATUS = {"no_agent": 503, "busy": 503, "timeout": 504, "cancelled": 499, "bad_request": 400, "failed": 502}
VIRTUAL_MODELS = {
    "auto": "the agent with the lowest expected completion time",
    "quality": "the largest model ready in the cluster",
    "all": "every agent answers; the answers are combined",
}



class ApiError(Exception):
    """An error with an HTTP status, rendered in the protocol's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


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


def check_total(settings_max_chars: int, max_messages: int, texts: list[str]) -> None:
    if len(texts) > max_messages:
        raise ApiError(400, f"too many messages: {len(texts)}; the limit is {max_messages}", "too_many_messages")
    total = sum(len(text) for text in texts)
    if total > settings_max_chars:
        raise ApiError(
            400,
            f"the prompt has {total} characters; the limit is {settings_max_chars}",
            "context_length_exceeded",
            "messages",
        )


def stats_fields(record: AnswerRecord) -> dict[str, Any]:
    finished = record.finished
    stats = finished.stats if finished is not None else None
    return {
        "prompt_tokens": (stats.prompt_tokens if stats and stats.prompt_tokens is not None else 0),
        "output_tokens": (stats.output_tokens if stats and stats.output_tokens is not None else 0),
        "tokens_per_s": stats.tokens_per_s if stats else None,
        "ttft_s": stats.ttft_s if stats else None,
        "latency_s": finished.latency_s if finished else None,
    }


def provenance(record: AnswerRecord, service: AppService, mode: str) -> dict[str, Any]:
    """Who answered, for the ``slb`` field of responses."""
    simulated = {agent.id for agent in service.snapshot().agents if agent.simulated}
    finished = record.finished
    data: dict[str, Any] = {
        "mode": mode,
        "agents": record.agents,
        "models": record.models,
        "simulated_agents": sorted(set(record.agents) & simulated),
    }
    if finished is not None:
        data["failovers"] = finished.failovers
        data["latency_s"] = finished.latency_s
        if finished.answers:
            data["aggregation"] = finished.aggregation
            data["agreement"] = finished.agreement
            data["answers"] = [answer_dict(answer) for answer in finished.answers]
    return data


def provenance_headers(record: AnswerRecord) -> dict[str, str]:
    return {"X-SLB-Agents": ",".join(record.agents), "X-SLB-Models": ",".join(record.models)}


class PreparedStream:
    """A query whose routing is known (or which failed before any text), ready to stream."""

    def __init__(self, events: AsyncIterator[AskEvent], head: list[AskEvent], record: AnswerRecord) -> None:
        self.events = events
        self.head = head
        self.record = record

    async def all_events(self) -> AsyncIterator[AskEvent]:
        for event in self.head:
            yield event
        if self.head and isinstance(self.head[-1], QueryFinished | QueryFailed):
            return
        async for event in self.events:
            self.record.apply(event)
            yield event
            if isinstance(event, QueryFinished | QueryFailed):
                return

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.events.aclose()  # type: ignore[attr-defined]


async def prepare(events: AsyncIterator[AskEvent]) -> PreparedStream:
    """Read until the query is routed, so an early failure becomes a proper HTTP status instead of a broken stream."""
    record = AnswerRecord()
    head: list[AskEvent] = []
    try:
        async for event in events:
            record.apply(event)
            head.append(event)
            if isinstance(event, QueryStarted | TextDelta | QueryFinished | QueryFailed):
                break
    except BaseException:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
        raise
    return PreparedStream(events, head, record)


async def collect(events: AsyncIterator[AskEvent], request: Request) -> AnswerRecord:
    """Run a query to its end; stop it on the agents if the client goes away meanwhile."""
    record = AnswerRecord()

    async def consume() -> None:
        async for event in events:
            record.apply(event)
            if isinstance(event, QueryFinished | QueryFailed):
                break

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
        if not task.done():
            task.cancel()
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
    return record


def failure_error(failed: QueryFailed | None) -> ApiError:
    if failed is None:  # the stream ended without a final event: it was stopped
        return ApiError(FAILURE_STATUS["cancelled"], "the query was stopped before it finished", "cancelled")
    return ApiError(FAILURE_STATUS.get(failed.code, 502), failed.error, failed.code)


async def json_body(request: Request) -> Any:
    """The request's JSON, or a clear 400 (FastAPI's own parsing would answer 422 with a different shape)."""
    raw = await request.body()
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body



class ApiContext:
    """The service and settings every route needs, the API-key check and the model-name resolution."""

    def __init__(self, service: AppService) -> None:
        self.service = service
        self.settings: AppSettings = service.settings

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
        key = self.settings.api_key.get_secret_value() if self.settings.api_key is not None else None
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not supplied:
            supplied = request.headers.get("x-api-key", "")
        if not supplied or not secrets.compare_digest(supplied.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    def resolve_mode(self, model: str) -> str:
        """The routing mode for a requested model; unknown models are a 404 like OpenAI's and Ollama's."""
        name = model.strip()
        if name in ROUTING_MODES:
            return name
        known = self.service.known_models()
        if name in known:
            return name
        if name.endswith(":latest") and name.removesuffix(":latest") in known:
            return name.removesuffix(":latest")
        if ":" not in name and f"{name}:latest" in known:
            return f"{name}:latest"
        choices = ", ".join([*ROUTING_MODES, *known]) or "auto, quality, all"
        raise ApiError(404, f"model {name!r} is not served by this cluster; use one of: {choices}", "model_not_found")


"""The HTTP API beside the UI: health, status, metrics, and the OpenAI- and Ollama-compatible routes.

Existing tools (the ``openai`` SDK, the ``ollama`` client, Open WebUI) talk to
the whole cluster as if it were one server (app/openai_api.py,
app/ollama_api.py). Errors follow each protocol's shape so the clients raise
their usual exceptions: OpenAI ``{"error": {"message", "type", "param",
"code"}}``, Ollama ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api_common import ApiContext, ApiError, error_response, validation_message
from app.middleware import HttpMetrics
from app.ollama_api import build_ollama_router
from app.openai_api import build_openai_router
from app.service import AppService
from app.store import StoreError

logger = logging.getLogger(__name__)


def build_http_api(service: AppService, metrics: HttpMetrics, coordinator_registry: Any | None) -> APIRouter:
    """Every non-Gradio route of the web process."""
    router = APIRouter()
    context = ApiContext(service)

    @router.get("/health", tags=["cluster"])
    async def health() -> JSONResponse:
        """Is the cluster able to answer? ``message`` says what to do when it is not."""
        body = service.health()
        return JSONResponse(body, status_code=200)

    @router.get("/status", tags=["cluster"])
    async def status() -> JSONResponse:
        """The cluster summary and every agent's detail."""
        return JSONResponse(json.loads(json.dumps(service.status(), default=str)))

    @router.get("/metrics", tags=["cluster"])
    async def metrics_endpoint() -> Response:
        """Prometheus text: the coordinator's counters plus the web process's HTTP counters."""
        parts = [generate_latest(metrics.registry)]
        if coordinator_registry is not None:
            parts.insert(0, generate_latest(coordinator_registry))
        return PlainTextResponse(b"".join(parts), media_type=CONTENT_TYPE_LATEST)

    router.include_router(build_openai_router(context))
    router.include_router(build_ollama_router(context))
    return router


def install_error_handlers(app: FastAPI) -> None:
    """Render every API error in the shape of the API it came from."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        response = error_response(request, error.status, error.message, error.code, error.param)
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, error: StoreError) -> Response:
        return error_response(request, error.http_status, str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        message, param = validation_message(error)
        return error_response(request, 400, message, "invalid_request", param)

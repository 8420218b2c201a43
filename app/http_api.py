"""The HTTP API beside the UI: health, status, metrics, and the OpenAI- and Ollama-compatible routes.

Existing tools (the ``openai`` SDK, the ``ollama`` client, Open WebUI) talk to
the whole cluster as if it were one server (app/openai_api.py,
app/ollama_api.py). Errors follow each protocol's shape so the clients raise
their usual exceptions: OpenAI ``{"error": {"message", "type", "param",
"code"}}``, Ollama ``{"error": "..."}``.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.api_common import ApiContext, error_response, validation_message
from app.embeddings_api import build_embeddings_router
from app.errors import AppError
from app.middleware import HttpMetrics
from app.ollama_api import build_ollama_router
from app.openai_api import build_openai_router
from app.service import AppService

logger = logging.getLogger(__name__)


def build_http_api(
    service: AppService, metrics: HttpMetrics, coordinator_registry: CollectorRegistry | None,
    context: ApiContext | None = None,
) -> APIRouter:
    """Every non-Gradio route of the web process; ``context`` is shared with the API user's middleware (its
    wrong-key back-off counts guesses on every path)."""
    router = APIRouter()
    context = context if context is not None else ApiContext(service)

    @router.get("/health", tags=["cluster"])
    async def health() -> JSONResponse:
        """Is the cluster able to answer? ``message`` says what to do when it is not."""
        return JSONResponse(service.health())

    @router.get("/status", tags=["cluster"])
    async def status() -> JSONResponse:
        """The cluster summary and every agent's detail."""
        return Response(await service.status_json(), media_type="application/json")

    @router.get("/metrics", tags=["cluster"])
    async def metrics_endpoint() -> Response:
        """Prometheus text: the coordinator's counters plus the web process's HTTP counters."""
        parts = [generate_latest(metrics.registry)]
        if coordinator_registry is not None:
            parts.insert(0, generate_latest(coordinator_registry))
        return PlainTextResponse(b"".join(parts), media_type=CONTENT_TYPE_LATEST)

    router.include_router(build_embeddings_router(context))  # before /api's catch-all
    router.include_router(build_openai_router(context))
    router.include_router(build_ollama_router(context))
    return router


def install_error_handlers(app: FastAPI) -> None:
    """Render every API error in the shape of the API it came from; the one place app errors get a status."""

    @app.exception_handler(AppError)
    async def _app_error(request: Request, error: AppError) -> Response:
        response = error_response(request, error.http_status, error.message, error.code, error.param)
        if error.http_status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        for name, value in getattr(error, "headers", {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        """A bug: the API's own error shape under /v1 and /api (clients show its ``error``), plain text elsewhere.

        Starlette calls this from its outermost middleware and then re-raises, so uvicorn still logs the traceback.
        """
        path = request.url.path
        if path.startswith("/v1/") or path == "/api" or path.startswith("/api/"):
            return error_response(request, 500, f"internal error in the cluster's web app ({type(error).__name__}); "
                                                "the app's log has the details", "internal_error")
        return PlainTextResponse("Internal Server Error", status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        message, param = validation_message(error)
        return error_response(request, 400, message, "invalid_request", param)

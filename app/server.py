"""One ASGI app on one port: the HTTP API, and the Gradio UI (with its API) mounted at ``/``.

The coordinator is started in the FastAPI lifespan so it binds to uvicorn's
event loop — the same loop Gradio's async handlers and the HTTP endpoints
run on, so they iterate its query streams directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.middleware.cors import CORSMiddleware  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from starlette.routing import Mount  # noqa: E402

from app.api_common import ApiContext  # noqa: E402
from app.gradio_queue import UnreadResults  # noqa: E402
from app.http_api import build_http_api, install_error_handlers  # noqa: E402
from app.key_user import ApiKeyUserMiddleware  # noqa: E402
from app.middleware import (  # noqa: E402
    BodyLimitMiddleware,
    BodyLimits,
    HttpMetrics,
    LoginThrottleMiddleware,
    MetricsMiddleware,
    SecurityHeadersMiddleware,
)
from app.ports import CoordinatorPort  # noqa: E402
from app.service import AppService  # noqa: E402
from app.settings import LOOPBACK_ORIGINS, AppSettings  # noqa: E402
from app.store import RagStore, open_session_store  # noqa: E402
from app.throttle import FailureThrottle  # noqa: E402
from app.ui import CSS, TITLE, build_ui  # noqa: E402
from broker.heap import settle_heap

logger = logging.getLogger(__name__)

SESSIONS_FILE = "sessions.sqlite3"
FILES_PER_UPLOAD = 16
"""Files of --max-upload-mb one upload request may carry (Gradio checks each file's size; this bounds the sum)."""
# System fonts only: the page must not fetch anything from the internet (private, LAN-only use).
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)


def _make_coordinator(settings: AppSettings) -> CoordinatorPort:
    from broker.coordinator.runtime import Coordinator

    return Coordinator(settings)


def _coordinator_registry(coordinator: CoordinatorPort) -> CollectorRegistry | None:
    """The coordinator's Prometheus series for /metrics; not part of the port, so a stand-in may have none."""
    metrics = getattr(coordinator, "metrics", None)
    return getattr(metrics, "registry", None)


GRADIO_QUEUE_IDLE_POLL_S = 0.01
"""How often Gradio's queue looks for new UI events when it has none (its default: every 1 ms)."""


def _gradio_app(app: FastAPI) -> Any:
    """The Gradio app mounted at ``/`` (its login tokens and cookie name), found after mounting."""
    for route in app.routes:
        if isinstance(route, Mount) and route.path == "":
            return route.app
    raise RuntimeError("the Gradio UI is not mounted")


def create_app(settings: AppSettings, *, coordinator: CoordinatorPort | None = None) -> FastAPI:
    """Build the web process's ASGI app; nothing touches the network until the lifespan starts."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    coordinator = coordinator if coordinator is not None else _make_coordinator(settings)
    sessions = open_session_store(settings.data_dir / SESSIONS_FILE, settings.database_url)

    def open_rag() -> RagStore:
        store = open_local_rag()
        if settings.database_url:  # several instances share one library; each indexes it locally (docs/rag.md)
            from app.store.shared_documents import share_documents

            share_documents(store, settings.database_url)
        return store

    def open_local_rag() -> RagStore:
        if settings.rag_cluster_embeddings:  # uploads embed on the cluster's agents (docs/rag.md)
            import anyio.from_thread

            from app.store.cluster_embedder import open_cluster_rag_store

            # open_rag runs in a worker thread of the app's event loop (AsyncStore): ask that loop for itself.
            loop = anyio.from_thread.run_sync(asyncio.get_running_loop)
            return open_cluster_rag_store(settings, coordinator, loop, max_upload_bytes=settings.max_upload_bytes,
                                          relevance_floor=settings.rag_relevance_floor)
        return RagStore(
            settings.data_dir,
            embedding_model=settings.embedding_model,
            max_upload_bytes=settings.max_upload_bytes,
            relevance_floor=settings.rag_relevance_floor,
        )

    service = AppService(settings, coordinator, sessions, open_rag)
    http_metrics = HttpMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await coordinator.start()
        await service.start()
        sweeper = asyncio.create_task(unread_results.run(), name="unread-gradio-results")
        settle_heap("start-up")  # before the first request (broker/heap.py)
        logger.info("web app ready on http://%s:%d (broker %s)", settings.host, settings.port, settings.broker)
        try:
            yield
        finally:
            sweeper.cancel()
            await service.stop()
            await coordinator.stop()
            logger.info("web app stopped")

    app = FastAPI(
        title=TITLE,
        summary="OpenAI- and Ollama-compatible API over a cluster of your own machines.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    app.state.coordinator = coordinator
    app.state.http_metrics = http_metrics
    install_error_handlers(app)
    api_context = ApiContext(service)
    app.include_router(build_http_api(service, http_metrics, _coordinator_registry(coordinator), api_context))

    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=LOOPBACK_ORIGINS,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        allow_credentials=False,
    )
    demo = build_ui(service, metrics=http_metrics)
    unread_results = UnreadResults(demo, ttl_s=settings.unread_result_ttl_s)
    app.state.blocks = demo
    app.state.unread_results = unread_results
    users = settings.user_directory()
    auth = users.authenticate if users is not None else None
    if users is not None:
        logger.info("UI login on for %d user(s); each has their own chats", len(users))
        app.add_middleware(LoginThrottleMiddleware, throttle=FailureThrottle(free_failures=5))
        if settings.api_key is not None:
            # A script with the API key is the API user in the UI's API (app/key_user.py).
            app.add_middleware(ApiKeyUserMiddleware, context=api_context, api_user=settings.api_user,
                               gradio_app=lambda: _gradio_app(app))
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits(
        api=settings.api_body_limit,
        gradio=max(settings.api_body_limit, settings.max_upload_bytes * 2 + 65_536),
        upload=settings.max_upload_bytes * FILES_PER_UPLOAD + (1 << 20),
    ))
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=http_metrics)

    if not settings.loopback_only:
        if settings.api_key is None:
            logger.warning("listening on %s without an API key: anyone on the network can use /v1, /api", settings.host)
        if auth is None:
            logger.warning("listening on %s without a UI login: anyone on the network can use it", settings.host)
    if settings.api_key is not None and auth is None:
        logger.warning(
            "--api-key protects /v1 and /api only: without a UI login (--ui-username/--ui-password, --ui-user, "
            "--ui-users-file) the UI and its API (/gradio_api/*: queries, chat sessions, documents) need no key; "
            "set a UI login to protect them too"
        )
    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        auth_message="Log in to the Smart AI Load Balancer." if auth else None,
        max_file_size=settings.max_upload_bytes,
        ssr_mode=False,
        run_history=False,
        server_name=settings.host,
        server_port=settings.port,
        footer_links=["api", "settings"],
        css=CSS,
        theme=THEME,
        allowed_paths=[],
    )
    # Gradio checks that a file a client names (FileData.path) was uploaded to this app only once the Blocks
    # "has launched", which mount_gradio_app never marks: without this, /rag_add (and the upload button's
    # event) ingested any readable file on the server, e.g. {"path": "/home/me/notes.txt"}, and search then
    # read it back. Found by tests/test_security_web.py.
    demo.has_launched = True
    # Gradio's queue polls for new UI events every 1 ms when idle: ~5 % of a core and an event-loop wake-up per
    # millisecond under every /v1 stream (issue 15's overhead profile). 10 ms is still instant for a person.
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = GRADIO_QUEUE_IDLE_POLL_S
    return app

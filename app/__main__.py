"""``python -m app``: the web process (coordinator + Gradio UI + HTTP API) on one port."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.settings import USER_FLAG, AppSettings, fold_user_flags  # noqa: E402
from broker.mqtt.cli import configure_logging, parse_settings  # noqa: E402

logger = logging.getLogger("app")

GRACEFUL_SHUTDOWN_S = 5


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m app",
        description=(
            "The Smart AI Load Balancer web app: the coordinator, the Gradio UI at /, the scriptable Gradio API, "
            "and the OpenAI/Ollama-compatible HTTP API (/v1, /api), all on one port. Listens on 127.0.0.1 unless "
            "--host says otherwise."
        ),
    )
    parser.add_argument(USER_FLAG, metavar="NAME:PASSWORD", action="append",
                        help="one more UI user, with their own chats; repeat for several (folded into --ui-users)")
    settings, _ = parse_settings(AppSettings, fold_user_flags(sys.argv[1:] if argv is None else argv), parser=parser)
    configure_logging(settings.log_level)
    import uvicorn

    from app.server import create_app

    app = create_app(settings)
    shown_host = "127.0.0.1" if settings.host in {"0.0.0.0", "::"} else settings.host
    logger.info("starting; the UI will be at http://%s:%d/", shown_host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

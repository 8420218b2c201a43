"""``python -m broker``: the coordinator without the web app, with the interactive console.

Without a terminal, or when standard input is closed or never speaks, it runs
until SIGTERM or SIGINT and then stops cleanly (publishing its offline status).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from broker.coordinator.console import Console, stdin_lines
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.heap import settle_heap
from broker.mqtt.cli import configure_logging, parse_settings
from broker.scheduling.catalog import Catalog, CatalogError

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Smart AI Load Balancer coordinator: scores the agents, places models on them, routes each prompt and "
    "recovers from failures. Type a prompt to ask the cluster; 'help' lists the console commands."
)


async def serve(coordinator: Coordinator, console: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    await coordinator.start()
    settle_heap("start-up")  # broker/heap.py
    console_task: asyncio.Task[None] | None = None
    if console:
        interactive = sys.stdin is not None and sys.stdin.isatty()
        runner = Console(coordinator, stop, interactive=interactive)
        console_task = asyncio.create_task(runner.run(stdin_lines()), name="console")
    try:
        await stop.wait()
    finally:
        logger.info("stopping")
        if console_task is not None:
            console_task.cancel()
            await asyncio.gather(console_task, return_exceptions=True)
        await coordinator.stop()
    return 0


def describe_catalog(catalog: Catalog, settings: CoordinatorSettings) -> str:
    """What ``--validate-config`` prints: the catalog files, each tier's models (primary first), the rest."""
    source = str(settings.catalog_path) + (f" extended by {settings.catalog}" if settings.catalog else "")
    lines = [f"settings OK; catalog {source}: {len(catalog.models)} models"]
    placed: set[str] = set()
    for tier in catalog.ordered_tiers:
        names = [model.name for model in catalog.models_of(tier.name)]
        placed.update(names)
        lines.append(f"  {tier.name} (score ≥ {tier.min_score:g}): {', '.join(names)}")
    embeddings = [model.name for model in catalog.models if model.embedding]
    others = [model.name for model in catalog.models if model.name not in placed and not model.embedding]
    if others:
        lines.append(f"  served where present, never placed (larger than every tier): {', '.join(others)}")
    if embeddings:
        lines.append(f"  embedding models (never placed for chat): {', '.join(embeddings)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=DESCRIPTION)
    parser.add_argument("--no-console", action="store_true", help="Do not read commands from standard input.")
    parser.add_argument("--validate-config", action="store_true",
                        help="Check the settings and the model catalog, say what is wrong, and exit.")
    settings, namespace = parse_settings(CoordinatorSettings, argv, parser=parser)
    configure_logging(settings.log_level)
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per scheduled re-plan is noise
    try:
        coordinator = Coordinator(settings)
    except CatalogError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    if namespace.validate_config:
        sys.stdout.write(describe_catalog(coordinator.catalog, settings) + "\n")
        return 0
    return asyncio.run(serve(coordinator, console=not namespace.no_console))


if __name__ == "__main__":
    sys.exit(main())

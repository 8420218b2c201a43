"""``python -m agent``: join the cluster from this machine.

Every flag has an ``SLB_`` environment twin (``--backend-url`` ↔
``SLB_BACKEND_URL``); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence

from agent import __version__
from agent.agent import Agent
from agent.hardware import load_profile, probe_hardware
from agent.settings import AgentSettings
from broker.mqtt.cli import configure_logging, parse_settings

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Smart AI Load Balancer agent: reports this machine's hardware and load over MQTT, serves the model the "
    "coordinator assigns (pulling it if needed) and streams answers back. Only outbound connections: to the "
    "MQTT broker and to the local inference backend."
)


def _install_signal_handlers(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, agent.request_stop)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows: no add_signal_handler
            signal.signal(signum, lambda *_: agent.request_stop())


async def _run(agent: Agent) -> int:
    _install_signal_handlers(agent)
    return await agent.run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"slb-agent {__version__}")
    parser.add_argument("--probe", action="store_true",
                        help="Print the hardware this agent would report (after --hardware-profile) and exit.")
    settings, namespace = parse_settings(AgentSettings, argv, parser=parser)
    configure_logging(settings.log_level)
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per health check is noise
    try:
        if namespace.probe:  # no agent id, no connection: just what would be reported
            profile = load_profile(settings.hardware_profile) if settings.hardware_profile else None
            hardware = probe_hardware(profile)
            sys.stdout.write(json.dumps(hardware.model_dump(exclude={"v", "ts"}), indent=2) + "\n")
            return 0
        agent = Agent(settings)
    except ValueError as error:  # bad agent id, unreadable hardware profile
        sys.stderr.write(f"error: {error}\n")
        return 2
    return asyncio.run(_run(agent))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m tests.chaos``: the long fault runs, with figures.

Every scenario runs against a Mosquitto of its own (loopback, free port), real
agent processes and the Ollama test double, exactly as the in-suite fault
tests do, only longer. Figures are printed and written as JSON
(``--output``, default ``tests/artifacts/chaos.json``); the exit code is 1
when any scenario found a problem.

    python -m tests.chaos --trials 100                      # everything (about 15 min on 2 cores)
    python -m tests.chaos --only agent-kill --trials 100
    python -m tests.chaos --only broker-outage --outage-s 180
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from broker.mqtt.local_broker import RunningBroker, free_port, mosquitto_binary, start_broker  # noqa: E402
from tests.chaos import scenarios  # noqa: E402
from tests.chaos.harness import Cluster, Report  # noqa: E402
from tests.ollama_double import OllamaDouble  # noqa: E402
from tests.support.processes import REPO  # noqa: E402

SCENARIOS = ("agent-kill", "broker-restart", "backend-stall", "broker-outage", "coordinator-restart", "stores-crash")


def say(text: str) -> None:
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stdout.flush()


async def with_cluster(folder: Path, agent_ids: list[str], body: Callable[[Cluster, RunningBroker],
                       Awaitable[Report]], *, double_kwargs: dict[str, Any] | None = None
                       ) -> Report:
    broker = start_broker(folder / "broker", port=free_port(), prefer="mosquitto")
    try:
        # the agents (machines) share this double, each running up to 8 at once (the harness's --max-parallel)
        with OllamaDouble(models=["llama3.2:3b"], num_parallel=8 * max(1, len(agent_ids)),
                          **(double_kwargs or {"tokens_per_s": 40})) as double:
            cluster = Cluster(broker.url, f"chaos/{uuid.uuid4().hex[:8]}/v1", folder / "cluster", double=double)
            try:
                for agent_id in agent_ids:
                    cluster.spawn(agent_id)
                await cluster.start_coordinator()
                await cluster.wait_ready(len(agent_ids), timeout=120)
                return await body(cluster, broker)
            finally:
                await cluster.close()
    finally:
        broker.stop()


async def run(arguments: argparse.Namespace, folder: Path) -> list[Report]:
    wanted = arguments.only or list(SCENARIOS)
    reports: list[Report] = []

    async def record(name: str, make: Callable[[], Awaitable[Report]]) -> None:
        say(f"{name}: starting")
        started = time.monotonic()
        try:
            report = await make()
        except Exception as error:  # noqa: BLE001 - a crashed scenario is a finding, the others still run
            report = Report(name.replace("-", "_"), problems=[f"scenario crashed: {error!r}"])
        report.figures["wall_s"] = round(time.monotonic() - started, 1)
        say(f"{name}: {len(report.problems)} problem(s); {json.dumps(report.figures)}")
        for problem in report.problems[:20]:
            say(f"  problem: {problem}")
        reports.append(report)

    if "agent-kill" in wanted:
        await record("agent-kill", lambda: with_cluster(
            folder / "agent-kill", ["kill-a", "kill-b", "kill-c", "kill-d"],
            lambda cluster, _: scenarios.agent_kill(cluster, arguments.trials, freeze_every=4, log=say)))
    if "broker-restart" in wanted:
        rounds = max(1, arguments.trials // 10)
        await record("broker-restart", lambda: with_cluster(
            folder / "broker-restart", ["restart-a", "restart-b", "restart-c"],
            lambda cluster, broker: scenarios.broker_restart(cluster, broker, rounds=rounds, log=say)))
    if "backend-stall" in wanted:
        async def stall(cluster: Cluster, _: RunningBroker) -> Report:
            with OllamaDouble(models=["llama3.2:3b"], tokens_per_s=40, num_parallel=8) as stuck:
                cluster.spawn("stuck", "--stall-timeout-s", "2", backend_url=stuck.url)
                return await scenarios.backend_stall(cluster, stuck, trials=max(1, arguments.trials // 10))

        await record("backend-stall", lambda: with_cluster(
            folder / "backend-stall", [], stall_with_healthy(stall)))
    if "broker-outage" in wanted:
        async def outage() -> Report:
            broker = start_broker(folder / "outage-broker", port=free_port(), prefer="mosquitto")
            try:
                return await scenarios.broker_outage(broker, f"chaos/{uuid.uuid4().hex[:8]}/v1", folder / "outage",
                                                     outage_s=arguments.outage_s, log=say)
            finally:
                broker.stop()

        await record("broker-outage", outage)
    if "coordinator-restart" in wanted:
        from tests.chaos.app_faults import coordinator_restart

        async def restart() -> Report:
            broker = start_broker(folder / "app-broker", port=free_port(), prefer="mosquitto")
            try:
                return await asyncio.to_thread(coordinator_restart, broker, folder / "app",
                                               restarts=max(1, arguments.trials // 20), real_embeddings=True, log=say)
            finally:
                broker.stop()

        await record("coordinator-restart", restart)
    if "stores-crash" in wanted:
        from tests.chaos.store_faults import chat_writes_crash, ingestion_crash

        await record("stores-crash-chat", lambda: asyncio.to_thread(
            chat_writes_crash, folder / "chat-crash", kills=arguments.trials, log=say))
        await record("stores-crash-documents", lambda: asyncio.to_thread(
            ingestion_crash, folder / "doc-crash", kills=max(3, arguments.trials // 10), real_embeddings=True,
            log=say))
    return reports


def stall_with_healthy(body: Callable[[Cluster, RunningBroker], Awaitable[Report]]
                       ) -> Callable[[Cluster, RunningBroker], Awaitable[Report]]:
    """The stall scenario's cluster: one healthy agent here, the stuck one is added by ``body``."""
    async def wrapped(cluster: Cluster, broker: RunningBroker) -> Report:
        cluster.spawn("healthy", "--stall-timeout-s", "2")
        return await body(cluster, broker)

    return wrapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100,
                        help="Agent kills (other scenarios scale from it: broker restarts = trials/10, ...).")
    parser.add_argument("--outage-s", type=float, default=180.0, help="How long the broker stays away (broker-outage).")
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="Run only this scenario (repeatable).")
    parser.add_argument("--output", type=Path, default=REPO / "tests" / "artifacts" / "chaos.json",
                        help="Where to write the figures (JSON).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder (logs of every process).")
    arguments = parser.parse_args(argv)
    if mosquitto_binary() is None:
        parser.error("mosquitto is not installed (apt-get install mosquitto)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path(tempfile.mkdtemp(prefix="slb-chaos-"))
    say(f"chaos run in {folder}")
    started = time.monotonic()
    try:
        reports = asyncio.run(run(arguments, folder))
    finally:
        if not arguments.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": round(time.monotonic() - started, 1),
        "arguments": {"trials": arguments.trials, "outage_s": arguments.outage_s, "only": arguments.only},
        "reports": [report.as_dict() for report in reports],
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2))
    problems = sum(len(report.problems) for report in reports)
    say(f"done in {result['wall_s']} s: {problems} problem(s); figures in {arguments.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The broker dies (issue 8.2) or stays away (8.7): nothing hangs, nothing grows, everyone comes back.

Short versions of ``python -m tests.chaos --only broker-restart`` and ``--only broker-outage``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.chaos.harness import Cluster
from tests.chaos.scenarios import broker_outage, broker_restart
from tests.ollama_double import OllamaDouble

pytestmark = pytest.mark.slow


@pytest.fixture()
async def cluster(own_mosquitto: RunningBroker, tmp_path: Path) -> AsyncIterator[Cluster]:
    # three agents (machines) share this double, each running up to 8 at once (the harness's --max-parallel)
    with OllamaDouble(models=["llama3.2:3b"], tokens_per_s=30, num_parallel=24) as double:
        cluster = Cluster(own_mosquitto.url, f"slbtest/{uuid.uuid4().hex[:8]}/v1", tmp_path, double=double)
        try:
            for name in ("restart-a", "restart-b", "restart-c"):
                cluster.spawn(name)
            await cluster.start_coordinator()
            await cluster.wait_ready(3, timeout=90)
            yield cluster
        finally:
            await cluster.close()


@pytest.mark.timeout(300)
async def test_broker_killed_during_twenty_queries(cluster: Cluster, own_mosquitto: RunningBroker) -> None:
    report = await broker_restart(cluster, own_mosquitto, queries=20, outage_s=1.0, timeout_s=30)
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    assert report.figures["completed_exact"] + report.figures["clear_errors"] == 20


@pytest.mark.timeout(180)
async def test_broker_unreachable_keeps_the_agent_bounded_and_it_comes_back(own_mosquitto: RunningBroker,
                                                                            tmp_path: Path) -> None:
    report = await broker_outage(own_mosquitto, f"slbtest/{uuid.uuid4().hex[:8]}/v1", tmp_path, outage_s=20)
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    figures = report.figures
    assert figures["offline_queue_longest"] <= figures["offline_queue_limit"]
    assert figures["telemetry_resumed_after_s"] is not None

"""A backend that stalls (issue 8.6): before its first token and mid-answer, the stall timer fires.

The query then finishes on another agent, exactly, or fails with a clear error within its deadline + 1 s.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.chaos.harness import Cluster
from tests.chaos.scenarios import backend_stall
from tests.ollama_double import OllamaDouble

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
async def test_stalled_backend_fails_over_or_fails_clearly(mosquitto: RunningBroker, tmp_path: Path) -> None:
    with OllamaDouble(models=["llama3.2:3b"], tokens_per_s=60, num_parallel=8) as healthy, \
            OllamaDouble(models=["llama3.2:3b"], tokens_per_s=60, num_parallel=8) as stuck:
        cluster = Cluster(mosquitto.url, f"slbtest/{uuid.uuid4().hex[:8]}/v1", tmp_path, double=healthy)
        try:
            cluster.spawn("healthy", "--stall-timeout-s", "2")
            cluster.spawn("stuck", "--stall-timeout-s", "2", backend_url=stuck.url)
            await cluster.start_coordinator(routing_policy="round_robin")
            await cluster.wait_ready(2, timeout=90)
            report = await backend_stall(cluster, stuck, agent_stall_s=2.0)
        finally:
            await cluster.close()
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    for case in report.figures["alone"].values():
        assert case["took_s"] <= case["deadline_s"] + 1 and case["error"]
    assert "stalled" in report.figures["alone"]["stall_first"]["error"]
    assert report.figures["alone"]["deadline_first"]["code"] == "timeout"

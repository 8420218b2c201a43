"""Agent SIGKILL mid-answer (issue 8.1): the answer finishes on another agent, exactly, or fails clearly.

Ten trials here, two of them freezing the agent (SIGSTOP: a power cut, no TCP FIN) instead of killing it.
``python -m tests.chaos --only agent-kill --trials 100`` is the long run (figures in docs/reliability.md).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.chaos.harness import Cluster
from tests.chaos.scenarios import agent_kill
from tests.ollama_double import OllamaDouble

pytestmark = pytest.mark.slow


@pytest.fixture()
async def cluster(mosquitto: RunningBroker, tmp_path: Path) -> AsyncIterator[Cluster]:
    # three agents (machines) share this double, each running up to 8 at once (the harness's --max-parallel)
    with OllamaDouble(models=["llama3.2:3b"], tokens_per_s=40, num_parallel=24) as double:
        cluster = Cluster(mosquitto.url, f"slbtest/{uuid.uuid4().hex[:8]}/v1", tmp_path, double=double)
        try:
            for name in ("kill-a", "kill-b", "kill-c"):
                cluster.spawn(name)
            await cluster.start_coordinator()
            await cluster.wait_ready(3, timeout=90)
            yield cluster
        finally:
            await cluster.close()


@pytest.mark.timeout(300)
async def test_killing_the_answering_agent_loses_and_repeats_nothing(cluster: Cluster) -> None:
    report = await agent_kill(cluster, trials=10, freeze_every=5)
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    figures = report.figures
    assert figures["killed_mid_answer"] >= 8
    assert figures["completed_exact"] + figures["clear_errors"] == 10
    for kind in ("sigkill", "freeze"):
        assert figures["detection_s"][kind]["max"] <= 1.5 * figures["keepalive_s"], kind

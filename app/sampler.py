"""A few minutes of per-agent load, sampled in the background, so the cluster plots have a past.

Only online agents are sampled, so an agent's plot lines end when it goes
offline (and start again when it comes back). The tokens/s drawn is what the
machine generates now: its speed per answer times the answers it is running,
and 0 while it runs none (the last measured speed alone would draw an idle
cluster as busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from broker.coordinator.contract import AgentView, ClusterSnapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSample:
    """One point of the cluster history the live plots draw."""

    at: float
    agent_id: str
    simulated: bool
    online: bool
    tokens_per_s: float | None
    """Tokens per second generated at ``at`` (every running answer together); 0 when idle."""
    jobs_running: int
    jobs_queued: int
    cpu_percent: float | None


def per_answer_speed(agent: AgentView) -> float | None:
    """The agent's generation speed per answer: measured (or claimed) in the view, else its hardware benchmark."""
    if agent.tokens_per_s:
        return agent.tokens_per_s
    benchmark = agent.hardware.get("benchmark") if isinstance(agent.hardware, dict) else None
    speed = benchmark.get("tokens_per_s") if isinstance(benchmark, dict) else None
    return float(speed) if isinstance(speed, int | float) and math.isfinite(speed) and speed > 0 else None


def generating_tokens_per_s(agent: AgentView) -> float:
    """Tokens per second the agent generates now: 0 when offline or running nothing, else its speed per answer
    times the answers it runs (at most its slots), 0 while no speed is known."""
    if not agent.online or agent.jobs_running <= 0:
        return 0.0
    speed = per_answer_speed(agent)
    if speed is None:
        return 0.0
    running = agent.jobs_running if not agent.slots else min(agent.jobs_running, agent.slots)
    return speed * running


class ClusterSampler:
    """Takes a snapshot every ``interval_s`` and keeps the last ``window_s`` seconds of them."""

    def __init__(self, snapshot: Callable[[], ClusterSnapshot], interval_s: float, window_s: float) -> None:
        self._snapshot = snapshot
        self._interval_s = interval_s
        self._samples: deque[list[ClusterSample]] = deque(maxlen=max(10, int(window_s / interval_s)))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cluster-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def history(self) -> list[ClusterSample]:
        """Every sample kept, oldest first."""
        return [sample for samples in self._samples for sample in samples]

    def sample(self) -> None:
        now = time.time()
        self._samples.append(
            [
                ClusterSample(
                    at=now,
                    agent_id=agent.id,
                    simulated=agent.simulated,
                    online=agent.online,
                    tokens_per_s=generating_tokens_per_s(agent),
                    jobs_running=agent.jobs_running,
                    jobs_queued=agent.jobs_queued,
                    cpu_percent=agent.cpu_percent,
                )
                for agent in self._snapshot().agents
                if agent.online
            ]
        )

    async def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a bad snapshot must not end the sampling
                logger.warning("cluster sampling failed", exc_info=True)
            await asyncio.sleep(self._interval_s)

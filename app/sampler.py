"""A few minutes of per-agent load, sampled in the background, so the cluster plots have a past."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from broker.coordinator.contract import ClusterSnapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSample:
    """One point of the cluster history the live plots draw."""

    at: float
    agent_id: str
    simulated: bool
    online: bool
    tokens_per_s: float | None
    jobs_running: int
    jobs_queued: int
    cpu_percent: float | None


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
                    tokens_per_s=agent.tokens_per_s,
                    jobs_running=agent.jobs_running,
                    jobs_queued=agent.jobs_queued,
                    cpu_percent=agent.cpu_percent,
                )
                for agent in self._snapshot().agents
            ]
        )

    async def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a bad snapshot must not end the sampling
                logger.warning("cluster sampling failed", exc_info=True)
            await asyncio.sleep(self._interval_s)

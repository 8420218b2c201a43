"""Watch the backend: is it reachable, and since when; retry with back-off while it is not.

The agent's status and telemetry say what this monitor knows, and the model
manager waits on it to re-run the assignment when the backend comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.backends.base import Backend

logger = logging.getLogger(__name__)


class BackendMonitor:
    """Periodic health checks: every ``interval_s`` while up, back-off up to ``retry_max_s`` while down."""

    def __init__(
        self,
        backend: Backend,
        *,
        interval_s: float,
        retry_max_s: float,
        retry_min_s: float = 0.5,
        on_change: Callable[[bool], None] | None = None,
        on_models: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.retry_min_s = min(retry_min_s, retry_max_s)
        self.retry_max_s = retry_max_s
        self.on_change = on_change
        self.on_models = on_models
        self.reachable: bool | None = None
        self.error: str | None = None
        self._up = asyncio.Event()
        self._poke = asyncio.Event()
        self.checks = 0

    def _set(self, reachable: bool, error: str | None) -> None:
        changed = reachable != self.reachable
        self.reachable = reachable
        self.error = error
        if reachable:
            self._up.set()
        else:
            self._up.clear()
        if changed:
            if reachable:
                logger.info("backend %s reachable", self.backend.url)
            else:
                logger.warning("backend down: %s (retrying with back-off)", error)
            if self.on_change is not None:
                self.on_change(reachable)

    async def check(self) -> bool:
        health = await self.backend.health()
        self.checks += 1
        self._set(health.reachable, None if health.reachable else health.error or f"no answer from {self.backend.url}")
        if health.models is not None and self.on_models is not None:
            self.on_models(list(health.models))
        return health.reachable

    def report_unreachable(self, error: str) -> None:
        """A job or the model manager found the backend gone: say so now and check again soon."""
        self._set(False, error)
        self._poke.set()

    async def wait_reachable(self) -> None:
        await self._up.wait()

    async def run(self) -> None:
        delay = self.retry_min_s
        while True:
            try:
                reachable = await self.check()
            except Exception:  # noqa: BLE001 - a health check bug must not stop the monitor
                logger.exception("backend health check failed")
                reachable = False
            if reachable:
                delay = self.retry_min_s
                wait = self.interval_s
            else:
                wait = delay
                delay = min(delay * 2, self.retry_max_s)
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), wait)
            except asyncio.TimeoutError:
                pass

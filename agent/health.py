"""Watch the backend: is it reachable, and since when; retry with back-off while it is not.

The agent's status and telemetry say what this monitor knows, and the model
manager waits on it to re-run the assignment when the backend comes back.

A check must never disturb an answer: llama-cpp-python cuts a running stream short on any request that touches
its model, and a one-slot runtime queues the check behind a long answer until it times out. So while a job is
producing tokens the check is skipped (the stream is itself proof of health), the check uses the runtime's
least intrusive endpoint (``Backend.health``), and the model list, which may need a disturbing request, is only
refreshed while the runtime is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from agent.backends.base import Backend, BackendError

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
        streaming: Callable[[float], bool] | None = None,
        idle: Callable[[], bool] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
        refresh_interval_s: float = 15.0,
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
        self.skipped = 0
        self._streaming = streaming
        self._idle = idle
        self._refresh = refresh
        self.refresh_interval_s = refresh_interval_s
        self._refreshed_at = 0.0

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
        if self.reachable and self._streaming is not None and self._streaming(self.interval_s):
            self.skipped += 1  # tokens are flowing: the runtime is up, and a request now could interrupt them
            return True
        health = await self.backend.health()
        self.checks += 1
        self._set(health.reachable, None if health.reachable else health.error or f"no answer from {self.backend.url}")
        if health.models is not None and self.on_models is not None:
            self.on_models(list(health.models))
        if health.reachable:
            await self._refresh_inventory()
        return health.reachable

    async def _refresh_inventory(self) -> None:
        """Re-read what the runtime has and holds now and then, only while no job runs (it may interrupt one)."""
        if self._refresh is None or time.monotonic() - self._refreshed_at < self.refresh_interval_s:
            return
        if self._idle is not None and not self._idle():
            return
        self._refreshed_at = time.monotonic()
        try:
            await self._refresh()
        except BackendError as error:
            logger.debug("refreshing the model inventory failed: %s", error)

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

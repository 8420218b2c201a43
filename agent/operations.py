"""Model management asked through the cluster: pull, delete, load and unload on this agent's runtime.

The coordinator sends :class:`~broker.protocol.Manage` (Ollama's ``/api/pull``, ``/api/delete``, a load, and
``keep_alive: 0`` reach the cluster this way); every request is answered with :class:`~broker.protocol.Operation`
messages — progress at most four times a second, then exactly one ``done`` message, with the runtime's own error
text when it failed. A request id runs at most once (QoS 1 may deliver twice). Nothing here can kill the agent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable

from agent.backends.base import Backend, BackendError
from broker.protocol import Manage, Operation

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25
REMEMBERED_REQUESTS = 256


class ModelOperations:
    """Runs Manage requests one per model at a time; reports each step as an Operation."""

    def __init__(
        self,
        backend: Backend,
        *,
        publish: Callable[[Operation], None],
        after_change: Callable[[], Awaitable[None]],
        keep_alive: str | None = None,
    ) -> None:
        self.backend = backend
        self._publish = publish
        self._after_change = after_change
        self.keep_alive = keep_alive
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, request: Manage) -> None:
        """Start a request in the background (the MQTT hand-off must return at once)."""
        if request.request_id in self._seen:
            logger.info("duplicate manage request %s ignored", request.request_id)
            return
        self._seen[request.request_id] = None
        while len(self._seen) > REMEMBERED_REQUESTS:
            self._seen.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._run(request), name=f"manage-{request.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, request: Manage, status: str, **fields: object) -> None:
        self._publish(Operation(request_id=request.request_id, action=request.action, model=request.model,
                                status=status[:200], **fields))  # type: ignore[arg-type]

    async def _run(self, request: Manage) -> None:
        logger.info("%s %s (request %s)", request.action, request.model, request.request_id)
        try:
            if request.action == "pull":
                await self._pull(request)
            elif request.action == "delete":
                await self.backend.delete(request.model)
            elif request.action == "load":
                await self.backend.warm(request.model, self.keep_alive)
            else:
                await self.backend.unload(request.model)
        except BackendError as error:
            logger.warning("%s %s failed: %s", request.action, request.model, error)
            self._send(request, "failed", done=True, error=str(error)[:2000])
            return
        except Exception as error:  # noqa: BLE001 - a bug in one request must still answer it
            logger.exception("%s %s crashed", request.action, request.model)
            self._send(request, "failed", done=True, error=f"internal agent error: {type(error).__name__}")
            return
        try:
            await self._after_change()
        except BackendError as error:
            logger.warning("refreshing the model list after %s failed: %s", request.action, error)
        self._send(request, "success", done=True)

    async def _pull(self, request: Manage) -> None:
        last_sent = 0.0
        async for progress in self.backend.pull(request.model):
            now = time.monotonic()
            if now - last_sent >= PROGRESS_INTERVAL_S:
                last_sent = now
                self._send(request, progress.status or "pulling", completed_bytes=progress.completed_bytes,
                           total_bytes=progress.total_bytes)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

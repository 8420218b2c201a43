"""Batch a fast event stream into a few updates per second.

Why: a model can emit 100+ chunks a second; re-rendering a chat bubble for
each one floods the browser and the Gradio queue. A pump task reads the
source into a queue so that pending text is flushed on time even when the
source is quiet, without ever cancelling the source mid-``__anext__`` (which
would throw into the coordinator's generator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def throttled(source: AsyncIterator[T], interval_s: float) -> AsyncIterator[list[T]]:
    """Yield lists of events from ``source``, at most one list per ``interval_s``.

    The first event is delivered at once (time to first token is what users
    feel); later ones are gathered for up to ``interval_s``. The returned
    generator owns ``source``: closing it (or reaching the end) closes ``source``.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except asyncio.CancelledError:
            queue.put_nowait(_END)  # the source was stopped from elsewhere: end the stream, don't hang the reader
            raise
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait(_Failure(error))
            return
        queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    last_flush = 0.0
    pending: list[T] = []
    try:
        while True:
            wait = None if not pending else max(0.0, last_flush + interval_s - time.monotonic())
            try:
                item = await asyncio.wait_for(queue.get(), timeout=wait) if wait is not None else await queue.get()
            except asyncio.TimeoutError:
                item = None
            if item is _END:
                if pending:
                    yield pending
                return
            if isinstance(item, _Failure):
                if pending:
                    yield pending
                raise item.error
            if item is not None:
                pending.append(item)  # type: ignore[arg-type]
            if pending and time.monotonic() - last_flush >= interval_s:
                batch, pending = pending, []
                last_flush = time.monotonic()
                yield batch
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the pump hands every other error to the reader
                await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()  # the source is this generator's: its reader is done, so nobody else closes it

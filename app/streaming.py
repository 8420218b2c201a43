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
    ended = asyncio.Event()  # set by the pump after its last item: a due batch waits no longer

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except asyncio.CancelledError:
            queue.put_nowait(_END)  # the source was stopped from elsewhere: end the stream, don't hang the reader
            ended.set()
            raise
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait(_Failure(error))
            ended.set()
            return
        queue.put_nowait(_END)
        ended.set()

    task = asyncio.create_task(pump())
    last_flush = 0.0
    pending: list[T] = []
    try:
        while True:
            # One timer per batch, not per event: with text pending, sleep until the batch is due (or the end).
            if pending:
                remaining = last_flush + interval_s - time.monotonic()
                if remaining > 0 and not ended.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(ended.wait(), remaining)
                items: list[object] = []
                while not queue.empty():  # everything that came meanwhile joins the batch
                    items.append(queue.get_nowait())
            else:
                items = [await queue.get()]  # the first event of a batch goes out at once if one is due
            for item in items:
                if item is _END:
                    if pending:
                        yield pending
                    return
                if isinstance(item, _Failure):
                    if pending:
                        yield pending
                    raise item.error
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

"""One answer on its way: the coordinator's events, folded once into the answer's record.

:meth:`AppService.ask <app.service.AppService.ask>` returns an
:class:`AnswerStream`. Its reader iterates the events (for the live view)
and reads :attr:`AnswerStream.record` (for everything else): nobody folds
the events a second time. Whoever asked owns the stream and closes it
(``aclose()``, or through ``app.streaming.throttled``, which closes its
source); the stream also closes itself after the final event.
Closing is idempotent and does the end-of-answer work exactly once: cancel
the query on the agents if it still runs, mark an unfinished answer as
stopped, and hand the record to the service (which stores it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from app.answers import AnswerRecord
from app.store import SHARED_USER, Citation
from broker.coordinator.contract import QueryEvent, QueryFailed

logger = logging.getLogger(__name__)


class AnswerStream:
    """An async iterator of the query's events that owns the answer's :class:`AnswerRecord`."""

    def __init__(
        self,
        *,
        request_id: str,
        session_id: str | None,
        mode: str,
        citations: list[Citation],
        owner: str | None,
        events: AsyncGenerator[QueryEvent, None],
        on_close: Callable[[AnswerStream], Awaitable[None]],
        user: str = SHARED_USER,
    ) -> None:
        self.request_id = request_id
        self.session_id = session_id
        self.mode = mode
        self.citations = citations
        self.owner = owner
        """The browser session that asked (the Stop button cancels its answers), if any."""
        self.user = user
        """The user whose chat ``session_id`` is (the answer is stored there as that user)."""
        self.record = AnswerRecord()
        self.reader: asyncio.Task[object] | None = None
        """The task reading the events: cancelled when the coordinator ignores a cancel (AppService.cancel)."""
        self.cancel_requested = False
        self._events = events
        self._on_close = on_close
        self._closed = False

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> QueryEvent:
        if self.reader is None:
            self.reader = asyncio.current_task()
        if self._closed or self.record.ended:
            await self.aclose()
            raise StopAsyncIteration
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except Exception as error:
            # The cluster's stream broke (a bug, a lost connection): the answer failed, it was not stopped, and it
            # is stored as such before the error goes on to the reader.
            logger.warning("query %s: its event stream raised %s", self.request_id, type(error).__name__,
                           exc_info=True)
            self.record.apply(QueryFailed(self.request_id, f"the answer broke off: {type(error).__name__}",
                                          "failed", self.record.text))
            await self.aclose()
            raise
        self.record.apply(event)
        return event

    async def aclose(self) -> None:
        """End the answer: cancel it on the agents if it still runs, then finish its record (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._events.aclose()  # before the final event this cancels the query on the agents
        finally:
            self.record.stop(self.request_id)
            await self._on_close(self)

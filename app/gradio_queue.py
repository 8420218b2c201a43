"""Results of Gradio API calls that nobody fetches expire (issue 13.5).

``POST /gradio_api/call/<api>`` runs the function and keeps its result until
``GET /gradio_api/call/<api>/<event_id>`` reads it. Gradio 6 keeps unread
results in ``Queue.pending_messages_per_session`` (an LRU of 2000 sessions, one
per call made without a session) with no expiry, and ``demo.queue()`` has no
setting for it (``max_size`` bounds only the calls waiting to run). So 300
calls whose results were never fetched held ~300 MB, for good.

:class:`UnreadResults` sweeps that queue on the event loop: a session whose
messages sit unread while none of its events runs any more is dropped after
``ttl_s``, and beyond ``max_unread`` such sessions the oldest go at once. A
connected reader (a browser, ``gradio_client``) drains its messages as they
come, so it is never touched; a caller who fetches an expired result gets
Gradio's "session not found" error.

This reads Gradio's private queue attributes. If a Gradio version renames
them the sweep logs one warning and does nothing; tests/test_web_hardening.py
fails then, so the upgrade is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class UnreadResults:
    """Drops unread Gradio results after ``ttl_s`` and beyond ``max_unread``; :meth:`run` sweeps periodically."""

    def __init__(self, blocks: Any, *, ttl_s: float, max_unread: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.blocks = blocks
        self.ttl_s = ttl_s
        self.max_unread = max_unread
        self._clock = clock
        self._unread_since: dict[str, float] = {}
        self._warned = False
        self.dropped = 0

    def _queue_parts(self) -> tuple[Any, dict[str, set[str]], dict[str, Any]] | None:
        queue = getattr(self.blocks, "_queue", None)
        parts = (getattr(queue, "pending_messages_per_session", None),
                 getattr(queue, "pending_event_ids_session", None),
                 getattr(queue, "event_ids_to_events", None))
        if any(part is None for part in parts):
            if not self._warned:
                self._warned = True
                logger.warning("this Gradio version keeps its queue elsewhere: unread API results do not expire")
            return None
        return parts  # type: ignore[return-value]

    def unread(self) -> list[str]:
        """Sessions whose results wait for a reader while none of their events runs."""
        parts = self._queue_parts()
        if parts is None:
            return []
        messages, event_ids, running = parts
        waiting = []
        for session_hash, queue in list(messages.items()):
            if queue.qsize() == 0:
                continue
            if any(event_id in running for event_id in event_ids.get(session_hash, ())):
                continue
            waiting.append(session_hash)
        return waiting

    def sweep(self) -> int:
        """Drop the expired unread sessions (and the oldest beyond ``max_unread``); returns how many went."""
        parts = self._queue_parts()
        if parts is None:
            return 0
        messages, event_ids, _ = parts
        now = self._clock()
        waiting = self.unread()
        self._unread_since = {session: self._unread_since.get(session, now) for session in waiting}
        by_age = sorted(self._unread_since.items(), key=lambda item: item[1])
        excess = max(0, len(by_age) - self.max_unread)
        expired = [session for index, (session, since) in enumerate(by_age)
                   if index < excess or now - since >= self.ttl_s]
        for session in expired:
            messages.pop(session, None)
            event_ids.pop(session, None)
            self._unread_since.pop(session, None)
        if expired:
            self.dropped += len(expired)
            logger.info("dropped %d Gradio API result(s) nobody fetched", len(expired))
        return len(expired)

    async def run(self) -> None:
        """Sweep every quarter of ``ttl_s`` (at most every 30 s) until cancelled."""
        interval = min(30.0, max(0.25, self.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a sweep bug must not end the sweeping; it is logged
                logger.warning("sweeping unread Gradio results failed", exc_info=True)

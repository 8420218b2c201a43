"""A wake-up call for queries waiting on the cluster (a free slot, a model becoming ready, a cancel).

Waiters check their condition and then wait; whoever changes something the
waiters care about calls :meth:`Wakeup.notify`, which wakes every current
waiter at once, and they check again. Everything runs on one event loop and a
waiter has no ``await`` between its check and its wait, so no notify can slip
between the two.
"""

from __future__ import annotations

import asyncio
import contextlib

MINIMUM_WAIT_S = 0.01
"""Shortest wait, so a waiter whose deadline has come still yields to the loop once."""


class Wakeup:
    """Broadcast to every waiter: each notify ends the current round of waits, later waits start fresh."""

    def __init__(self) -> None:
        # An asyncio.Event binds to a loop only when awaited, so this may be built before the loop runs.
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake everyone waiting now; a fresh event is used for the next round."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return at the next :meth:`notify` or after ``timeout`` seconds, whichever comes first."""
        event = self._event
        with contextlib.suppress(asyncio.TimeoutError):  # the timeout is an expected way to end the wait
            await asyncio.wait_for(event.wait(), timeout=max(MINIMUM_WAIT_S, timeout))

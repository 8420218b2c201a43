"""Back-off after failed logins and wrong API keys (issue 13.8): guesses get slow, then refused unchecked.

Each key (a client address, a user name) may fail :attr:`FailureThrottle.free_failures`
times; every further failure locks it for twice as long as the last one
(``base_s``, ``2·base_s``, … up to ``max_s``). While a key is locked, a
request is refused with 429 and ``Retry-After`` before any password or key is
compared, so a guesser learns nothing and gets a few guesses a minute instead
of hundreds a second. A success clears the key; a key that has not failed for
``forget_s`` is forgotten. At most ``max_keys`` keys are kept (oldest first
out), so guessing with made-up user names cannot grow memory.

The address is the TCP peer: behind a reverse proxy every client shares the
proxy's address (``X-Forwarded-For`` is not trusted: anyone can send it), so
there one guesser slows everyone down; that is the price of not trusting it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0


class FailureThrottle:
    """Exponential back-off per key after repeated failures; see the module docstring."""

    def __init__(
        self,
        *,
        free_failures: int = 5,
        base_s: float = 1.0,
        max_s: float = 300.0,
        forget_s: float = 900.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.base_s = base_s
        self.max_s = max_s
        self.forget_s = forget_s
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, _Failures] = OrderedDict()

    def retry_after(self, *keys: str) -> float:
        """Seconds until a request for these keys may be checked again; 0 when it may be checked now."""
        now = self._clock()
        waits = [self._state(key, now).locked_until - now for key in keys if key in self._keys]
        return max([0.0, *waits])

    def failed(self, *keys: str) -> float:
        """Count a failure for every key; returns the longest lock it started (0 while failures are free)."""
        now = self._clock()
        longest = 0.0
        for key in keys:
            state = self._state(key, now)
            state.count += 1
            state.last_failure = now
            beyond = state.count - self.free_failures
            if beyond > 0:
                lock = min(self.max_s, self.base_s * 2 ** min(beyond - 1, 32))
                state.locked_until = max(state.locked_until, now + lock)
                longest = max(longest, lock)
            self._keys[key] = state
            self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return longest

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._keys.pop(key, None)

    def _state(self, key: str, now: float) -> _Failures:
        state = self._keys.get(key)
        if state is None or now - state.last_failure > self.forget_s:
            return _Failures()
        return state


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))

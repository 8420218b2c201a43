"""Keep the cyclic garbage collector's full passes off the request path of the long-lived processes.

The web app imports Gradio, LanceDB, sentence-transformers and torch: over
600,000 objects that live as long as the process. CPython's full collection
walks all of them — 350–440 ms on the 2-core reference box, with the event
loop stopped for every request, stream and UI event meanwhile (the agent's
~48,000 take 25 ms). Frozen after start-up
(``gc.freeze()``, meant for exactly this), they are no longer walked; what
requests allocate is still collected as before. Young collections run less
often (a larger first threshold) because a request allocates a few thousand
objects and each pass on the path costs tens of microseconds.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
"""Allocations between young collections (CPython's default is 700)."""


def settle_heap(reason: str, *, collect: bool = True) -> None:
    """Collect what start-up left behind (``collect``), then freeze everything alive now out of later passes."""
    started = time.perf_counter()
    if collect:
        gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    logger.debug("heap settled after %s: %d objects frozen in %.0f ms", reason, gc.get_freeze_count(),
                  (time.perf_counter() - started) * 1000)

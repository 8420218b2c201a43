"""broker/heap.py in a child process (freezing the test worker's own heap would outlive the test)."""

from __future__ import annotations

import json
import subprocess
import sys

from broker.heap import YOUNG_THRESHOLD
from tests.support.processes import REPO

CHILD = """
import gc, json
import broker.heap as heap
class Node:
    pass
keep = [Node() for _ in range(1000)]
heap.settle_heap("test")
frozen = gc.get_freeze_count()
threshold = gc.get_threshold()[0]
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze is still collected
del a, b
collected = gc.collect()
print(json.dumps({"frozen": frozen, "threshold": threshold, "collected": collected, "after": gc.get_freeze_count()}))
"""


def test_settle_heap_freezes_start_up_objects_and_still_collects_new_garbage() -> None:
    output = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=True).stdout
    facts = json.loads(output.strip().splitlines()[-1])
    assert facts["frozen"] >= 1000  # the objects alive at start-up (the Node list among them)
    assert facts["threshold"] == YOUNG_THRESHOLD
    assert facts["collected"] >= 2  # the cycle's two objects (and their dicts)
    assert facts["after"] == facts["frozen"]  # a later collection thaws nothing

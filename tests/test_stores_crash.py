"""kill -9 during chat writes and document ingestion (issue 8.10).

The writers run in a child process that is SIGKILLed at random moments;
afterwards every acknowledged message and document must be there, whole,
no unfinished document may be searchable, and SQLite's integrity_check must
pass. The documents are embedded by a hash stand-in here (loading the real
model takes ~20 s per process); ``python -m tests.chaos --only stores-crash``
runs the same with the real model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.store_faults import chat_writes_crash, ingestion_crash

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_kill_9_during_chat_writes_loses_no_acknowledged_message(tmp_path: Path) -> None:
    report = chat_writes_crash(tmp_path, kills=3)
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    assert report.figures["acknowledged_messages"] >= 15


@pytest.mark.timeout(300)
def test_kill_9_during_ingestion_leaves_no_half_document(tmp_path: Path) -> None:
    report = ingestion_crash(tmp_path, kills=2)
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    assert report.figures["ingestions_cut_short"] >= 1

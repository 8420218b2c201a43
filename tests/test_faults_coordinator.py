"""Coordinator restart (issue 8.3): kill -9 the web process, start it again on the same data.

The cluster view is back within one telemetry interval of the new
coordinator connecting; sessions, documents, and the question being
answered at the moment of the crash are intact; the app answers again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.mqtt.local_broker import RunningBroker
from tests.chaos.app_faults import coordinator_restart

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_web_process_killed_mid_answer_comes_back_whole(mosquitto: RunningBroker, tmp_path: Path) -> None:
    report = coordinator_restart(mosquitto, tmp_path, restarts=1)
    assert report.problems == [], "\n".join(report.problems) + f"\n{report.figures}"
    assert report.figures["view_back_after_connect_s"]["max"] <= report.figures["telemetry_interval_s"] + 1.0

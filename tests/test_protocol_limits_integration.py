"""What an agent claims is bounded before it reaches the coordinator's view (issue 13.6, 13.10).

One retained hardware message just under 1 MiB (17,500 GPUs) made ``/status``
1.47 MB and slowed every request of the app; now validation refuses it, the
coordinator logs and drops it, and the agent shows no hardware. A backend URL
with a password from an (older) agent is shown with ``***``. Real Mosquitto,
a real coordinator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.settings import MqttSettings
from broker.protocol import Status, Topics
from broker.protocol.codec import MAX_PAYLOAD_BYTES
from tests.support.processes import wait_until_async as wait_until


async def test_a_flood_of_gpus_is_dropped_and_a_password_in_a_backend_url_never_shows(
        mqtt_settings: MqttSettings, connect, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    topics = Topics(mqtt_settings.topic_prefix)
    coordinator = Coordinator(CoordinatorSettings(broker_url=mqtt_settings.broker_url,
                                                  topic_prefix=mqtt_settings.topic_prefix,
                                                  data_dir=tmp_path / "coordinator"))
    liar = connect(mqtt_settings)
    gpu = {"name": "H100", "vendor": "nvidia", "vram_total_gb": 80.0}
    flood = json.dumps({"v": 1, "ts": 0, "cpu_brand": "8x H100 box", "gpus": [gpu] * 17_500},
                       separators=(",", ":")).encode()
    assert len(flood) < MAX_PAYLOAD_BYTES
    # An old agent's status: the raw JSON carries the password (today's agents redact it themselves).
    status = json.dumps({"v": 1, "ts": 0, "state": "online", "backend": "ollama",
                         "backend_url": "http://admin:hunter2@gpu-box:11434",
                         "backend_error": "backend unreachable at http://admin:hunter2@gpu-box:11434: refused"})
    liar.publish_and_wait(topics.hardware("liar"), flood, retain=True)
    liar.publish_and_wait(topics.status("liar"), status.encode(), retain=True)
    caplog.set_level(logging.WARNING, logger="broker.coordinator.runtime")
    await coordinator.start()
    try:
        assert await coordinator.wait_connected(10)
        await wait_until(lambda: any(agent.id == "liar" and agent.online for agent in coordinator.snapshot().agents),
                         10, "the liar's status")
        await wait_until(lambda: "gpus" in caplog.text, 5, "the dropped hardware message in the log")
        view = next(agent for agent in coordinator.snapshot().agents if agent.id == "liar")
        assert view.hardware == {} and view.hardware_summary == "hardware not reported"
        assert view.backend_url == "http://admin:***@gpu-box:11434"
        shown = json.dumps([agent.__dict__ for agent in coordinator.snapshot().agents], default=str)
        assert "hunter2" not in shown and len(shown) < 20_000
        assert "dropped bad payload on " + topics.hardware("liar") in caplog.text
        assert Status(state="online", backend_url="http://admin:hunter2@gpu-box:11434").backend_url == \
            view.backend_url
    finally:
        await coordinator.stop()
        for topic in (topics.hardware("liar"), topics.status("liar")):
            liar.publish_and_wait(topic, b"", retain=True)

"""The coordinator's telemetry path (5,000 messages a second at 5,000 agents): the heartbeat of an online agent
only refreshes its record, while telemetry that changes what the rest of the coordinator reacts to (the
runtime's reachability, the measured speed, an agent coming back) still takes the full path; waiting queries
are woken only when the reported load or slots change; malformed telemetry is dropped with a log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage
from broker.protocol import Hardware, ModelState, Status, Telemetry, encode
from broker.scheduling.estimates import measured_speed
from broker.scheduling.registry import AgentExpired

AGENT = "agent-1"


class Silent:
    """Stands in for the MQTT connection: the coordinator publishes nothing anyone reads here."""

    connected = True

    def publish(self, topic: str, payload: object, **_: object) -> None:
        return None


async def coordinator_with_agent(tmp_path: Path) -> tuple[Coordinator, list[int]]:
    """A coordinator fed straight through its message handler, one ready agent, and a count of wake-ups."""
    coordinator = Coordinator(CoordinatorSettings(data_dir=tmp_path, replan_debounce_s=3600))
    coordinator._loop = asyncio.get_running_loop()
    coordinator._connection = Silent()  # type: ignore[assignment]
    topics = coordinator.topics
    deliver(coordinator, topics.status(AGENT), Status(state="online", backend="ollama"))
    deliver(coordinator, topics.hardware(AGENT), Hardware(cpu_physical_cores=8, ram_total_gb=32))
    deliver(coordinator, topics.model(AGENT), ModelState(model="llama3.2:3b", state="ready"))
    deliver(coordinator, topics.telemetry(AGENT), telemetry())
    wakeups = [0]
    original = coordinator._wakeup.notify

    def counted() -> None:
        wakeups[0] += 1
        original()

    coordinator._wakeup.notify = counted  # type: ignore[method-assign]
    return coordinator, wakeups


def telemetry(**changes: object) -> Telemetry:
    fields: dict[str, object] = {"cpu_percent": 10.0, "ram_free_gb": 20.0, "jobs_running": 0, "jobs_queued": 0,
                                 "max_parallel": 2, "tokens_per_s": 30.0, "backend_reachable": True,
                                 "interval_s": 1.0}
    return Telemetry(**{**fields, **changes})  # type: ignore[arg-type]


def deliver(coordinator: Coordinator, topic: str, message: object) -> None:
    payload = message if isinstance(message, bytes) else encode(message)  # type: ignore[arg-type]
    coordinator._on_message(InboundMessage(topic, payload, 0, False))


async def test_a_heartbeat_refreshes_the_record_and_wakes_nobody_unless_the_load_changes(tmp_path: Path) -> None:
    coordinator, wakeups = await coordinator_with_agent(tmp_path)
    topic = coordinator.topics.telemetry(AGENT)
    for cpu in (20.0, 30.0, 40.0):
        beat = telemetry(cpu_percent=cpu, ram_free_gb=cpu)
        deliver(coordinator, topic, beat)
        record = coordinator._state.agents[AGENT]
        assert record.telemetry == beat and record.ready_model == "llama3.2:3b"
    assert wakeups[0] == 0
    deliver(coordinator, topic, telemetry(jobs_running=1))  # a job of another front end: less room
    deliver(coordinator, topic, telemetry(jobs_running=0))  # it ended: room again, waiting queries must look
    deliver(coordinator, topic, telemetry(max_parallel=4))
    assert wakeups[0] == 3


async def test_reachability_and_speed_in_telemetry_still_take_the_full_path(tmp_path: Path) -> None:
    coordinator, wakeups = await coordinator_with_agent(tmp_path)
    topic = coordinator.topics.telemetry(AGENT)
    deliver(coordinator, topic, telemetry(backend_reachable=False))
    assert coordinator._state.agents[AGENT].ready_model is None  # the runtime went away: no model to answer with
    assert wakeups[0] >= 1  # queries waiting for that model look again
    deliver(coordinator, topic, telemetry())
    assert coordinator._state.agents[AGENT].ready_model == "llama3.2:3b"
    deliver(coordinator, topic, telemetry(tokens_per_s=55.0))
    record = coordinator._state.agents[AGENT]
    speed = measured_speed(record)
    assert speed is not None and speed.tokens_per_s == 55.0
    assert ("score", record.facts, speed) in coordinator.catalog.derived  # scored on the event, before any plan


async def test_telemetry_brings_an_expired_agent_back_and_plans_for_it(tmp_path: Path) -> None:
    coordinator, _ = await coordinator_with_agent(tmp_path)
    coordinator._apply(AgentExpired(AGENT, 10.0, 3.0))
    assert not coordinator._state.agents[AGENT].online
    coordinator._replan_handle = None
    deliver(coordinator, coordinator.topics.telemetry(AGENT), telemetry())
    assert coordinator._state.agents[AGENT].online
    assert coordinator._replan_handle is not None  # the join is planned for
    coordinator._replan_handle.cancel()


@pytest.mark.parametrize("payload", [b"{not json", b'{"jobs_running": -3}', b'{"interval_s": 0}', b"",
                                     b'{"cpu_percent": "NaN"}'])
async def test_malformed_telemetry_is_dropped_with_a_log(tmp_path: Path, payload: bytes,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    coordinator, wakeups = await coordinator_with_agent(tmp_path)
    before = coordinator._state.agents[AGENT]
    with caplog.at_level(logging.WARNING, logger="broker.coordinator.runtime"):
        deliver(coordinator, coordinator.topics.telemetry(AGENT), payload)
    assert coordinator._state.agents[AGENT] is before
    assert wakeups[0] == 0
    assert any("dropped" in record.getMessage() for record in caplog.records)

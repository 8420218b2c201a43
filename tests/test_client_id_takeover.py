"""Client-id takeover (issue 13.3): with the secure config no account can kick another client off the broker.

MQTT disconnects a client when another connects with the same client id. Our
ids are predictable (``slb-agent-<id>``; the coordinator's from ``ps``), so
before the fix one agent account kicked agent-a again and again (each kick
published its will, "offline") and stalled the coordinator's queries. The
secure config now gives every LAN connection its username as client id and
puts the coordinator's own connections on a loopback listener that only the
coordinator account can use (docs/security.md). Real Mosquitto, a real
coordinator and a real agent process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.agent import agent_client_id
from broker.coordinator.contract import QueryFinished, QueryRequest
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage, MqttAuthError, MqttConnection
from broker.mqtt.local_broker import RunningBroker
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage, Status, TopicKind, Topics, decode
from tests.support.brokers import COORDINATOR_LISTENER, start_secure_broker
from tests.support.loops import mqtt_connection
from tests.support.processes import spawn
from tests.support.processes import wait_until_async as wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "agent" / "profiles"
TOPICS = Topics("slb/v1")  # the ACL is written for the default prefix
USERS = {"coordinator": "coord-pw", "agent-a": "pw-a", "agent-b": "pw-b"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """mosquitto.secure.conf as shipped: the LAN listener and the coordinator listener with its own users."""
    running = start_secure_broker(tmp_path_factory.mktemp("takeover"), USERS,
                                  coordinator_users={"coordinator": USERS["coordinator"]})
    yield running
    running.stop()


def settings(url: str, user: str) -> MqttSettings:
    return MqttSettings(broker_url=url, topic_prefix="slb/v1", mqtt_username=user, mqtt_password=USERS[user])


class StatusLog:
    """Every status message of agent-a, seen from a second coordinator connection."""

    def __init__(self, url: str) -> None:
        self.states: list[str] = []
        self.connection = mqtt_connection(settings(url, "coordinator"), "coordinator-test-watcher",
                                          on_message=self._on_message,
                                          subscriptions=[(TOPICS.status("agent-a"), 1)])
        self.connection.start()
        assert self.connection.wait_connected(10)

    def _on_message(self, message: InboundMessage) -> None:
        if message.payload:
            self.states.append(decode(Status, message.payload).state)


def attack(url: str, client_id: str, hold_s: float = 0.6) -> MqttConnection:
    """agent-b (a valid account) connects with someone else's client id and stays a moment."""
    intruder = mqtt_connection(settings(url, "agent-b"), client_id, on_message=lambda message: None,
                               reconnect_max_s=0.5)
    intruder.start()
    try:
        assert intruder.wait_connected(10), f"agent-b could not log in with client id {client_id!r}"
        time.sleep(hold_s)  # long enough for the broker to act on the duplicate id
    finally:
        intruder.stop(timeout=1)
    return intruder


async def test_an_account_cannot_kick_an_agent_or_the_coordinator_by_taking_their_client_ids(
        broker: RunningBroker, tmp_path: Path) -> None:
    coordinator_url = broker.listener_url(COORDINATOR_LISTENER)
    coordinator = Coordinator(CoordinatorSettings(
        broker_url=coordinator_url, topic_prefix="slb/v1", mqtt_username="coordinator",
        mqtt_password=USERS["coordinator"], data_dir=tmp_path / "coordinator", replan_debounce_s=0.3,
        expected_output_tokens=16))
    agent = spawn("agent-a", [
        "-m", "agent", "--broker-url", broker.url, "--agent-id", "agent-a", "--mqtt-password", USERS["agent-a"],
        "--backend", "simulated", "--hardware-profile", str(PROFILES / "laptop.json"), "--sim-tokens-per-s", "200",
        "--sim-ttft-ms", "20", "--sim-pull-s", "0.1", "--telemetry-interval-s", "0.5", "--benchmark-tokens", "4",
        "--mqtt-keepalive", "2", "--data-dir", str(tmp_path / "agent-a"),
    ], tmp_path)
    statuses: StatusLog | None = None
    await coordinator.start()
    try:
        assert await coordinator.wait_connected(10)
        await wait_until(lambda: any(a.id == "agent-a" and a.online and a.model_state == "ready"
                                     for a in coordinator.snapshot().agents), 30, "agent-a ready")
        statuses = StatusLog(coordinator_url)
        assert coordinator._connection is not None
        coordinator_client_id = coordinator._connection.client_id
        connects_before = coordinator._connection.connect_count
        for victim in (agent_client_id("agent-a", "slb/v1"), "agent-a", coordinator_client_id,
                       "coordinator-test-watcher", "coordinator"):
            attack(broker.url, victim)
        assert statuses.states.count("offline") == 0, statuses.states  # no kick, so no last will
        assert statuses.connection.connect_count == 1
        assert coordinator._connection.connect_count == connects_before and coordinator.connected
        # The coordinator listener does not even let agent-b in, whatever client id it picks.
        outsider = mqtt_connection(settings(coordinator_url, "agent-b"), coordinator_client_id,
                                   on_message=lambda message: None)
        outsider.start()
        try:
            with pytest.raises(MqttAuthError):
                outsider.wait_connected(5)
        finally:
            outsider.stop(timeout=1)

        request = QueryRequest(messages=[ChatMessage(role="user", content="still there?")], mode="auto")
        events = [event async for event in coordinator.query(request)]
        assert isinstance(events[-1], QueryFinished) and events[-1].agents == ["agent-a"], events[-1]
        assert agent.alive() and "connection #2" not in agent.log(None), agent.log()
    finally:
        if statuses is not None:
            statuses.connection.stop(timeout=1)
        await coordinator.stop()
        agent.stop()
        cleanup = mqtt_connection(settings(coordinator_url, "coordinator"), "coordinator-test-cleanup",
                                  on_message=lambda message: None)
        cleanup.start()
        if cleanup.wait_connected(10):
            for kind in (TopicKind.STATUS, TopicKind.HARDWARE, TopicKind.MODEL):
                cleanup.publish_and_wait(TOPICS.for_kind(kind, "agent-a"), b"", retain=True)
            cleanup.publish_and_wait(TOPICS.assign("agent-a"), b"", retain=True)
        cleanup.stop(timeout=1)


def test_on_the_lan_listener_an_account_has_one_connection_and_the_coordinator_listener_has_many(
        broker: RunningBroker) -> None:
    """The price of tying ids to usernames, and why the coordinator has a listener of its own."""
    first = mqtt_connection(settings(broker.url, "agent-a"), "agent-a-one", on_message=lambda message: None,
                            reconnect_min_s=5.0, reconnect_max_s=5.0)
    many = [mqtt_connection(settings(broker.listener_url(COORDINATOR_LISTENER), "coordinator"),
                            f"coordinator-tool-{index}", on_message=lambda message: None) for index in range(3)]
    first.start()
    for connection in many:
        connection.start()
    try:
        assert first.wait_connected(10) and all(connection.wait_connected(10) for connection in many)
        attack(broker.url, "agent-a-two", hold_s=0.3)  # agent-b: its own id, so agent-a stays
        assert first.connected and first.connect_count == 1
        second = mqtt_connection(settings(broker.url, "agent-a"), "agent-a-two", on_message=lambda message: None,
                                 reconnect_min_s=5.0, reconnect_max_s=5.0)
        second.start()
        try:
            assert second.wait_connected(10)
            deadline = time.monotonic() + 5
            while first.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not first.connected  # same account, same id ("agent-a"): the newer connection wins
        finally:
            second.stop(timeout=1)
        assert all(connection.connected and connection.connect_count == 1 for connection in many)
    finally:
        first.stop(timeout=1)
        for connection in many:
            connection.stop(timeout=1)

"""The MQTT connection layer against a real Mosquitto (and the embedded broker)."""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.mqtt.client import InboundMessage, OutboundMessage
from broker.mqtt.local_broker import start_broker
from broker.mqtt.settings import MqttSettings
from broker.protocol import Cancel, PayloadError, Status, TopicKind, Topics, decode
from tests.support.loops import mqtt_connection
from tests.support.processes import REPO, free_port
from tests.test_protocol import EXAMPLES


def inbox() -> tuple[queue.Queue[InboundMessage], object]:
    received: queue.Queue[InboundMessage] = queue.Queue()
    return received, received.put


def next_message(received: queue.Queue[InboundMessage], topic: str | None = None, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = received.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if topic is None or message.topic == topic:
            return message
    raise AssertionError(f"no message on {topic or 'any topic'} within {timeout}s")


def test_every_model_round_trips_through_the_broker(mqtt_settings: MqttSettings, connect) -> None:
    topics = Topics(mqtt_settings.topic_prefix)
    received, handler = inbox()
    subscriber = connect(mqtt_settings, on_message=handler, subscriptions=[(f"{topics.prefix}/#", 1)])
    publisher = connect(mqtt_settings)
    assert subscriber.protocol == "5"
    for message in EXAMPLES:
        kind = next(k for k in TopicKind if k.spec.model is type(message))
        topic = topics.for_kind(kind, None if kind.spec.direction == "coordinator" else "desk-pc")
        publisher.publish_and_wait(topic, message, qos=1, retain=False)
        got = next_message(received, topic)
        parsed = topics.parse(got.topic)
        assert parsed is not None and parsed[0] is kind
        assert decode(kind.spec.model, got.payload, topic=got.topic) == message


def test_bad_payloads_are_dropped_and_kill_nothing(mqtt_settings: MqttSettings, connect, caplog) -> None:
    topics = Topics(mqtt_settings.topic_prefix)
    topic = topics.cancel("agent-x")
    decoded: list[Cancel] = []
    errors: list[PayloadError] = []

    def handler(message: InboundMessage) -> None:
        try:
            decoded.append(decode(Cancel, message.payload, topic=message.topic))
        except PayloadError as error:
            logging.getLogger("test").warning("dropped: %s", error)
            errors.append(error)

    subscriber = connect(mqtt_settings, on_message=handler, subscriptions=[(topic, 1)])
    publisher = connect(mqtt_settings)
    bad = [b"", b"{", b"null", b'{"v":1,"ts":0,"request_id":"a/b"}', b"\x00" * 1_100_000, b'{"v":"x"}']
    for payload in bad:
        publisher.publish_and_wait(topic, payload)
    publisher.publish_and_wait(topic, Cancel(request_id="good-one"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not decoded:
        time.sleep(0.02)
    assert [message.request_id for message in decoded] == ["good-one"]
    assert {error.kind for error in errors} == {"empty", "not_json", "invalid", "too_large"}
    assert len(errors) == len(bad)
    assert subscriber.connected


def test_handler_exception_does_not_kill_the_dispatcher(mqtt_settings: MqttSettings, connect) -> None:
    seen: list[bytes] = []

    def handler(message: InboundMessage) -> None:
        seen.append(message.payload)
        if message.payload == b"boom":
            raise RuntimeError("handler bug")

    topic = f"{mqtt_settings.topic_prefix}/x"
    connect(mqtt_settings, on_message=handler, subscriptions=[(topic, 1)])
    publisher = connect(mqtt_settings)
    publisher.publish_and_wait(topic, b"boom")
    publisher.publish_and_wait(topic, b"after")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b"after" not in seen:
        time.sleep(0.02)
    assert seen == [b"boom", b"after"]


def test_birth_is_published_after_subscribing_and_retained(mqtt_settings: MqttSettings, connect) -> None:
    topics = Topics(mqtt_settings.topic_prefix)
    birth = OutboundMessage.of(topics.status("a1"), Status(state="online", agent_version="t"))
    connect(mqtt_settings, birth=birth, subscriptions=[(topics.control_of("a1"), 1)])
    received, handler = inbox()
    connect(mqtt_settings, on_message=handler, subscriptions=[(topics.status("a1"), 1)])
    message = next_message(received, topics.status("a1"))
    assert message.retain
    assert decode(Status, message.payload).state == "online"


def test_clean_stop_publishes_offline(mqtt_settings: MqttSettings, connect) -> None:
    topics = Topics(mqtt_settings.topic_prefix)
    status = topics.status("a2")
    client = connect(mqtt_settings, birth=OutboundMessage.of(status, Status(state="online")),
                     will=OutboundMessage.of(status, Status(state="offline")))
    received, handler = inbox()
    connect(mqtt_settings, on_message=handler, subscriptions=[(status, 1)])
    assert decode(Status, next_message(received, status).payload).state == "online"
    client.stop(final=OutboundMessage.of(status, Status(state="offline")))
    assert decode(Status, next_message(received, status).payload).state == "offline"


def test_last_will_is_published_when_the_process_is_killed(mqtt_settings: MqttSettings, connect) -> None:
    topics = Topics(mqtt_settings.topic_prefix)
    status = topics.status("killed-agent")
    received, handler = inbox()
    connect(mqtt_settings, on_message=handler, subscriptions=[(status, 1)])
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.mqtt_child", mqtt_settings.broker_url, mqtt_settings.topic_prefix,
         "killed-agent", "2"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        assert decode(Status, next_message(received, status).payload).state == "online"
        killed_at = time.monotonic()
        child.kill()  # SIGKILL: no DISCONNECT, so the broker must send the will
        message = next_message(received, status, timeout=10)
        assert decode(Status, message.payload).state == "offline"
        # Keepalive 2 s: Mosquitto declares the client gone after 1.5 x keepalive at the latest.
        assert time.monotonic() - killed_at < 5
    finally:
        child.kill()
        child.wait()


def test_reconnects_and_resubscribes_after_broker_restart(own_mosquitto, topic_prefix: str, tmp_path, connect) -> None:
    settings = MqttSettings(broker_url=own_mosquitto.url, topic_prefix=topic_prefix, mqtt_keepalive=2)
    topics = Topics(topic_prefix)
    received, handler = inbox()
    subscriber = connect(settings, on_message=handler, subscriptions=[(topics.job("a3"), 1)],
                         birth=OutboundMessage.of(topics.status("a3"), Status(state="online")))
    assert subscriber.connect_count == 1
    own_mosquitto.kill()
    deadline = time.monotonic() + 5
    while subscriber.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not subscriber.connected
    queued = subscriber.publish(topics.result("a3"), b"sent while the broker was down", qos=1)
    own_mosquitto.start()
    assert subscriber.wait_connected(15)
    assert subscriber.connect_count == 2
    queued.wait(5)  # the offline queue was flushed after reconnecting
    publisher = connect(settings)
    publisher.publish_and_wait(topics.job("a3"), b"after restart")
    assert next_message(received, topics.job("a3")).payload == b"after restart"


def test_offline_queue_is_bounded_and_flushed_on_connect(topic_prefix: str, tmp_path: Path, connect) -> None:
    port = free_port()
    settings = MqttSettings(broker_url=f"mqtt://127.0.0.1:{port}", topic_prefix=topic_prefix)
    client = mqtt_connection(settings, "offline-queue", on_message=lambda m: None, max_offline_queue=50,
                             reconnect_min_s=0.2, reconnect_max_s=0.5)
    client.start()
    try:
        tickets = [client.publish(f"{topic_prefix}/q", str(i).encode(), qos=1) for i in range(500)]
        telemetry = client.publish(f"{topic_prefix}/t", b"stale", qos=0, queue_if_offline=False)
        assert client.offline_queue_length == 50
        assert client.offline_dropped == 450
        assert telemetry.done and telemetry.reason_code == -1
        assert all(ticket.done and ticket.reason_code == -1 for ticket in tickets[:450])
        broker = start_broker(tmp_path / "late-broker", port=port, prefer="mosquitto")
        try:
            assert client.wait_connected(10)
            for ticket in tickets[450:]:
                assert ticket.wait(5) < 0x80  # 0x10 "no matching subscribers" is a success code
            assert client.offline_queue_length == 0
        finally:
            broker.stop()
    finally:
        client.stop(timeout=0.5)


def test_publish_and_wait_times_out_without_acknowledgement(topic_prefix: str) -> None:
    settings = MqttSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", topic_prefix=topic_prefix)
    client = mqtt_connection(settings, "no-broker", on_message=lambda m: None)
    client.start()
    try:
        with pytest.raises(TimeoutError):
            client.publish_and_wait(f"{topic_prefix}/x", b"1", timeout=0.3)
    finally:
        client.stop(timeout=0.2)


def test_works_against_the_embedded_broker_with_mqtt_311(embedded_broker, topic_prefix: str, connect) -> None:
    settings = MqttSettings(broker_url=embedded_broker.url, topic_prefix=topic_prefix)
    topics = Topics(topic_prefix)
    received, handler = inbox()
    subscriber = connect(settings, on_message=handler, subscriptions=[(topics.all_agents(), 1)])
    assert subscriber.protocol == "3.1.1"
    publisher = connect(settings, birth=OutboundMessage.of(topics.status("emb"), Status(state="online")))
    assert publisher.protocol == "3.1.1"
    assert decode(Status, next_message(received, topics.status("emb")).payload).state == "online"
    publisher.publish_and_wait(topics.result("emb"), b'{"x":1}')
    assert next_message(received, topics.result("emb")).payload == b'{"x":1}'


def test_received_qos1_messages_are_acknowledged_after_their_handler(mqtt_settings: MqttSettings, connect) -> None:
    """PUBACKs are held for a moment (broker/mqtt/client.py, ACK_DELAY_S) but always sent: without them the broker
    stops at its in-flight window (100 here) and the rest of these 350 messages would never arrive."""
    topic = f"{mqtt_settings.topic_prefix}/acks/test"
    received, handler = inbox()
    subscriber = connect(mqtt_settings, on_message=handler, subscriptions=[(topic, 1)])
    publisher = connect(mqtt_settings)
    tickets = [publisher.publish(topic, f"m{index}".encode(), qos=1) for index in range(350)]
    for ticket in tickets:
        ticket.wait(10)
    got = [next_message(received, topic, timeout=10).payload for _ in range(350)]
    assert got == [f"m{index}".encode() for index in range(350)]
    deadline = time.monotonic() + 2
    while subscriber._acks and time.monotonic() < deadline:  # noqa: SLF001 - the batch is written within ACK_DELAY_S
        time.sleep(0.01)
    assert not subscriber._acks  # noqa: SLF001


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """An outgoing connection can take a port bind(0) handed out before the server binds it (seen in the suite)."""
    from broker.mqtt.local_broker import _ephemeral_range

    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(30)]
    for port in ports:
        assert not low <= port <= high or low <= 11_000, (port, low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free: nothing else holds it
    assert len(set(ports)) > 20, "spread over the range, not one port over and over"

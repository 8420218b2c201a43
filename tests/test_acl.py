"""The secure Mosquitto config: passwords and the ACL that pins each agent to its own topics."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from broker.mqtt.client import InboundMessage, MqttAuthError, MqttPublishRefused
from broker.mqtt.settings import MqttSettings
from broker.protocol import Cancel, Status, TopicKind, Topics
from tests.support.loops import mqtt_connection

TOPICS = Topics("slb/v1")  # the ACL is written for the default prefix
ACL_FILE = Path(__file__).resolve().parent.parent / "mosquitto" / "acl"


def settings_for(secure_mosquitto, user: str | None, password: str | None = None) -> MqttSettings:
    return MqttSettings(
        broker_url=secure_mosquitto.url,
        mqtt_username=user,
        mqtt_password=password if password is not None else secure_mosquitto.users.get(user or "", None),
    )


def collect(connect, settings: MqttSettings, topics: list[str]) -> queue.Queue[InboundMessage]:
    received: queue.Queue[InboundMessage] = queue.Queue()
    connect(settings, on_message=received.put, subscriptions=[(topic, 1) for topic in topics])
    return received


def drain(received: queue.Queue[InboundMessage], wait: float) -> list[InboundMessage]:
    time.sleep(wait)
    items = []
    while not received.empty():
        items.append(received.get_nowait())
    return items


def test_agent_can_publish_only_on_its_own_topics(secure_mosquitto, connect) -> None:
    agent_a = connect(settings_for(secure_mosquitto, "agent-a"), client_id="agent-a")
    observer = collect(connect, settings_for(secure_mosquitto, "coordinator"), ["slb/v1/agent/#"])
    assert agent_a.publish_and_wait(TOPICS.status("agent-a"), Status(state="online")) < 0x80
    with pytest.raises(MqttPublishRefused) as refused:
        agent_a.publish_and_wait(TOPICS.status("agent-b"), Status(state="offline"))
    assert refused.value.reason_code == 0x87  # v5 "Not authorized"
    with pytest.raises(MqttPublishRefused):
        agent_a.publish_and_wait(TOPICS.result("agent-b"), b'{"forged": true}')
    with pytest.raises(MqttPublishRefused):
        agent_a.publish_and_wait(TOPICS.job("agent-b"), b'{"forged": true}')
    topics_seen = {message.topic for message in drain(observer, 0.5)}
    assert TOPICS.status("agent-a") in topics_seen
    assert TOPICS.status("agent-b") not in topics_seen and TOPICS.result("agent-b") not in topics_seen


def test_agent_cannot_read_another_agents_jobs(secure_mosquitto, connect) -> None:
    spy = collect(connect, settings_for(secure_mosquitto, "agent-a"),
                  [TOPICS.control_of("agent-b"), "slb/v1/#", TOPICS.control_of("agent-a")])
    victim = collect(connect, settings_for(secure_mosquitto, "agent-b"), [TOPICS.control_of("agent-b")])
    coordinator = connect(settings_for(secure_mosquitto, "coordinator"), client_id="coordinator")
    coordinator.publish_and_wait(TOPICS.cancel("agent-b"), Cancel(request_id="secret-job"))
    coordinator.publish_and_wait(TOPICS.cancel("agent-a"), Cancel(request_id="for-a"))
    victim_got = [message.topic for message in drain(victim, 0.5)]
    spy_got = [message.topic for message in drain(spy, 0.1)]
    assert victim_got == [TOPICS.cancel("agent-b")]
    # Its own job only (overlapping subscriptions may deliver it twice), nothing of agent-b's.
    assert set(spy_got) == {TOPICS.cancel("agent-a")}


def test_subscription_to_everything_is_refused_with_a_reason_code(secure_mosquitto) -> None:
    codes: list[int] = []
    connection = mqtt_connection(settings_for(secure_mosquitto, "agent-a"), "agent-a-sub", on_message=lambda m: None)
    original = connection._handle_subscribe

    def spy(client, userdata, mid, reason_codes, properties):  # noqa: ANN001
        codes.extend(int(code.value) for code in reason_codes)
        original(client, userdata, mid, reason_codes, properties)

    connection._client.on_subscribe = spy
    connection.start()
    try:
        assert connection.wait_connected(5)
        connection.subscribe("slb/v1/#", 1)
        deadline = time.monotonic() + 3
        while not codes and time.monotonic() < deadline:
            time.sleep(0.02)
        # Mosquitto 2.0 grants the subscription but filters what it delivers; newer versions answer 0x87.
        # Either way agent A must never receive another agent's traffic (checked above).
        assert codes and codes[0] in (0x00, 0x01, 0x87), codes
    finally:
        connection.stop(timeout=0.5)


@pytest.mark.parametrize(("user", "password"), [(None, None), ("agent-a", "wrong"), ("nobody", "x")])
def test_anonymous_and_wrong_passwords_are_refused(secure_mosquitto, user, password) -> None:
    connection = mqtt_connection(settings_for(secure_mosquitto, user, password), "intruder", on_message=lambda m: None)
    fatal: list[Exception] = []
    connection._on_fatal = fatal.append
    connection.start()
    try:
        with pytest.raises(MqttAuthError) as refused:
            connection.wait_connected(5)
        assert "refused" in str(refused.value)
        assert not connection.connected
    finally:
        connection.stop(timeout=0.2)


def acl_agent_leaves() -> tuple[set[str], set[str]]:
    """The leaves the ACL lets every user write under slb/v1/agent/%u/ and read under slb/v1/control/%u/."""
    written, read = set(), set()
    for line in ACL_FILE.read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "pattern":
            if words[2].startswith("slb/v1/agent/%u/"):
                (written if words[1] == "write" else read).add(words[2].rsplit("/", 1)[-1])
            elif words[2].startswith("slb/v1/control/%u/"):
                (read if words[1] == "read" else written).add("control:" + words[2].rsplit("/", 1)[-1])
    return written, read


def test_the_acl_names_every_agent_topic_and_nothing_more() -> None:
    written, read = acl_agent_leaves()
    assert written == {kind.leaf for kind in TopicKind if kind.spec.direction == "agent"}
    assert read == {"control:+"}  # one level: the agent's own control topics


def test_an_agent_cannot_pile_up_retained_messages_on_sub_topics_of_its_own(secure_mosquitto, connect) -> None:
    """Issue 13.10: with ``agent/%u/#`` an agent could leave any number of retained payloads on the broker."""
    agent_a = connect(settings_for(secure_mosquitto, "agent-a"), client_id="agent-a")
    for topic in ("slb/v1/agent/agent-a/junk-1", "slb/v1/agent/agent-a/status/junk", "slb/v1/agent/agent-a/a/b/c"):
        with pytest.raises(MqttPublishRefused) as refused:
            agent_a.publish_and_wait(topic, b"x" * 1000, retain=True)
        assert refused.value.reason_code == 0x87, topic
    assert agent_a.publish_and_wait(TOPICS.telemetry("agent-a"), b'{"v": 1}') < 0x80


def test_the_secure_config_ties_client_ids_to_usernames_and_bounds_what_clients_make_it_hold() -> None:
    """The layout tests/test_client_id_takeover.py exercises, and the broker-wide limits docs/security.md lists."""
    blocks: list[dict[str, str]] = [{}]
    for line in (ACL_FILE.parent / "mosquitto.secure.conf").read_text().splitlines():
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            blocks.append({})
        blocks[-1][words[0]] = words[1] if len(words) > 1 else ""
    general, lan, coordinator = blocks
    assert general["per_listener_settings"] == "true"
    assert {"max_packet_size", "max_queued_messages", "max_queued_bytes", "memory_limit"} <= general.keys()
    assert lan["use_username_as_clientid"] == "true" and lan["password_file"] == "mosquitto/passwd"
    assert coordinator["password_file"] == "mosquitto/coordinator.passwd"
    assert "use_username_as_clientid" not in coordinator
    for block in (lan, coordinator):
        assert block["allow_anonymous"] == "false" and block["acl_file"] == "mosquitto/acl"
    tls = dict(line.split(None, 1) for line in (ACL_FILE.parent / "tls.conf.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert tls["use_username_as_clientid"] == "true" and tls["allow_anonymous"] == "false"

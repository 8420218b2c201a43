"""The secure broker config beyond tests/test_acl.py (issue 8.8): names, reason codes, what an agent may not do.

Why names matter: the ACL pins agents with ``%u`` patterns
(``pattern write slb/v1/agent/%u/status``). Mosquitto 2.0 itself refuses
usernames with ``#`` or ``+`` — but a username with ``/`` is accepted and
substituted as is. With the old patterns (``slb/v1/agent/%u/#``) a user
called ``agent-b/job`` could read agent-b's jobs and ``agent-b/status`` forge
its presence; the patterns now name every level exactly, so such a name
lands one level too deep (issue 13). ``mosquitto/add-user.sh`` and the
agent's own id check still refuse such names; both are tested here, and the
broker's behaviour is pinned so a change in it is noticed.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.__main__ import main as agent_main
from broker.mqtt.client import InboundMessage, MqttAuthError, MqttPublishRefused
from broker.mqtt.local_broker import SECURE_CONFIG, RunningBroker, free_port, start_broker
from broker.mqtt.settings import MqttSettings
from broker.protocol import Assign, CoordinatorStatus, Status, Topics
from tests.support.loops import mqtt_connection

ROOT = Path(__file__).resolve().parent.parent
ADD_USER = ROOT / "mosquitto" / "add-user.sh"
TOPICS = Topics("slb/v1")
BAD_NAMES = ["agent+x", "agent#", "#", "+", "agent-b/job", "a/b", "with space", "-leading", ".hidden", "x" * 65, ""]
NAMED_USERS = {"coordinator": "coord-pw", "agent-a": "pw-a", "agent-b": "pw-b", "agent-b/job": "pw-slash-job",
               "agent-b/status": "pw-slash-status", "agent+x": "pw-plus", "#": "pw-hash"}


def settings(broker: RunningBroker, user: str | None, password: str | None) -> MqttSettings:
    return MqttSettings(broker_url=broker.url, mqtt_username=user, mqtt_password=password)


@pytest.fixture(scope="module")
def named_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """The secure config with users made by mosquitto_passwd directly, bypassing add-user.sh's name check."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto_passwd is needed (apt-get install mosquitto)")
    folder = tmp_path_factory.mktemp("named-broker")
    password_file = folder / "passwd"
    password_file.touch()
    password_file.chmod(0o600)
    for name, password in NAMED_USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(password_file), name, password], check=True,
                       capture_output=True)
    broker = start_broker(folder, port=free_port(), prefer="mosquitto", config=SECURE_CONFIG,
                          overrides={"password_file": str(password_file)})
    yield broker
    broker.stop()


class Client:
    """An MqttConnection that records what it receives and the CONNACK reason code."""

    def __init__(self, broker: RunningBroker, user: str | None, password: str | None,
                 subscriptions: list[str] | None = None) -> None:
        self.received: queue.Queue[InboundMessage] = queue.Queue()
        self.connack: list[int] = []
        self.connection = mqtt_connection(settings(broker, user, password), f"sec-{time.monotonic_ns()}",
                                          on_message=self.received.put,
                                          subscriptions=[(topic, 1) for topic in subscriptions or []])
        original = self.connection._handle_connect

        def spy(client, userdata, flags, reason_code, properties):  # noqa: ANN001 - paho's signature
            self.connack.append(int(reason_code.value))
            original(client, userdata, flags, reason_code, properties)

        self.connection._client.on_connect = spy
        self.connection.start()

    def topics(self, wait: float = 0.5) -> list[str]:
        time.sleep(wait)  # nothing to wait on: the point is that nothing arrives
        found = []
        while not self.received.empty():
            found.append(self.received.get_nowait().topic)
        return found

    def close(self) -> None:
        self.connection.stop(timeout=0.5)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_add_user_refuses_names_that_break_the_acl(name: str, tmp_path: Path) -> None:
    password_file = tmp_path / "passwd"
    result = subprocess.run(["bash", str(ADD_USER), name, "--password-file", str(password_file)],
                            capture_output=True, text=True, env={**os.environ, "SLB_NEW_PASSWORD": "pw"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NAME" in result.stderr
    assert not password_file.exists() or name not in password_file.read_text()


def test_add_user_accepts_a_plain_name_and_the_broker_lets_it_in(tmp_path: Path) -> None:
    password_file = tmp_path / "passwd"
    result = subprocess.run(["bash", str(ADD_USER), "desk-pc.1", "--password-file", str(password_file)],
                            capture_output=True, text=True, env={**os.environ, "SLB_NEW_PASSWORD": "s3cret"})
    assert result.returncode == 0, result.stderr
    assert password_file.read_text().startswith("desk-pc.1:")
    assert oct(password_file.stat().st_mode & 0o777) == "0o600"
    broker = start_broker(tmp_path / "b", port=free_port(), prefer="mosquitto", config=SECURE_CONFIG,
                          overrides={"password_file": str(password_file)})
    try:
        client = Client(broker, "desk-pc.1", "s3cret")
        try:
            assert client.connection.wait_connected(10)
            assert client.connack == [0]
        finally:
            client.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("name", ["agent+x", "agent#", "a/b", "with space", "x" * 65, "-x"])
def test_agent_refuses_such_an_id_on_the_command_line_and_in_the_environment(
        name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        agent_main([f"--agent-id={name}", "--broker-url", "mqtt://127.0.0.1:9"])
    assert exited.value.code == 2
    assert "agent id" in capsys.readouterr().err
    monkeypatch.setenv("SLB_AGENT_ID", name)
    with pytest.raises(SystemExit) as exited:
        agent_main(["--broker-url", "mqtt://127.0.0.1:9"])
    assert exited.value.code == 2


def test_broker_refuses_a_hash_username_and_gives_a_plus_username_no_pattern_rights(
        named_broker: RunningBroker) -> None:
    hashed = Client(named_broker, "#", NAMED_USERS["#"])
    try:
        with pytest.raises(MqttAuthError):
            hashed.connection.wait_connected(5)
        assert hashed.connack == [0x87]  # v5 "Not authorized"
    finally:
        hashed.close()
    coordinator = Client(named_broker, "coordinator", NAMED_USERS["coordinator"])
    plus = Client(named_broker, "agent+x", NAMED_USERS["agent+x"], [TOPICS.control_of("agentYx"), "slb/v1/#"])
    try:
        assert coordinator.connection.wait_connected(10) and plus.connection.wait_connected(10)
        assert plus.connack == [0]  # let in, but %u patterns are not applied to a name with a wildcard
        coordinator.connection.publish_and_wait(TOPICS.job("agentYx"), b'{"secret": true}')
        for topic in (TOPICS.status("agentYx"), TOPICS.status("agent-a"), "slb/v1/agent/agent/x/status"):
            with pytest.raises(MqttPublishRefused):
                plus.connection.publish_and_wait(topic, Status(state="online"))
        assert plus.topics() == []
    finally:
        coordinator.close()
        plus.close()


def test_a_slash_in_a_username_no_longer_reaches_other_agents_topics(named_broker: RunningBroker) -> None:
    coordinator = Client(named_broker, "coordinator", NAMED_USERS["coordinator"])
    spy = Client(named_broker, "agent-b/job", NAMED_USERS["agent-b/job"], [TOPICS.job("agent-b")])
    forger = Client(named_broker, "agent-b/status", NAMED_USERS["agent-b/status"])
    try:
        for client in (coordinator, spy, forger):
            assert client.connection.wait_connected(10)
        coordinator.connection.publish_and_wait(TOPICS.job("agent-b"), b'{"secret": true}')
        leaked = spy.topics()
        with pytest.raises(MqttPublishRefused):
            forger.connection.publish_and_wait(TOPICS.status("agent-b"), Status(state="offline"))
        # Mosquitto 2.0 substitutes %u as is ("agent-b/job" -> slb/v1/control/agent-b/job/+), but the exact
        # levels of mosquitto/acl put that one level below agent-b's topics. With the old ".../%u/#" patterns
        # the spy read agent-b's job and the forger's publish went through.
        assert leaked == []
    finally:
        for client in (coordinator, spy, forger):
            client.close()


@pytest.mark.parametrize(("user", "password"), [(None, None), ("agent-a", "wrong"), ("nobody", "x"),
                                                ("agent-a", None), ("coordinator", "secret-a")])
def test_refused_logins_carry_the_v5_reason_code(secure_mosquitto, user: str | None, password: str | None) -> None:
    client = Client(secure_mosquitto.broker, user, password)
    try:
        with pytest.raises(MqttAuthError) as refused:
            client.connection.wait_connected(5)
        # Mosquitto 2.0.11 answers 0x87 "Not authorized" for all of these; 0x86 "Bad user name or password"
        # is what other brokers use. Both stop our client with a message instead of retrying forever.
        assert client.connack == [0x87] or client.connack == [0x86], client.connack
        assert ("not authorized" if client.connack == [0x87] else "bad user name") in str(refused.value)
        assert client.connection.connect_count == 0
    finally:
        client.close()


def test_an_agent_cannot_drive_the_cluster_or_read_other_answers(secure_mosquitto) -> None:
    users = secure_mosquitto.users
    agent_a = Client(secure_mosquitto.broker, "agent-a", users["agent-a"],
                     [TOPICS.all_agents(), "slb/v1/agent/agent-b/#", "slb/v1/control/+/job", "#"])
    agent_b = Client(secure_mosquitto.broker, "agent-b", users["agent-b"])
    observer = Client(secure_mosquitto.broker, "coordinator", users["coordinator"], ["slb/v1/#"])
    try:
        for client in (agent_a, agent_b, observer):
            assert client.connection.wait_connected(10)
        forged = [
            (TOPICS.job("agent-a"), b'{"forged": "its own job"}'),
            (TOPICS.assign("agent-b"), Assign(model="x", assignment_id="evil")),
            (TOPICS.cancel("agent-b"), b'{"request_id": "r1"}'),
            (TOPICS.coordinator_status(), CoordinatorStatus(state="offline")),
            ("slb/v1/elsewhere", b"x"),
        ]
        for topic, payload in forged:
            with pytest.raises(MqttPublishRefused) as refused:
                agent_a.connection.publish_and_wait(topic, payload)
            assert refused.value.reason_code == 0x87, topic
        agent_b.connection.publish_and_wait(TOPICS.result("agent-b"), b'{"private": "answer"}')
        agent_b.connection.publish_and_wait(TOPICS.telemetry("agent-b"), b'{"v": 1}')
        assert agent_a.topics() == []  # not even its own topics: agents write them, they do not read them
        seen = set(observer.topics(0.1))
        assert TOPICS.result("agent-b") in seen
        assert not seen & {topic for topic, _ in forged}
    finally:
        for client in (agent_a, agent_b, observer):
            client.close()


def add_user(*args: str, password: str = "pw") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ADD_USER), *args], capture_output=True, text=True,
                          env={**os.environ, "SLB_NEW_PASSWORD": password})


def test_add_user_will_not_create_or_reset_the_coordinator_without_the_flag(tmp_path: Path) -> None:
    """Issue 13.10: ``add-user.sh coordinator`` silently created (or reset) the all-powerful user."""
    lan, coordinators = tmp_path / "passwd", tmp_path / "coordinator.passwd"
    refused = add_user("coordinator", "--password-file", str(lan))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--coordinator" in refused.stderr and "full access" in refused.stderr
    assert not lan.exists() and not coordinators.exists()

    created = add_user("coordinator", "--coordinator", "--password-file", str(lan), password="first")
    assert created.returncode == 0, created.stderr
    # The LAN listener's file and the coordinator listener's own file (next to it) both hold it.
    assert lan.read_text().startswith("coordinator:") and coordinators.read_text().startswith("coordinator:")
    assert oct(coordinators.stat().st_mode & 0o777) == "0o600"
    assert "created user 'coordinator'" in created.stdout and str(coordinators) in created.stdout
    before = coordinators.read_text()
    reset = add_user("coordinator", "--coordinator", "--password-file", str(lan), password="second")
    assert reset.returncode == 0 and "reset the password of user 'coordinator'" in reset.stdout
    assert coordinators.read_text() != before

    agent = add_user("desk-pc", "--password-file", str(lan))
    assert agent.returncode == 0 and "created user 'desk-pc'" in agent.stdout
    assert "desk-pc" not in coordinators.read_text()  # agents never get onto the coordinator listener


@pytest.mark.parametrize("name", ["coordinator-main-123-1", "coordinator-x"])
def test_add_user_keeps_the_coordinators_client_ids_free(name: str, tmp_path: Path) -> None:
    """On the LAN listener a client id is the username; coordinator-* ids belong to the coordinator listener."""
    result = add_user(name, "--password-file", str(tmp_path / "passwd"))
    assert result.returncode == 2 and "coordinator-" in result.stderr
    assert not (tmp_path / "passwd").exists()

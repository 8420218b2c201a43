"""Shared fixtures: real Mosquitto brokers (plain and secure), the embedded broker, unique topic prefixes.

Every integration test talks to a real broker started here on a free port
from ``mosquitto/``'s config; each test gets its own topic prefix so retained
messages never leak between tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from broker.mqtt.client import MqttConnection  # noqa: E402
from broker.mqtt.local_broker import RunningBroker, free_port, mosquitto_binary, start_broker  # noqa: E402
from broker.mqtt.settings import MqttSettings  # noqa: E402
from tests.support.brokers import start_secure_broker  # noqa: E402
from tests.support.loops import mqtt_connection  # noqa: E402
from tests.support.postgres import postgres_server, postgres_url  # noqa: E402,F401 - fixtures

SECURE_USERS = {"coordinator": "coord-secret", "agent-a": "secret-a", "agent-b": "secret-b"}


SLOW_FILES_FIRST = (
    "test_real_runtime.py", "test_fuzz_topics.py", "test_coordinator_integration.py", "test_shared_documents.py",
    "test_web_hardening.py", "test_ui_browser.py", "test_faults_broker.py", "test_ui_rendering_browser.py",
    "test_sessions_postgres.py", "test_rabbitmq.py", "test_agent.py", "test_app_models_live.py",
    "test_faults_agent_kill.py", "test_structured_output.py", "test_run_all_supervision.py",
)
"""The longest test files (summed durations of an idle 2-worker run, longest first). ``--dist loadfile
--no-loadscope-reorder`` (scripts/test.sh) hands files to workers in collection order, so starting these first
keeps one worker from running a long file alone at the end (the suite must stay under 15 minutes on 2 cores);
without ``--no-loadscope-reorder`` xdist orders files by their number of tests instead."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other files keep their order


def _require_mosquitto() -> None:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; run the README's test command (scripts/test.sh) which installs it")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A real Mosquitto from mosquitto/mosquitto.conf on a free port, for the whole session."""
    _require_mosquitto()
    broker = start_broker(tmp_path_factory.mktemp("mosquitto"), port=free_port(), prefer="mosquitto")
    yield broker
    broker.stop()


@pytest.fixture()
def own_mosquitto(tmp_path: Path) -> Iterator[RunningBroker]:
    """A Mosquitto of this test's own, for tests that kill or restart the broker."""
    _require_mosquitto()
    broker = start_broker(tmp_path / "broker", port=free_port(), prefer="mosquitto")
    yield broker
    broker.stop()


@dataclass
class SecureBroker:
    broker: RunningBroker
    users: dict[str, str]

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="session")
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """Mosquitto from mosquitto/mosquitto.secure.conf with real users in a password file and the real ACL."""
    _require_mosquitto()
    broker = start_secure_broker(tmp_path_factory.mktemp("secure-mosquitto"), SECURE_USERS)
    yield SecureBroker(broker, dict(SECURE_USERS))
    broker.stop()


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """The embedded amqtt broker (MQTT 3.1.1 only)."""
    broker = start_broker(tmp_path_factory.mktemp("embedded"), port=free_port(), prefer="embedded")
    yield broker
    broker.stop()


@pytest.fixture()
def topic_prefix() -> str:
    """A topic prefix of this test's own."""
    return f"slbtest/{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture()
def mqtt_settings(mosquitto: RunningBroker, topic_prefix: str, tmp_path: Path) -> MqttSettings:
    """Settings pointing at the session Mosquitto with this test's prefix."""
    return MqttSettings(broker_url=mosquitto.url, topic_prefix=topic_prefix, data_dir=tmp_path / "data")


@pytest.fixture()
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[..., MqttConnection]]:
    """Factory: ``connect(settings, client_id, **kwargs)`` starts an MqttConnection and stops it at teardown.

    Its callbacks run on the shared background loop of ``tests/support/loops.py``.
    """
    made: list[MqttConnection] = []

    def factory(settings: MqttSettings, client_id: str | None = None, *, wait: bool = True, **kwargs: object):
        connection = mqtt_connection(
            settings, client_id or f"test-{uuid.uuid4().hex[:8]}", on_message=kwargs.pop("on_message", lambda m: None),
            **kwargs,
        )
        made.append(connection)
        connection.start()
        if wait:
            assert connection.wait_connected(10), "MQTT connection did not come up"
        return connection

    yield factory
    for connection in made:
        try:
            connection.stop(timeout=1)
        except Exception:  # noqa: BLE001 - a test may have stopped or broken it already; teardown goes on
            pass

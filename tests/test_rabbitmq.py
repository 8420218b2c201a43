"""The cluster on RabbitMQ's MQTT plugin (3.10, Debian's package): explicit state recovery (issue 16, 3b).

RabbitMQ replays a retained message only to a subscription naming its topic exactly, and only from the node
that received it; a wildcard subscription (the coordinator's ``agent/+/+``) gets none. So a coordinator
restarted while agents run, and an agent restarted while the coordinator runs, must not wait for retained
messages: agents re-publish their state when a coordinator's birth message arrives, and the coordinator
re-sends an agent its assignment when the agent comes online (docs/protocol.md, "State recovery").

One two-node cluster serves the module (a node boots in seconds when idle, far longer on a busy box): the
single-node checks put everyone on the first node, the cluster checks put the agent on the first and the
coordinator on the second. Agents are real ``python -m agent`` processes (simulated backend); the coordinator
runs in the test, as the web app runs it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.coordinator.contract import QueryFinished, QueryRequest
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage, MqttConnection
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage, ModelState, Topics, decode
from tests.support import rabbitmq
from tests.support.loops import mqtt_connection
from tests.support.processes import REPO, AgentProcess, child_env
from tests.support.processes import wait_until_async as wait_until
from tests.support.rabbitmq import RabbitCluster, RabbitNode

pytestmark = pytest.mark.slow

PROFILES = REPO / "agent" / "profiles"
TELEMETRY_S = 1.0
"""The agents' telemetry interval: a restarted coordinator must see them ready within one."""
AGENT_START_S = 60.0
"""A fresh ``python -m agent`` imports for seconds on an idle machine; the test box is shared."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Two clustered RabbitMQ nodes with the MQTT plugin, for the whole module."""
    if not rabbitmq.available():
        pytest.fail("RabbitMQ is not installed: apt-get install rabbitmq-server (scripts/install.sh --dev does)")
    with rabbitmq.rabbitmq_cluster(tmp_path_factory.mktemp("rabbitmq"), size=2) as made:
        print(f"\nRabbitMQ: nodes up in {', '.join(f'{node.started_in_s:.1f}' for node in made.nodes)} s "
              f"(side by side), joined in {made.joined_in_s:.1f} s")
        yield made


class Agents:
    """Real agent processes on a chosen node; all stopped at teardown."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self.started: list[AgentProcess] = []

    def start(self, node: RabbitNode, agent_id: str, profile: str = "laptop") -> AgentProcess:
        log = self.folder / f"{agent_id}-{len(self.started)}.log"
        command = [
            sys.executable, "-m", "agent", "--broker-url", node.url, "--topic-prefix", self.prefix,
            "--agent-id", agent_id, "--backend", "simulated", "--hardware-profile", str(PROFILES / f"{profile}.json"),
            "--sim-tokens-per-s", "200", "--sim-ttft-ms", "20", "--sim-pull-s", "0.2",
            "--telemetry-interval-s", str(TELEMETRY_S), "--benchmark-tokens", "4",
            "--data-dir", str(self.folder / agent_id), "--log-level", "INFO",
        ]
        with log.open("wb") as output:
            process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        handle = AgentProcess(agent_id, process, log)
        self.started.append(handle)
        return handle

    def logs(self) -> str:
        return "\n".join(f"--- {handle.log_path.name}\n{handle.log(3000)}" for handle in self.started)

    def stop_all(self) -> None:
        for handle in self.started:
            handle.signal(signal.SIGTERM)
        for handle in self.started:
            handle.stop(timeout=5)


@pytest.fixture()
def agents(tmp_path: Path, topic_prefix: str) -> Iterator[Agents]:
    made = Agents(tmp_path, topic_prefix)
    yield made
    made.stop_all()


class Coordinators:
    """Coordinators (what the web app runs) on a chosen node; stopped at teardown."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self.running: list[Coordinator] = []

    async def start(self, node: RabbitNode) -> Coordinator:
        settings = CoordinatorSettings(broker_url=node.url, topic_prefix=self.prefix, data_dir=self.folder / "app",
                                       replan_debounce_s=0.3, expected_output_tokens=16, admission_wait_s=10.0)
        coordinator = Coordinator(settings)
        await coordinator.start()
        self.running.append(coordinator)
        assert await coordinator.wait_connected(30), "the coordinator did not connect to RabbitMQ"
        return coordinator

    async def stop(self, coordinator: Coordinator) -> None:
        self.running.remove(coordinator)
        await coordinator.stop()


@pytest.fixture()
async def coordinators(tmp_path: Path, topic_prefix: str) -> AsyncIterator[Coordinators]:
    made = Coordinators(tmp_path, topic_prefix)
    yield made
    for coordinator in list(made.running):
        await coordinator.stop()


class ModelWatch:
    """Every live ``model`` message of the agents, read on one node (wildcard subscriptions do get live ones)."""

    def __init__(self, node: RabbitNode, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.seen: list[tuple[str, ModelState]] = []
        self.connection: MqttConnection = mqtt_connection(
            MqttSettings(broker_url=node.url, topic_prefix=prefix), f"model-watch-{prefix.replace('/', '-')}",
            subscriptions=[(f"{prefix}/agent/+/model", 1)], on_message=self._on_message)

    def _on_message(self, message: InboundMessage) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is not None and parsed[1] is not None and message.payload:
            self.seen.append((parsed[1], decode(ModelState, message.payload)))

    def ready_with(self, agent_id: str, since: int = 0) -> ModelState | None:
        """The first ``ready`` state of ``agent_id`` reported after the ``since``-th message."""
        return next((state for name, state in self.seen[since:] if name == agent_id and state.state == "ready"), None)


@pytest.fixture()
def model_watch(cluster: RabbitCluster, topic_prefix: str) -> Iterator[Callable[[RabbitNode], ModelWatch]]:
    made: list[ModelWatch] = []

    def factory(node: RabbitNode) -> ModelWatch:
        watch = ModelWatch(node, topic_prefix)
        watch.connection.start()
        assert watch.connection.wait_connected(30)
        made.append(watch)
        return watch

    yield factory
    for watch in made:
        watch.connection.stop()


def ready_model(coordinator: Coordinator, agent_id: str) -> str | None:
    return next((agent.model for agent in coordinator.snapshot().agents
                 if agent.id == agent_id and agent.online and agent.model_state == "ready"), None)


def online(coordinator: Coordinator, agent_id: str) -> bool:
    return any(agent.id == agent_id and agent.online for agent in coordinator.snapshot().agents)


def assignments(coordinator: Coordinator) -> float:
    return coordinator.metrics.registry.get_sample_value("slb_assignments_total") or 0.0


async def answer(coordinator: Coordinator, agent_id: str, text: str) -> QueryFinished:
    request = QueryRequest(messages=[ChatMessage(role="user", content=text)])
    events = [event async for event in coordinator.query(request)]
    final = events[-1]
    assert isinstance(final, QueryFinished), events
    assert final.agents == [agent_id] and text in final.text, final
    return final


async def recovers_both_ways(agents: Agents, coordinators: Coordinators,
                             model_watch: Callable[[RabbitNode], ModelWatch], *, agent_node: RabbitNode,
                             app_node: RabbitNode) -> dict[str, float]:
    """Agent on ``agent_node``, coordinator on ``app_node``: it answers; a restarted coordinator sees the agent ready
    within one telemetry interval, changes no assignment, and answers; a restarted agent gets its assignment back
    and answers. Returns the times measured."""
    agent_id = "rabbit-laptop"
    watch = model_watch(agent_node)
    agents.start(agent_node, agent_id)
    coordinator = await coordinators.start(app_node)
    model = await wait_until(lambda: ready_model(coordinator, agent_id), AGENT_START_S, "the agent ready",
                             agents.logs)
    await answer(coordinator, agent_id, "first question")
    assigned = watch.ready_with(agent_id)
    assert assigned is not None and assigned.assignment_id is not None

    # The app restarts while the agent runs: nothing retained reaches its wildcard subscriptions.
    await coordinators.stop(coordinator)
    starting = time.monotonic()
    coordinator = await coordinators.start(app_node)
    await wait_until(lambda: ready_model(coordinator, agent_id) == model, TELEMETRY_S,
                     "the restarted coordinator to see the agent ready within one telemetry interval", agents.logs)
    app_restart_s = time.monotonic() - starting  # from the start of the new coordinator, its connect included
    await answer(coordinator, agent_id, "second question")
    assert assignments(coordinator) == 0, "the restarted coordinator re-assigned an agent whose model stays"

    # The agent restarts (kill -9: its will tells the coordinator): it must get the same assignment back.
    seen_before = len(watch.seen)
    agents.started[-1].kill()
    await wait_until(lambda: not online(coordinator, agent_id), 30, "the coordinator to see the agent's will")
    restarted = time.monotonic()
    agents.start(agent_node, agent_id)
    state = await wait_until(lambda: watch.ready_with(agent_id, seen_before), AGENT_START_S,
                             "the restarted agent ready", agents.logs)
    agent_restart_s = time.monotonic() - restarted
    assert (state.model, state.assignment_id) == (assigned.model, assigned.assignment_id)
    await wait_until(lambda: ready_model(coordinator, agent_id) == model, 10, "the coordinator to see it ready")
    await answer(coordinator, agent_id, "third question")
    assert assignments(coordinator) == 0
    # Asked the moment a restarted coordinator has connected (nothing retained reaches it here): the query waits
    # for the agents' re-published state (state_wait_s) rather than failing "no agent is online".
    await coordinators.stop(coordinator)
    coordinator = await coordinators.start(app_node)
    await answer(coordinator, agent_id, "fourth question, at once")
    times = {"app_restart_to_ready_s": app_restart_s, "agent_restart_to_ready_s": agent_restart_s}
    print(f"\n{agent_node.name} / {app_node.name}: " + ", ".join(f"{key} {value:.2f}" for key, value in times.items()))
    return times


def test_rabbitmq_replays_retained_only_to_exact_subscriptions_on_the_same_node(cluster: RabbitCluster,
                                                                                topic_prefix: str) -> None:
    """The broker behaviour this module is about; if RabbitMQ ever replays to wildcards, the docs must change."""
    first, second = cluster.nodes
    topic = Topics(topic_prefix).status("probe")
    received: dict[str, list[bytes]] = {}

    def subscriber(node: RabbitNode, name: str, subscription: str) -> MqttConnection:
        received[name] = []
        connection = mqtt_connection(MqttSettings(broker_url=node.url), f"probe-{name}-{topic_prefix[8:18]}",
                                     subscriptions=[(subscription, 1)],
                                     on_message=lambda message: received[name].append(message.payload))
        connection.start()
        assert connection.wait_connected(30)
        return connection

    publisher = subscriber(first, "publisher", f"{topic_prefix}/nothing")
    assert publisher.protocol == "3.1.1"  # RabbitMQ 3.10 refuses MQTT 5; the client fell back by itself
    assert publisher.publish_and_wait(topic, b"retained", qos=1, retain=True, timeout=10) == 0
    connections = [publisher,
                   subscriber(first, "exact-same-node", topic),
                   subscriber(first, "wildcard-same-node", f"{topic_prefix}/agent/+/+"),
                   subscriber(second, "exact-other-node", topic)]
    try:
        time.sleep(1.0)
        assert received["exact-same-node"] == [b"retained"]
        assert received["wildcard-same-node"] == []
        assert received["exact-other-node"] == []
        publisher.publish_and_wait(topic, b"live", qos=1, retain=True, timeout=10)
        time.sleep(0.5)
        assert received["wildcard-same-node"] == [b"live"] and received["exact-other-node"] == [b"live"]
    finally:
        for connection in connections:
            connection.stop()


async def test_one_node_app_and_agent_restarts_recover(cluster: RabbitCluster, agents: Agents,
                                                       coordinators: Coordinators, model_watch: Any) -> None:
    first = cluster.nodes[0]
    await recovers_both_ways(agents, coordinators, model_watch, agent_node=first, app_node=first)


async def test_two_node_cluster_agent_on_one_app_on_the_other_recover(cluster: RabbitCluster, agents: Agents,
                                                                      coordinators: Coordinators,
                                                                      model_watch: Any) -> None:
    first, second = cluster.nodes
    assert cluster.running_nodes(second) == sorted(node.name for node in cluster.nodes)
    await recovers_both_ways(agents, coordinators, model_watch, agent_node=first, app_node=second)

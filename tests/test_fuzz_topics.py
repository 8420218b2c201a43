"""Hostile traffic on every topic the coordinator and the agent subscribe to (issue 8.5).

Hypothesis feeds random and adversarial payloads straight into the message
handlers (5,000 examples each, 10,000 in all), then a smaller batch goes
through the real broker. What must hold: no exception escapes a handler, the
views (snapshot, plan, routing) survive whatever state the traffic left, the
MQTT network thread stays alive, the process still does its job afterwards,
and replaying the same traffic does not grow memory (tracemalloc).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings

from agent.agent import Agent
from agent.settings import AgentSettings
from broker.coordinator.contract import QueryRequest
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.mqtt.client import InboundMessage, MqttConnection
from broker.mqtt.local_broker import RunningBroker
from broker.mqtt.settings import MqttSettings
from broker.protocol import Assign, ChatMessage, Status, TopicKind
from tests.chaos.payloads import topic_and_payload
from tests.support.loops import AgentThread, mqtt_connection
from tests.test_agent_harness import Watcher

pytestmark = pytest.mark.slow

EXAMPLES_PER_SIDE = int(os.environ.get("SLB_FUZZ_EXAMPLES", "2000"))  # a deeper run: SLB_FUZZ_EXAMPLES=20000
CORPUS_SIZE = 400
BROKER_BATCH = 200
MEMORY_SLACK_BYTES = 256 * 1024
FUZZ = settings(max_examples=EXAMPLES_PER_SIDE, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
PROBE = QueryRequest(messages=[ChatMessage(role="user", content="probe")])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Every dropped payload is logged; 10,000 warnings would only slow the run and fill the capture."""
    names = ("broker", "agent", "paho")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def network_thread_alive(connection: MqttConnection | None) -> bool:
    """paho runs on the owner's loop (no thread): alive means its socket is still registered there."""
    return connection is not None and connection.running


async def memory_growth(deliver: Callable[[str, bytes], None], corpus: list[tuple[str, bytes]],
                        settle: Callable[[], object]) -> int:
    """Replay ``corpus`` three times; the growth between the second and third round (bytes)."""
    sizes = []
    tracemalloc.start()
    try:
        for _ in range(3):
            for topic, payload in corpus:
                deliver(topic, payload)
            result = settle()
            if asyncio.iscoroutine(result):
                await result
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    return sizes[2] - sizes[1]


def publish_batch(settings_: MqttSettings, corpus: list[tuple[str, bytes]]) -> int:
    """Send hostile traffic through the real broker; topics paho itself refuses (wildcards) are skipped."""
    publisher = mqtt_connection(settings_, f"fuzzer-{time.monotonic_ns()}", on_message=lambda message: None)
    publisher.start()
    sent = 0
    try:
        assert publisher.wait_connected(10)
        tickets = []
        for topic, payload in corpus:
            try:
                tickets.append(publisher.publish(topic, payload, qos=1))
            except ValueError:
                continue
            sent += 1
        for ticket in tickets:
            with contextlib.suppress(Exception):  # a refused or unacknowledged hostile message is the point
                ticket.wait(10)
    finally:
        publisher.stop(timeout=1)
    return sent


@pytest.mark.timeout(300)
async def test_coordinator_survives_hostile_traffic(mosquitto: RunningBroker, topic_prefix: str,
                                                    tmp_path: Path) -> None:
    coordinator = Coordinator(CoordinatorSettings(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                                  data_dir=tmp_path, replan_debounce_s=0.05))
    await coordinator.start()
    try:
        assert await coordinator.wait_connected(10)
        corpus: list[tuple[str, bytes]] = []
        examples = 0

        def deliver(topic: str, payload: bytes) -> None:
            coordinator._on_message(InboundMessage(topic, payload, 1, False))

        @FUZZ
        @given(topic_and_payload(coordinator.topics, side="coordinator"))
        def feed(pair: tuple[str, bytes]) -> None:
            nonlocal examples
            examples += 1
            deliver(*pair)
            # What the UI and the router read must survive any state the traffic leaves behind.
            coordinator.snapshot()
            coordinator.plan()
            candidates = coordinator._execution.candidates(None, frozenset(), PROBE)
            if candidates:
                coordinator._execution.router.choose(candidates, 40)
            if len(corpus) < CORPUS_SIZE:
                corpus.append(pair)

        with quiet():
            feed()
            await asyncio.sleep(0.3)  # debounced re-plans run on the loop
            assert examples >= EXAMPLES_PER_SIDE
            housekeeping = coordinator._housekeeping
            assert housekeeping is not None and not housekeeping.done()
            # feed() held the loop that drives paho for the whole run: if that outlasted 1.5 x keepalive the
            # broker dropped the connection, and the coordinator must be back within moments.
            assert await coordinator.wait_connected(15)
            assert network_thread_alive(coordinator._connection) and coordinator.connected
            growth = await memory_growth(deliver, corpus, lambda: asyncio.sleep(0.2))
            assert growth < MEMORY_SLACK_BYTES, f"memory grew {growth} bytes replaying the same traffic"

            settings_ = MqttSettings(broker_url=mosquitto.url, topic_prefix=topic_prefix)
            sent = await asyncio.to_thread(publish_batch, settings_, corpus[:BROKER_BATCH])
            assert sent > BROKER_BATCH // 2
            marker = mqtt_connection(settings_, "fuzz-marker", on_message=lambda message: None)
            marker.start()
            try:
                assert await asyncio.to_thread(marker.wait_connected, 10)
                await asyncio.to_thread(marker.publish_and_wait, coordinator.topics.status("fuzz-final"),
                                        Status(state="online"))
            finally:
                marker.stop(timeout=1)
            deadline = time.monotonic() + 30
            while not any(agent.id == "fuzz-final" and agent.online for agent in coordinator.snapshot().agents):
                assert time.monotonic() < deadline, "the coordinator stopped taking messages from the broker"
                await asyncio.sleep(0.05)
            assert network_thread_alive(coordinator._connection) and coordinator.connected
            assert not housekeeping.done()
    finally:
        await coordinator.stop()


@pytest.mark.timeout(300)
async def test_agent_survives_hostile_traffic(mosquitto: RunningBroker, topic_prefix: str, tmp_path: Path) -> None:
    agent_id = "fuzz-agent"
    agent = Agent(AgentSettings(
        broker_url=mosquitto.url, topic_prefix=topic_prefix, agent_id=agent_id, backend="simulated",
        data_dir=tmp_path / agent_id, sim_tokens_per_s=50_000, sim_ttft_ms=0, sim_pull_s=0, benchmark_tokens=0,
        telemetry_interval_s=0.5,
    ))
    settings_ = MqttSettings(broker_url=mosquitto.url, topic_prefix=topic_prefix)
    watcher = Watcher(settings_, topic_prefix)
    runner = AgentThread(agent)
    assert await asyncio.to_thread(runner.start, 20)
    loop = agent._loop
    assert loop is not None

    async def call(message: InboundMessage) -> None:
        agent._on_message(message)

    def deliver(topic: str, payload: bytes) -> None:
        asyncio.run_coroutine_threadsafe(call(InboundMessage(topic, payload, 1, False)), loop).result(10)

    def idle() -> bool:
        jobs = agent.jobs
        return jobs is not None and jobs.running == 0 and jobs.queued == 0

    async def settle() -> None:
        deadline = time.monotonic() + 60
        while not idle():
            assert time.monotonic() < deadline, "jobs from the fuzz traffic never finished"
            await asyncio.sleep(0.05)

    def serve_probe(request_id: str) -> None:
        """Assign a known model again (the traffic assigned nonsense) and check a real job is answered."""
        watcher.publish(watcher.topics.assign(agent_id), Assign(model="llama3.2:1b", assignment_id=request_id),
                        retain=True)
        watcher.wait_for(TopicKind.MODEL, agent_id, lambda m: m.state == "ready" and m.assignment_id == request_id,
                         timeout=30, what="model ready again")
        since = watcher.mark()
        watcher.send_job(agent_id, request_id, "are you still there")
        chunks = watcher.wait_answer(request_id, timeout=30, since=since)
        assert chunks[-1].error is None and "".join(chunk.delta for chunk in chunks), chunks[-1]

    try:
        await asyncio.to_thread(serve_probe, "before")
        corpus: list[tuple[str, bytes]] = []
        examples = 0

        job_topic = agent.topics.job(agent_id)

        def job(request_id: str, deadline: str, num_predict: int) -> bytes:
            return (f'{{"request_id": "{request_id}", "model": "llama3.2:1b", "deadline": {deadline}, '
                    f'"messages": [{{"role": "user", "content": "x"}}], "options": {{"num_predict": {num_predict}}}}}'
                    ).encode()

        @FUZZ
        @given(topic_and_payload(agent.topics, side="agent", own_id=agent_id))
        # What fuzzing found once, kept as fixed examples:
        @example((job_topic, b"[" * 20000))  # RecursionError escaped the bad-job handler
        @example((job_topic, job("huge", str(time.time() + 30), 2**31)))  # the simulated backend hung
        @example((job_topic, job("nan", "NaN", 8)))  # a NaN timer in the agent's event loop
        def feed(pair: tuple[str, bytes]) -> None:
            nonlocal examples
            examples += 1
            deliver(*pair)
            if len(corpus) < CORPUS_SIZE:
                corpus.append(pair)

        with quiet():
            await asyncio.to_thread(feed)
            assert examples >= EXAMPLES_PER_SIDE
            jobs = agent.jobs
            logging.getLogger(__name__).warning("fuzzed jobs run to the end: %d", jobs.completed if jobs else 0)
            # About one example in 100 is a well-formed job that runs to its end (20 of 5,000 at the least).
            assert jobs is not None and jobs.completed >= EXAMPLES_PER_SIDE // 250, (
                f"too few fuzzed jobs ran to the end to mean much ({jobs.completed if jobs else 0})")
            assert runner.alive()
            assert network_thread_alive(agent.connection) and agent.connection is not None
            await settle()
            growth = await memory_growth(deliver, corpus, settle)
            assert growth < MEMORY_SLACK_BYTES, f"memory grew {growth} bytes replaying the same traffic"
            sent = await asyncio.to_thread(publish_batch, settings_, corpus[:BROKER_BATCH])
            assert sent > BROKER_BATCH // 2
            await asyncio.to_thread(serve_probe, "after")  # in order after the batch: everything was handled
            assert runner.alive() and network_thread_alive(agent.connection)
            assert agent.connection.connected
    finally:
        await asyncio.to_thread(runner.stop, 10)
        watcher.close()

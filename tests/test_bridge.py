"""Two sites: agents on a second Mosquitto bridged to the main one with ``mosquitto/bridge.conf.example`` as shipped.

The coordinator connects to the main broker, the agents (real processes on the Ollama double) to the second
one. The bridge reaches the main broker through a TCP relay of this test's own, so the link can be cut the way
a WAN link fails: first it goes deaf one way (the main broker's acknowledgements are lost, so the second site
sends its unacknowledged results again after the reconnect: duplicates on purpose), then it drops. Jobs sent
while it is down wait on the main broker. Every answer must still be exact, and every job must have run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.coordinator.contract import AgentSwitched, AnswerRestarted, QueryFinished
from broker.mqtt.client import InboundMessage
from broker.mqtt.local_broker import MOSQUITTO_DIR, RunningBroker, free_port, mosquitto_binary, start_broker
from broker.mqtt.settings import MqttSettings
from tests.chaos.harness import Cluster, QueryOutcome
from tests.ollama_double import OllamaDouble
from tests.support.processes import wait_until, wait_until_async

logger = logging.getLogger(__name__)
BRIDGE_EXAMPLE = MOSQUITTO_DIR / "bridge.conf.example"
TELEMETRY_S = 1.5
"""Agents' telemetry interval: the coordinator declares them gone after 3 of these without telemetry, longer than
the cut below, so the cut tests the bridge's redelivery and the coordinator's dedupe, not a failover."""
CUT_S = 1.2


class LinkRelay:
    """A TCP relay between the bridge and the main broker that can go deaf one way, or down, on command."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = True
        self.deaf_downstream = False  # drop what the main broker sends (its PUBACKs, jobs)
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="link-relay", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if downstream and self.deaf_downstream:
                    continue
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def cut(self) -> None:
        """The link drops: every connection closes, new ones are refused until :meth:`restore`."""
        self.up = False
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for end in sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.deaf_downstream = False
        self.up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


def site_bridge_config(prefix: str, relay_port: int) -> str:
    """The shipped example, for this test's topic prefix, pointed at the relay, reconnecting after 1–2 s."""
    text = BRIDGE_EXAMPLE.read_text().replace("slb/v1/", f"{prefix}/")
    lines = []
    for line in text.splitlines():
        if line.startswith("address "):
            line = f"address 127.0.0.1:{relay_port}"
        elif line.startswith("restart_timeout "):
            line = "restart_timeout 1 2"  # Mosquitto 2.0 ignores a lone value: 5 s
        elif line.startswith(("remote_clientid ", "local_clientid ")):
            line = f"{line}-{prefix.split('/')[1]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture()
def sites(tmp_path: Path) -> Iterator[tuple[RunningBroker, RunningBroker, LinkRelay, str]]:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; run the README's test command (scripts/test.sh) which installs it")
    prefix = f"slbtest/{uuid.uuid4().hex[:10]}/v1"
    main = start_broker(tmp_path / "main", port=free_port(), prefer="mosquitto")
    relay = LinkRelay(main.port)
    site = start_broker(tmp_path / "site", port=free_port(), prefer="mosquitto",
                        extra_config=site_bridge_config(prefix, relay.port))
    try:
        yield main, site, relay, prefix
    finally:
        site.stop()
        relay.close()
        main.stop()


@pytest.fixture()
async def bridged(sites: tuple[RunningBroker, RunningBroker, LinkRelay, str], tmp_path: Path,
                  ) -> AsyncIterator[tuple[Cluster, RunningBroker, LinkRelay, str]]:
    main, site, relay, prefix = sites
    with OllamaDouble(models=["llama3.2:3b"], tokens_per_s=25, reply_tokens=40, num_parallel=8) as double:
        cluster = Cluster(site.url, prefix, tmp_path / "cluster", double=double, telemetry_s=TELEMETRY_S)
        try:
            for name in ("site-a", "site-b"):
                cluster.spawn(name)
            await cluster.start_coordinator(broker_url=main.url, stall_between_chunks_s=6.0)
            await cluster.wait_ready(2, timeout=60)
            yield cluster, main, relay, prefix
        finally:
            await cluster.close()


@pytest.mark.timeout(120)
async def test_agents_behind_a_bridge_answer_exactly_once_across_a_dropped_link(
    bridged: tuple[Cluster, RunningBroker, LinkRelay, str], connect,
) -> None:
    cluster, main, relay, prefix = bridged
    assert relay.connections >= 1, "the second site's bridge never reached the main broker"
    chunks: Counter[tuple[str, int]] = Counter()

    def count_chunk(message: InboundMessage) -> None:
        payload = json.loads(message.payload)
        chunks[(payload["request_id"], payload["seq"])] += 1

    connect(MqttSettings(broker_url=main.url, topic_prefix=prefix), on_message=count_chunk,
            subscriptions=[(f"{prefix}/agent/+/result", 1)])

    prompts = [f"bridge question {index} {uuid.uuid4().hex[:6]}" for index in range(6)]
    tasks = [asyncio.create_task(cluster.run_query(cluster.request(prompt, timeout_s=60))) for prompt in prompts[:4]]
    # Mid-stream: every one of the first four answers has started streaming at the coordinator.
    def streaming() -> bool:
        return len(chunks) >= 8 and len({request for request, _ in chunks}) >= 4

    await wait_until_async(streaming, 30, "four answers streaming through the bridge", cluster.describe)
    relay.deaf_downstream = True  # the main broker's PUBACKs are lost: the site will send those results again
    await asyncio.sleep(0.4)
    relay.cut()
    cut_at = time.monotonic()
    tasks += [asyncio.create_task(cluster.run_query(cluster.request(prompt, timeout_s=60))) for prompt in prompts[4:]]
    await asyncio.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
    relay.restore()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    started: dict[str, QueryOutcome] = {outcome.request.messages[-1].content: outcome for outcome in outcomes}

    duplicates = sum(count - 1 for count in chunks.values() if count > 1)
    assert relay.connections >= 2, "the bridge did not reconnect after the link came back"
    assert duplicates > 0, "the dropped link delivered no result twice: the dedupe was not exercised"
    for prompt, outcome in started.items():
        assert isinstance(outcome.final, QueryFinished), f"{prompt}: {outcome.verdict()}\n{cluster.describe()}"
        assert outcome.streamed == outcome.expected, f"{prompt}: text differs (duplicated or lost chunks)"
        assert not [e for e in outcome.events if isinstance(e, AgentSwitched | AnswerRestarted)], \
            f"{prompt}: failed over, so the link drop was not survived as it should be"
    ran = Counter(prompt for prompt in cluster.double.stats.arrived if prompt in started)
    assert ran == Counter(prompts), f"each job must run exactly once on the agents: {ran}"

    # kill -9 of an agent at the second site: its last will crosses the bridge, retained, to the main broker.
    victim = cluster.agents["site-a"]
    killed_at = victim.kill()
    await wait_until_async(lambda: not cluster.is_online("site-a"), 10, "site-a offline at the app", cluster.describe)
    logger.info("site-a offline at the app %.2f s after kill -9; %d result chunk(s) delivered twice across the "
                "dropped link", time.monotonic() - killed_at, duplicates)
    statuses: list[dict[str, object]] = []
    connect(MqttSettings(broker_url=main.url, topic_prefix=prefix),
            on_message=lambda message: statuses.append(json.loads(message.payload)),
            subscriptions=[(f"{prefix}/agent/site-a/status", 1)])
    wait_until(lambda: statuses, 5, "the retained status of site-a on the main broker")
    assert statuses[-1]["state"] == "offline", statuses
    assert cluster.is_online("site-b")

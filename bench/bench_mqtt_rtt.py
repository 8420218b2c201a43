"""QoS 1 round trips through the project's MQTT layer, with and without TCP_NODELAY.

Two figures per setting, each the median (and p99) of N trials on a fresh Mosquitto:
* ``puback``: publish → the broker's PUBACK (``publish_and_wait``);
* ``echo``: client A publishes, client B receives it and publishes back, A receives.

    python -m bench.bench_mqtt_rtt [--count 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import statistics
import tempfile
import time
from pathlib import Path

from broker.mqtt.client import InboundMessage, MqttConnection
from broker.mqtt.local_broker import free_port, start_broker
from broker.mqtt.settings import MqttSettings
from tests.support.loops import LoopThread
from tests.support.processes import percentile

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"


def measure(nodelay: bool, count: int) -> dict[str, float]:
    """Run both measurements on a broker whose set_tcp_nodelay matches ``nodelay``."""
    folder = Path(tempfile.mkdtemp(prefix="slb-rtt-"))
    broker = start_broker(folder, port=free_port(), prefer="mosquitto",
                          overrides={"set_tcp_nodelay": "true" if nodelay else "false"})
    settings = MqttSettings(broker_url=broker.url, mqtt_tcp_nodelay=nodelay)
    replies: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
    echo_holder: list[MqttConnection] = []

    def echo(message: InboundMessage) -> None:
        echo_holder[0].publish("rtt/pong", message.payload, qos=1)

    # Each client hands its messages to a loop of its own, as two processes would.
    loop_a, loop_b = LoopThread("rtt-a-loop"), LoopThread("rtt-b-loop")
    client_a = MqttConnection(settings, "rtt-a", on_message=replies.put, subscriptions=[("rtt/pong", 1)],
                              loop=loop_a.loop)
    client_b = MqttConnection(settings, "rtt-b", on_message=echo, subscriptions=[("rtt/ping", 1)], loop=loop_b.loop)
    echo_holder.append(client_b)
    try:
        for client in (client_a, client_b):
            client.start()
            assert client.wait_connected(10)
        puback: list[float] = []
        for index in range(count):
            started = time.perf_counter()
            client_a.publish_and_wait("rtt/sink", str(index).encode(), qos=1, timeout=5)
            puback.append((time.perf_counter() - started) * 1000)
        round_trip: list[float] = []
        for index in range(count):
            started = time.perf_counter()
            client_a.publish("rtt/ping", str(index).encode(), qos=1)
            reply = replies.get(timeout=5)
            round_trip.append((time.perf_counter() - started) * 1000)
            assert reply.payload == str(index).encode()
        return {
            "puback_median_ms": statistics.median(puback),
            "puback_p99_ms": percentile(puback, 0.99),
            "echo_median_ms": statistics.median(round_trip),
            "echo_p99_ms": percentile(round_trip, 0.99),
        }
    finally:
        client_a.stop(timeout=0.5)
        client_b.stop(timeout=0.5)
        loop_a.close()
        loop_b.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {"count": args.count}
    for nodelay in (True, False):
        results["nodelay" if nodelay else "nagle"] = measure(nodelay, args.count)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mqtt_rtt.json").write_text(json.dumps(results, indent=2))
    rows = [("setting", "PUBACK p50", "PUBACK p99", "echo p50", "echo p99")]
    for key, label in (("nodelay", "TCP_NODELAY on"), ("nagle", "TCP_NODELAY off")):
        figures = results[key]
        rows.append((label, *(f"{figures[name]:.3f} ms" for name in
                              ("puback_median_ms", "puback_p99_ms", "echo_median_ms", "echo_p99_ms"))))
    for row in rows:
        print(f"{row[0]:<16} {row[1]:>12} {row[2]:>12} {row[3]:>12} {row[4]:>12}")  # a benchmark prints figures


if __name__ == "__main__":
    main()

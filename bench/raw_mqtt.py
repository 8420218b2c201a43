"""A plain paho publisher for the raw baseline of bench/bench_relay.py, as a light process of its own.

Imports nothing of the project, so starting four of them costs little.

    python -m bench.raw_mqtt HOST PORT TOPIC PAYLOAD_FILE SECONDS
"""

from __future__ import annotations

import socket
import sys
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

INFLIGHT = 100


def client(prefix: str) -> mqtt.Client:
    made = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
                       protocol=MQTTProtocolVersion.MQTTv5)
    made.max_inflight_messages_set(INFLIGHT)
    made.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return made


def publish(host: str, port: int, topic: str, payload: bytes, seconds: float) -> int:
    """QoS 1 as fast as acknowledgements allow (at most INFLIGHT unacknowledged); returns messages sent."""
    publisher = client("raw-pub")
    publisher.connect(host, port)
    publisher.loop_start()
    pending: list[mqtt.MQTTMessageInfo] = []
    sent = 0
    stop = time.monotonic() + seconds
    give_up = stop + 5.0  # a broker gone away must not keep this process waiting
    while time.monotonic() < stop:
        pending.append(publisher.publish(topic, payload, qos=1))
        sent += 1
        if len(pending) >= INFLIGHT:
            try:
                pending.pop(0).wait_for_publish(max(0.01, give_up - time.monotonic()))
            except (RuntimeError, ValueError):
                break
    for info in pending:
        if time.monotonic() >= give_up:
            break
        try:
            info.wait_for_publish(max(0.01, give_up - time.monotonic()))
        except (RuntimeError, ValueError):
            break
    publisher.disconnect()
    publisher.loop_stop()
    return sent


def main() -> None:
    host, port, topic, payload_file, seconds = sys.argv[1:6]
    with open(payload_file, "rb") as handle:
        payload = handle.read()
    sys.stdout.write(f"SENT {publish(host, int(port), topic, payload, float(seconds))}\n")


if __name__ == "__main__":
    main()

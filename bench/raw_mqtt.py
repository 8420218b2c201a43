"""A plain paho publisher for the raw baseline of bench/bench_relay.py, as a light process of its own; and raw
MQTT 3.1.1 packets on a plain socket for load generators that must cost next to nothing (bench/bench_scale.py).

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


# ---------------------------------------------------------------- raw packets (QoS 0, no client library)


def _length(value: int) -> bytes:
    """MQTT's variable-length integer (the remaining length of a packet)."""
    encoded = bytearray()
    while True:
        digit, value = value % 128, value // 128
        encoded.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_raw(host: str, port: int, client_id: str, timeout: float = 10.0) -> socket.socket:
    """A plain socket after CONNECT (MQTT 3.1.1, clean session, keep-alive off: a publisher that only writes) and
    an accepting CONNACK."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = _string("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + _string(client_id)
    sock.sendall(b"\x10" + _length(len(body)) + body)
    answer = b""
    while len(answer) < 4:
        chunk = sock.recv(4 - len(answer))
        if not chunk:
            raise ConnectionError(f"{host}:{port} closed the connection before CONNACK")
        answer += chunk
    if answer[0] != 0x20 or answer[3] != 0:
        raise ConnectionError(f"{host}:{port} refused the connection: {answer!r}")
    sock.settimeout(None)
    return sock


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    """One QoS 0 PUBLISH packet, ready to write."""
    head, tail = publish_parts(topic, payload, b"", retain)
    return head + tail


def publish_parts(topic: str, before: bytes, after: bytes, retain: bool = False,
                  middle: int = 0) -> tuple[bytes, bytes]:
    """A QoS 0 PUBLISH of ``before + <middle bytes> + after`` as two parts around a gap of ``middle`` bytes
    filled in at sending time (a timestamp): the packet is encoded once, and sending costs a join."""
    variable = _string(topic)
    length = len(variable) + len(before) + middle + len(after)
    return bytes([0x30 | (1 if retain else 0)]) + _length(length) + variable + before, after


def main() -> None:
    host, port, topic, payload_file, seconds = sys.argv[1:6]
    with open(payload_file, "rb") as handle:
        payload = handle.read()
    sys.stdout.write(f"SENT {publish(host, int(port), topic, payload, float(seconds))}\n")


if __name__ == "__main__":
    main()

"""The floor of the ``/v1`` overhead: the least an HTTP → MQTT → agent → SSE hop can do in Python here.

Why: issue 15 asks the web app to add ≤ 2 ms to TTFT over calling the runtime
directly. This proxy measures what the architecture itself costs on the machine
the bench runs on (a process hop in, a job over Mosquitto to the agent, the
first chunk back, a process hop out), with nothing the app does: no framework,
no routing, no validation beyond decoding, no history, no metrics. Its figure
in ``bench.bench_overhead`` says how much of the app's overhead is the app's.
Not for use: it trusts its client, serves one fixed agent and model, and has
no errors, limits or auth.

    python -m bench.floor_proxy BROKER_URL PREFIX AGENT_ID MODEL PORT
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid

from broker.heap import settle_heap
from broker.mqtt.client import InboundMessage, MqttConnection
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage, Job, Result, Topics, decode, encode

logger = logging.getLogger("floor_proxy")


class FloorProxy:
    """Turns each ``POST`` with an OpenAI-style ``messages`` body into a job and streams its chunks as SSE."""

    def __init__(self, broker_url: str, prefix: str, agent_id: str, model: str) -> None:
        self.topics = Topics(prefix)
        self.agent_id = agent_id
        self.model = model
        self.waiting: dict[str, asyncio.Transport] = {}
        self.connection: MqttConnection | None = None
        self.broker_url = broker_url

    def on_result(self, message: InboundMessage) -> None:
        result = decode(Result, message.payload)
        transport = self.waiting.get(result.request_id)
        if transport is None:
            return
        if result.delta:
            event = {"choices": [{"index": 0, "delta": {"content": result.delta}}]}
            body = f"data: {json.dumps(event)}\n\n".encode()
            transport.write(b"%x\r\n%s\r\n" % (len(body), body))
        if result.done or result.error:
            body = b"data: [DONE]\n\n"
            transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            self.waiting.pop(result.request_id, None)

    def ask(self, transport: asyncio.Transport, body: bytes) -> None:
        request_id = "floor" + uuid.uuid4().hex[:12]
        messages = [ChatMessage(role=m["role"], content=m["content"]) for m in json.loads(body)["messages"]]
        job = Job(request_id=request_id, model=self.model, messages=messages, deadline=time.time() + 30)
        self.waiting[request_id] = transport
        assert self.connection is not None
        self.connection.publish(self.topics.job(self.agent_id), encode(job), qos=1)
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

    async def serve(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.connection = MqttConnection(
            MqttSettings(broker_url=self.broker_url, topic_prefix=self.topics.prefix),
            f"floor-proxy-{uuid.uuid4().hex[:6]}", on_message=self.on_result,
            subscriptions=[(self.topics.result(self.agent_id), 1)], loop=loop)
        self.connection.start()
        server = await loop.create_server(lambda: _Http(self), "127.0.0.1", port)
        settle_heap("floor proxy start-up")  # as the app does
        logger.info("floor proxy on 127.0.0.1:%d", port)
        async with server:
            await server.serve_forever()


class _Http(asyncio.Protocol):
    """Just enough HTTP/1.1: a head, a Content-Length body, keep-alive."""

    def __init__(self, proxy: FloorProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        assert self.transport is not None
        self.proxy.ask(self.transport, rest[:length])


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broker_url, prefix, agent_id, model, port = sys.argv[1:6]
    asyncio.run(FloorProxy(broker_url, prefix, agent_id, model).serve(int(port)))


if __name__ == "__main__":
    main()

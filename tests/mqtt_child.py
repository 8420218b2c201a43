"""A child process holding one MqttConnection with a will, for SIGKILL tests.

Run: python -m tests.mqtt_child BROKER_URL PREFIX AGENT_ID KEEPALIVE
Prints READY on stdout once connected, then waits until killed.
"""

from __future__ import annotations

import asyncio
import sys

from broker.mqtt.client import MqttConnection, OutboundMessage
from broker.mqtt.settings import MqttSettings
from broker.protocol import Status, Topics


async def main() -> None:
    url, prefix, agent_id, keepalive = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    topics = Topics(prefix)
    settings = MqttSettings(broker_url=url, topic_prefix=prefix, mqtt_keepalive=keepalive)
    connection = MqttConnection(
        settings,
        f"child-{agent_id}",
        on_message=lambda message: None,
        loop=asyncio.get_running_loop(),
        subscriptions=[(topics.control_of(agent_id), 1)],
        will=OutboundMessage.of(topics.status(agent_id), Status(state="offline")),
        birth=OutboundMessage.of(topics.status(agent_id), Status(state="online")),
    )
    connection.start()
    if not await asyncio.to_thread(connection.wait_connected, 10):
        sys.exit(1)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main())

"""A child process holding one MqttConnection with a will, for SIGKILL tests.

Run: python -m tests.mqtt_child BROKER_URL PREFIX AGENT_ID KEEPALIVE
Prints READY on stdout once connected, then sleeps until killed.
"""

from __future__ import annotations

import sys
import time

from broker.mqtt.client import MqttConnection, OutboundMessage
from broker.mqtt.settings import MqttSettings
from broker.protocol import Status, Topics


def main() -> None:
    url, prefix, agent_id, keepalive = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    topics = Topics(prefix)
    settings = MqttSettings(broker_url=url, topic_prefix=prefix, mqtt_keepalive=keepalive)
    connection = MqttConnection(
        settings,
        f"child-{agent_id}",
        on_message=lambda message: None,
        subscriptions=[(topics.control_of(agent_id), 1)],
        will=OutboundMessage.of(topics.status(agent_id), Status(state="offline")),
        birth=OutboundMessage.of(topics.status(agent_id), Status(state="online")),
    )
    connection.start()
    if not connection.wait_connected(10):
        sys.exit(1)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()

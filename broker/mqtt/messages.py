"""The MQTT layer's messages, publish tickets and errors (broker/mqtt/client.py re-exports them)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from broker.protocol.codec import encode
from broker.protocol.messages import Message


class MqttError(RuntimeError):
    """Base of this layer's errors."""


class MqttAuthError(MqttError):
    """The broker refused our credentials; retrying will not help."""


class MqttPublishRefused(MqttError):
    """The broker acknowledged a publish with a failure reason code (e.g. the ACL denied it)."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason
        super().__init__(f"broker refused publish to {topic}: {reason} (0x{reason_code:02x})")


@dataclass(frozen=True)
class InboundMessage:
    """A received message, as handed to the event loop."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class OutboundMessage:
    """A message to publish (used for the will and the birth message)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    @classmethod
    def of(cls, topic: str, message: Message, *, qos: int = 1, retain: bool = True) -> OutboundMessage:
        return cls(topic, encode(message), qos, retain)


class PublishTicket:
    """Tracks one publish until the broker acknowledges it (QoS 1/2) or it is sent (QoS 0)."""

    def __init__(self, topic: str, qos: int) -> None:
        self.topic = topic
        self.qos = qos
        self.reason_code: int | None = None
        self.reason: str = ""
        self._done = threading.Event()

    def _complete(self, reason_code: int = 0, reason: str = "Success") -> None:
        self.reason_code = reason_code
        self.reason = reason
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> int:
        """Wait for the acknowledgement; return the reason code or raise on refusal / timeout."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no acknowledgement for publish to {self.topic} within {timeout:.1f}s")
        if self.reason_code is not None and self.reason_code >= 0x80:
            raise MqttPublishRefused(self.topic, self.reason_code, self.reason)
        return self.reason_code or 0

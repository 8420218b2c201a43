"""Helpers (no tests) for agent integration tests: spawn ``python -m agent`` and watch its topics on a real broker.

Reusable by the coordinator's tests: ``spawn_agent(...)`` returns an
:class:`~tests.support.processes.AgentProcess`; :class:`Watcher` records every
message under a prefix and waits for the one a test needs (never a blind sleep).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from broker.mqtt.client import InboundMessage
from broker.mqtt.settings import MqttSettings
from broker.protocol import ChatMessage, Job, Message, PayloadError, Result, TopicKind, Topics, decode
from tests.support.loops import mqtt_connection
from tests.support.processes import AgentProcess, child_env, spawn

M = TypeVar("M", bound=Message)


def spawn_agent(
    broker_url: str,
    prefix: str,
    agent_id: str,
    data_dir: Path,
    *extra: str,
    backend_url: str | None = None,
    env: dict[str, str] | None = None,
) -> AgentProcess:
    """Start an agent with test-friendly timings (fast telemetry, health checks and keepalive)."""
    command = [
        "-m", "agent",
        "--broker-url", broker_url,
        "--topic-prefix", prefix,
        "--agent-id", agent_id,
        "--data-dir", str(data_dir),
        "--telemetry-interval-s", "0.5",
        "--backend-check-interval-s", "0.5",
        "--backend-retry-max-s", "0.5",
        "--benchmark-tokens", "4",
        "--mqtt-keepalive", "2",
    ]
    if backend_url is not None:
        command += ["--backend-url", backend_url]
    command += list(extra)
    return spawn(agent_id, command, data_dir, log_name=f"agent-{agent_id}-{uuid.uuid4().hex[:4]}.log",
                 env=child_env(**(env or {})), kind=AgentProcess)


class Watcher:
    """Subscribes to ``prefix/#`` and records every message, in order."""

    def __init__(self, settings: MqttSettings, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.messages: list[InboundMessage] = []
        self._condition = threading.Condition()
        self.connection = mqtt_connection(settings, f"watcher-{uuid.uuid4().hex[:8]}", on_message=self._on_message,
                                          subscriptions=[(f"{self.topics.prefix}/#", 1)], reconnect_max_s=1.0)
        self.connection.start()
        if not self.connection.wait_connected(10):
            raise RuntimeError("watcher could not connect")

    def _on_message(self, message: InboundMessage) -> None:
        with self._condition:
            self.messages.append(message)
            self._condition.notify_all()

    def close(self) -> None:
        self.connection.stop(timeout=1)

    def mark(self) -> int:
        """Position to pass as ``since`` so that only later messages count."""
        with self._condition:
            return len(self.messages)

    def decoded(self, kind: TopicKind, agent_id: str | None = None, since: int = 0) -> list[Any]:
        with self._condition:
            messages = list(self.messages[since:])
        found = []
        for message in messages:
            parsed = self.topics.parse(message.topic)
            if parsed is None or parsed[0] is not kind or (agent_id is not None and parsed[1] != agent_id):
                continue
            if not message.payload:
                continue
            try:
                found.append(decode(kind.spec.model, message.payload, topic=message.topic))
            except PayloadError:
                continue
        return found

    def wait_for(
        self,
        kind: TopicKind,
        agent_id: str | None = None,
        predicate: Callable[[Any], bool] = lambda message: True,
        *,
        since: int = 0,
        timeout: float = 10.0,
        what: str = "",
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.decoded(kind, agent_id, since):
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [m for m in self.decoded(kind, agent_id, since)][-5:]
                raise AssertionError(f"no {kind.name} {what} within {timeout}s; last seen: {seen}")
            with self._condition:
                self._condition.wait(min(remaining, 0.1))

    def results(self, request_id: str, since: int = 0) -> list[Result]:
        return [r for r in self.decoded(TopicKind.RESULT, None, since) if r.request_id == request_id]

    def wait_answer(self, request_id: str, *, timeout: float = 10.0, since: int = 0) -> list[Result]:
        """All chunks of an answer, once its final chunk is in."""
        self.wait_for(TopicKind.RESULT, None, lambda r: r.request_id == request_id and r.done, since=since,
                      timeout=timeout, what=f"final chunk of {request_id}")
        return self.results(request_id, since)

    def send_job(self, agent_id: str, request_id: str, text: str, *, model: str = "llama3.2:1b",
                 deadline_in: float = 30.0, **extra: Any) -> Job:
        job = Job(request_id=request_id, model=model, messages=[ChatMessage(role="user", content=text)],
                  deadline=time.time() + deadline_in, **extra)
        self.connection.publish_and_wait(self.topics.job(agent_id), job)
        return job

    def publish(self, topic: str, payload: bytes | Message, *, retain: bool = False) -> None:
        self.connection.publish_and_wait(topic, payload, retain=retain)

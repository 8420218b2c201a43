"""The only registry of topic strings; each topic kind is bound to its payload model.

No other module builds topic strings by hand: use :class:`Topics`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from broker.protocol.messages import (
    Assign,
    Cancel,
    CoordinatorStatus,
    Hardware,
    Job,
    LeaderRecord,
    Manage,
    Message,
    ModelState,
    Operation,
    Result,
    Status,
    Telemetry,
    is_valid_agent_id,
)

DEFAULT_PREFIX = "slb/v1"


@dataclass(frozen=True)
class TopicSpec:
    """How a topic kind travels: its payload model, QoS and retain flag."""

    model: type[Message]
    qos: int
    retained: bool
    direction: str  # "agent" (agent writes) or "control"/"coordinator" (coordinator writes)


class TopicKind(enum.Enum):
    """Every topic of the protocol, bound to its spec."""

    STATUS = TopicSpec(Status, 1, True, "agent")
    HARDWARE = TopicSpec(Hardware, 1, True, "agent")
    TELEMETRY = TopicSpec(Telemetry, 0, False, "agent")
    MODEL = TopicSpec(ModelState, 1, True, "agent")
    RESULT = TopicSpec(Result, 1, False, "agent")
    OPERATION = TopicSpec(Operation, 1, False, "agent")
    ASSIGN = TopicSpec(Assign, 1, True, "control")
    JOB = TopicSpec(Job, 1, False, "control")
    CANCEL = TopicSpec(Cancel, 1, False, "control")
    MANAGE = TopicSpec(Manage, 1, False, "control")
    COORDINATOR_STATUS = TopicSpec(CoordinatorStatus, 1, True, "coordinator")
    COORDINATOR_LEADER = TopicSpec(LeaderRecord, 1, True, "coordinator")

    @property
    def spec(self) -> TopicSpec:
        return self.value

    @property
    def leaf(self) -> str:
        return self.name.lower()


_AGENT_LEAVES = {kind.leaf: kind for kind in TopicKind if kind.spec.direction == "agent"}
_CONTROL_LEAVES = {kind.leaf: kind for kind in TopicKind if kind.spec.direction == "control"}


class Topics:
    """Topic builders and parser for one prefix (default ``slb/v1``)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = prefix.strip("/")
        if not prefix or "+" in prefix or "#" in prefix:
            raise ValueError(f"invalid topic prefix {prefix!r}")
        self.prefix = prefix

    def _agent_topic(self, agent_id: str, leaf: str) -> str:
        if not is_valid_agent_id(agent_id):
            raise ValueError(f"invalid agent id {agent_id!r}")
        return f"{self.prefix}/agent/{agent_id}/{leaf}"

    def _control_topic(self, agent_id: str, leaf: str) -> str:
        if not is_valid_agent_id(agent_id):
            raise ValueError(f"invalid agent id {agent_id!r}")
        return f"{self.prefix}/control/{agent_id}/{leaf}"

    # agent → coordinator
    def status(self, agent_id: str) -> str:
        return self._agent_topic(agent_id, "status")

    def hardware(self, agent_id: str) -> str:
        return self._agent_topic(agent_id, "hardware")

    def telemetry(self, agent_id: str) -> str:
        return self._agent_topic(agent_id, "telemetry")

    def model(self, agent_id: str) -> str:
        return self._agent_topic(agent_id, "model")

    def result(self, agent_id: str) -> str:
        return self._agent_topic(agent_id, "result")

    def operation(self, agent_id: str) -> str:
        return self._agent_topic(agent_id, "operation")

    # coordinator → agent
    def assign(self, agent_id: str) -> str:
        return self._control_topic(agent_id, "assign")

    def job(self, agent_id: str) -> str:
        return self._control_topic(agent_id, "job")

    def cancel(self, agent_id: str) -> str:
        return self._control_topic(agent_id, "cancel")

    def manage(self, agent_id: str) -> str:
        return self._control_topic(agent_id, "manage")

    def coordinator_status(self) -> str:
        return f"{self.prefix}/coordinator/status"

    def coordinator_leader(self) -> str:
        """The retained leader record (and non-retained claims) of placement leadership."""
        return f"{self.prefix}/coordinator/leader"

    def for_kind(self, kind: TopicKind, agent_id: str | None = None) -> str:
        """Build the topic of ``kind`` (``agent_id`` is required except for the coordinator's own topics)."""
        if kind is TopicKind.COORDINATOR_STATUS:
            return self.coordinator_status()
        if kind is TopicKind.COORDINATOR_LEADER:
            return self.coordinator_leader()
        if agent_id is None:
            raise ValueError(f"{kind.name} needs an agent id")
        builder = self._agent_topic if kind.spec.direction == "agent" else self._control_topic
        return builder(agent_id, kind.leaf)

    # subscriptions
    def all_agents(self) -> str:
        """Everything every agent publishes (the coordinator's subscription)."""
        return f"{self.prefix}/agent/+/+"

    def all_controls_of(self, kind: TopicKind) -> str:
        """One control topic of every agent (the coordinator reads back its retained assignments)."""
        return f"{self.prefix}/control/+/{kind.leaf}"

    def control_of(self, agent_id: str) -> str:
        """Everything addressed to one agent, as one wildcard (tools and ACL tests; agents use :meth:`controls_of`)."""
        if not is_valid_agent_id(agent_id):
            raise ValueError(f"invalid agent id {agent_id!r}")
        return f"{self.prefix}/control/{agent_id}/+"

    def controls_of(self, agent_id: str) -> list[str]:
        """Every topic addressed to one agent, spelled out (the agent's subscriptions).

        Exact topics, not ``control/<id>/+``: RabbitMQ's MQTT plugin replays a retained message only to a
        subscription naming its topic exactly, so an agent restarted there still gets its retained assignment.
        """
        return [self._control_topic(agent_id, kind.leaf) for kind in TopicKind if kind.spec.direction == "control"]

    def parse(self, topic: str) -> tuple[TopicKind, str | None] | None:
        """Return ``(kind, agent_id)`` for a topic of this prefix, or ``None`` if it is not one."""
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1 :].split("/")
        if parts == ["coordinator", "status"]:
            return TopicKind.COORDINATOR_STATUS, None
        if parts == ["coordinator", "leader"]:
            return TopicKind.COORDINATOR_LEADER, None
        if len(parts) != 3 or not is_valid_agent_id(parts[1]):
            return None
        table = _AGENT_LEAVES if parts[0] == "agent" else _CONTROL_LEAVES if parts[0] == "control" else None
        if table is None or parts[2] not in table:
            return None
        return table[parts[2]], parts[1]

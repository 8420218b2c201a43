"""The wire protocol: topics, message models and the codec.

Imported by the agent and the coordinator alike, so it depends on pydantic only.
"""

from broker.protocol.codec import MAX_PAYLOAD_BYTES, PayloadError, decode, encode
from broker.protocol.messages import (
    PROTOCOL_VERSION,
    AgentId,
    Assign,
    Benchmark,
    Cancel,
    ChatMessage,
    CoordinatorStatus,
    GpuInfo,
    Hardware,
    Job,
    LeaderRecord,
    Manage,
    Message,
    ModelState,
    Operation,
    RequestId,
    Result,
    ResultStats,
    RuntimeProfile,
    Status,
    Telemetry,
    is_valid_agent_id,
)
from broker.protocol.topics import TopicKind, Topics, TopicSpec

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "AgentId",
    "Assign",
    "Benchmark",
    "Cancel",
    "ChatMessage",
    "CoordinatorStatus",
    "GpuInfo",
    "Hardware",
    "Job",
    "LeaderRecord",
    "Manage",
    "Message",
    "ModelState",
    "Operation",
    "PayloadError",
    "RequestId",
    "Result",
    "ResultStats",
    "RuntimeProfile",
    "Status",
    "Telemetry",
    "TopicKind",
    "TopicSpec",
    "Topics",
    "decode",
    "encode",
    "is_valid_agent_id",
]

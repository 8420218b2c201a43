"""The only (de)serialisation of wire payloads.

``decode`` turns every kind of bad payload into :class:`PayloadError`, which
callers log and drop: a malformed message never kills a process.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError

from broker.protocol.messages import Message

MAX_PAYLOAD_BYTES = 1_048_576
"""Largest payload accepted (mosquitto.conf sets the same max_packet_size)."""

M = TypeVar("M", bound=Message)


class PayloadError(ValueError):
    """A payload that is not a valid message for its topic."""

    def __init__(self, reason: str, *, topic: str | None = None, kind: str = "invalid") -> None:
        self.reason = reason
        self.topic = topic
        self.kind = kind  # empty, too_large, not_json, invalid
        where = f" on {topic}" if topic else ""
        super().__init__(f"bad payload{where} ({kind}): {reason}")


def encode(message: Message) -> bytes:
    """Serialise a message to compact JSON bytes."""
    return message.model_dump_json(exclude_none=True).encode("utf-8")


def decode(model: type[M], payload: bytes | bytearray | str, *, topic: str | None = None) -> M:
    """Parse and validate ``payload`` as ``model``; raise :class:`PayloadError` when it is not one."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", errors="replace")
    if not payload:
        raise PayloadError("empty payload", topic=topic, kind="empty")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}", topic=topic, kind="too_large")
    try:
        return model.model_validate_json(payload)
    except ValidationError as error:
        errors = error.errors(include_url=False, include_input=False)
        if errors and errors[0].get("type") in {"json_invalid", "json_type"}:
            raise PayloadError(errors[0].get("msg", "not JSON"), topic=topic, kind="not_json") from None
        summary = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', ())) or '<root>'}: {item.get('msg')}"
            for item in errors[:5]
        )
        raise PayloadError(summary, topic=topic, kind="invalid") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise PayloadError(str(error)[:200], topic=topic, kind="not_json") from None

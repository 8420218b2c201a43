"""A stable agent id: given, or made once from the hostname and kept in the data folder."""

from __future__ import annotations

import logging
import re
import socket
import uuid
from pathlib import Path

from broker.protocol import is_valid_agent_id

logger = logging.getLogger(__name__)

ID_FILE_NAME = "agent_id"


def sanitize_agent_id(name: str) -> str:
    """Turn a hostname into something that is a valid topic level and MQTT username (may be empty)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip().lower())
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)
    return cleaned[:58].rstrip("-.")


def make_agent_id(hostname: str | None = None) -> str:
    """Hostname plus a short random suffix: two Raspberry Pis both called ``raspberrypi`` must not collide."""
    base = sanitize_agent_id(hostname if hostname is not None else socket.gethostname()) or "agent"
    candidate = f"{base}-{uuid.uuid4().hex[:4]}"
    assert is_valid_agent_id(candidate), candidate
    return candidate


def resolve_agent_id(data_dir: Path, given: str | None = None, hostname: str | None = None) -> str:
    """The id to use: ``given``, else the stored one, else a new one that is stored for next time."""
    if given:
        if not is_valid_agent_id(given):
            raise ValueError(f"invalid agent id {given!r}: use letters, digits, '_', '.', '-' (max 64)")
        return given
    path = Path(data_dir) / ID_FILE_NAME
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored = ""
    except OSError as error:
        logger.warning("cannot read %s (%s); making a new agent id", path, error)
        stored = ""
    if stored:
        if is_valid_agent_id(stored):
            return stored
        logger.warning("ignoring invalid agent id %r in %s", stored, path)
    agent_id = make_agent_id(hostname)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(agent_id + "\n", encoding="utf-8")
        logger.info("new agent id %s stored in %s", agent_id, path)
    except OSError as error:
        logger.warning("cannot store agent id in %s (%s): the id will change on restart", path, error)
    return agent_id

"""Conversation affinity: which machine most likely still holds a conversation's prompt in its cache.

Ollama and llama.cpp keep the KV cache of the last prompt each slot read (plus the answer it wrote). The next
turn of that conversation on the same machine reads only the new message; anywhere else it reads the whole
history again — seconds to tens of seconds on a CPU box. So the coordinator remembers, per conversation, the
agent that served its last turn and how many prompt tokens that left in its cache, and routing weighs the prefill
this saves against that agent's queue (:attr:`broker.scheduling.routing.RouteCandidate.saved_prefill_s`).

A conversation is known by the caller's id (``QueryRequest.conversation``, the chat session) or, for API callers
that send the whole history each turn, by a hash of the messages before the new question — the history the cache
holds, as cache-aware routers match on the prompt's prefix. A cache is assumed gone once the agent has been sent
as many other jobs as it has slots (each one may take the slot that held it). Memory is bounded (least recently
used entries go first) and entries expire.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from broker.protocol import ChatMessage

CHARS_PER_TOKEN = 4


def history_key(messages: Sequence[ChatMessage]) -> str:
    """A key for a conversation's history (roles and texts, surrounding white space ignored)."""
    digest = hashlib.blake2b(digest_size=16)
    for message in messages:
        digest.update(message.role.encode())
        digest.update(b"\x00")
        digest.update(message.content.strip().encode())
        digest.update(b"\x01")
    return "h:" + digest.hexdigest()


def lookup_keys(messages: Sequence[ChatMessage], conversation: str | None) -> list[str]:
    """Keys under which the previous turn of this query's conversation may be remembered, best first."""
    keys = [f"c:{conversation}"] if conversation else []
    if len(messages) >= 2 and messages[-1].role == "user":
        keys.append(history_key(messages[:-1]))
    return keys


def remember_keys(messages: Sequence[ChatMessage], answer: str, conversation: str | None) -> list[str]:
    """Keys the next turn will look up: the conversation's id, and the history including this answer."""
    keys = [f"c:{conversation}"] if conversation else []
    keys.append(history_key([*messages, ChatMessage(role="assistant", content=answer)]))
    return keys


def prompt_tokens(messages: Sequence[ChatMessage], answer: str = "") -> int:
    return (sum(len(message.content) for message in messages) + len(answer)) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Holder:
    agent_id: str
    cached_tokens: int
    evictions_base: int
    """The agent's job counter minus its other jobs when the turn ended: jobs since then = counter − base."""
    at: float


class ConversationMemory:
    """Per conversation, the agent holding its prompt in cache; bounded, with expiry."""

    def __init__(self, capacity: int = 10_000, ttl_s: float = 1800.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, Holder] = OrderedDict()
        self._jobs_sent: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def job_sent(self, agent_id: str) -> None:
        """Count a job sent to ``agent_id``: it may take the slot holding a conversation."""
        self._jobs_sent[agent_id] = self._jobs_sent.get(agent_id, 0) + 1

    def remember(self, keys: Sequence[str], agent_id: str, cached_tokens: int, other_jobs: int, now: float) -> None:
        """A turn ended on ``agent_id``, leaving ``cached_tokens`` in its cache; ``other_jobs`` are the jobs it
        still has (they run next, so they count as evictions too)."""
        holder = Holder(agent_id, cached_tokens, self._jobs_sent.get(agent_id, 0) - other_jobs, now)
        for key in keys:
            self._entries.pop(key, None)
            self._entries[key] = holder
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def cached(self, keys: Sequence[str], slots: dict[str, int], now: float) -> dict[str, int]:
        """``{agent: cached prompt tokens}`` for the agent holding this conversation, if its cache likely still
        does (fewer other jobs since than it has slots, not expired, still a candidate with ``slots`` known)."""
        for key in keys:
            holder = self._entries.get(key)
            if holder is None:
                continue
            if now - holder.at > self.ttl_s:
                del self._entries[key]
                continue
            slot_count = slots.get(holder.agent_id)
            if slot_count is None:
                return {}
            jobs_since = self._jobs_sent.get(holder.agent_id, 0) - holder.evictions_base
            if jobs_since >= slot_count:
                return {}
            return {holder.agent_id: holder.cached_tokens}
        return {}

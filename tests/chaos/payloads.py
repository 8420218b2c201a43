"""Hypothesis strategies for hostile MQTT traffic: topics the agent and the coordinator subscribe to, and payloads.

Payloads are random bytes, random JSON, hand-picked special cases, valid
messages, and — most often — valid messages with one to three fields replaced
by hostile values (NaN, infinities, huge numbers, wrong types, very long
strings, nesting) or removed, so the handlers are exercised past validation.
Why mutations of valid messages, drawn as a small recipe of integers, rather
than free-form recursive strategies: they reach deeper into the handlers and
cost a fraction of the draws, which is what lets 10,000 examples fit in the
test suite; shrinking still simplifies the recipe.
"""

from __future__ import annotations

import copy
import json
import random
import time
from typing import Any

from hypothesis import strategies as st

from broker.protocol import Topics

FUZZ_AGENT_IDS = ("fuzz-a", "fuzz-b", "fuzz.c", "x")
"""A fixed set, so the coordinator's registry stays bounded and memory can be compared between rounds."""

MODELS = ("llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "no-such:model", "")

class Long:
    """A long string, kept short in hypothesis' reprs (huge reprs are slow and warned about)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"Long({self.size})"


def materialize(value: Any) -> Any:
    """A fresh copy of a hostile value with every :class:`Long` expanded (never share mutable values)."""
    if isinstance(value, Long):
        return "x" * value.size
    if isinstance(value, list):
        return [materialize(item) for item in value]
    if isinstance(value, dict):
        return {key: materialize(item) for key, item in value.items()}
    return value


HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, -(10**30), 1e308, -1e308, 5e-324,
    float("nan"), float("inf"), float("-inf"), "", " ", "\x00", "../../etc/passwd", "slb/v1/#", "+", "#", "a/b",
    "🙂" * 5, "null", "online", "offline", "ready", "failed", Long(1000), Long(70_000), [], {}, [None], [[[]]],
    {"a": {"b": [1, 2]}}, ["user", "x"], {"role": "user", "content": "x"},
]
def _baselines() -> dict[str, dict[str, Any]]:
    now = time.time()
    return {
        "status": {"v": 1, "ts": now, "state": "online", "agent_version": "0.1.0", "backend": "ollama",
                   "backend_reachable": True, "simulated": False, "max_parallel": 2},
        "hardware": {"v": 1, "ts": now, "cpu_brand": "cpu", "cpu_physical_cores": 8, "cpu_logical_cores": 16,
                     "cpu_max_ghz": 4.5, "ram_total_gb": 32, "declared": True,
                     "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vendor": "nvidia", "vram_total_gb": 24}],
                     "benchmark": {"model": "llama3.2:3b", "tokens_per_s": 50.0, "ttft_s": 0.1}},
        "telemetry": {"v": 1, "ts": now, "cpu_percent": 10.0, "ram_free_gb": 8.0, "jobs_running": 1,
                      "jobs_queued": 0, "max_parallel": 2, "tokens_per_s": 40.0, "ttft_s": 0.2, "interval_s": 2.0,
                      "backend_reachable": True},
        "model": {"v": 1, "ts": now, "model": "llama3.2:3b", "state": "ready", "progress": None,
                  "local_models": ["llama3.2:3b"], "assignment_id": "a1"},
        "result": {"v": 1, "ts": now, "request_id": "r1", "seq": 0, "delta": "Hello", "done": False,
                   "stats": {"output_tokens": 3, "tokens_per_s": 20.0, "ttft_s": 0.1}},
        "assign": {"v": 1, "ts": now, "model": "llama3.2:1b", "assignment_id": "a1", "reason": "fuzz"},
        "job": {"v": 1, "ts": now, "request_id": "r1", "model": "llama3.2:1b",
                "messages": [{"role": "user", "content": "hello"}], "options": {"num_predict": 8},
                "deadline": now + 30, "attempt": 0},
        "cancel": {"v": 1, "ts": now, "request_id": "r1", "reason": "fuzz"},
    }


BASELINES = _baselines()
NESTED = {
    "hardware": ["gpus.0.vram_total_gb", "gpus.0.name", "gpus.0", "benchmark.tokens_per_s", "benchmark.model"],
    "result": ["stats.tokens_per_s", "stats.output_tokens", "stats"],
    "job": ["messages.0.content", "messages.0.role", "messages.0", "options.num_predict", "options.temperature",
            "options.stop"],
}
FIELD_CHOICES = {
    leaf: [*base.keys(), *NESTED.get(leaf, []), "unknown_field"] for leaf, base in BASELINES.items()
}
REQUEST_IDS = ["r1", "r-2", "req.3", "job-x", "a" * 64, "a" * 65, "-x", "a b", "a/b", "a+b", "r1.1", "r1.2"]
DONE = object()


def _set(message: dict[str, Any], path: str, value: Any) -> None:
    """Replace the value at a dotted path (``messages.0.content``); ``DONE`` deletes it."""
    value = value if value is DONE else materialize(value)
    parts = path.split(".")
    target: Any = message
    for part in parts[:-1]:
        try:
            target = target[int(part)] if isinstance(target, list) else target[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return
    last = parts[-1]
    if isinstance(target, list):
        if value is DONE:
            if target:
                target.pop(0)
        elif target:
            target[0] = value
    elif isinstance(target, dict):
        if value is DONE:
            target.pop(last, None)
        else:
            target[last] = value


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _value(index: int, number: int) -> Any:
    """A hostile value: one of :data:`HOSTILE_VALUES`, or derived from the drawn number."""
    if index < len(HOSTILE_VALUES):
        return materialize(HOSTILE_VALUES[index])
    return (number, number / 7, -number, str(number))[index - len(HOSTILE_VALUES)]


VALUE_COUNT = len(HOSTILE_VALUES) + 4
MAX_FIELDS = max(len(fields) for fields in FIELD_CHOICES.values())


def _message(leaf: str, number: int, edits: list[tuple[int, int, bool]], valid: bool) -> bytes:
    """A valid message of ``leaf``'s shape, then (unless ``valid``) fields replaced or removed."""
    message = copy.deepcopy(BASELINES[leaf])
    if "request_id" in message:
        message["request_id"] = REQUEST_IDS[number % len(REQUEST_IDS)] if number % 3 == 0 else f"fz{number % 10**6}"
    if "model" in message:
        message["model"] = MODELS[number % len(MODELS)] if not valid else message["model"]
    if "seq" in message:
        message.update(seq=number % 6, done=number % 4 == 0)
    if "deadline" in message:
        message["deadline"] = time.time() + 30
    if not valid:
        fields = FIELD_CHOICES[leaf]
        for field, value, remove in edits:
            _set(message, fields[field % len(fields)], DONE if remove else _value(value, number))
    return _encode(message)
SPECIALS = [
    b"", b"null", b"[]", b"{}", b'""', b"0", b"NaN", b"\xff\xfe\xfd", b"\xef\xbb\xbf{}", b"{" * 5000, b"[" * 20000,
    b"1" * 10000, b'{"v": 1' + b", " * 1000, b'{"request_id": "r1", "seq": 0, "delta": "x", "done": true}',
    b'{"state": "online"}', b'{"model": "llama3.2:1b", "assignment_id": "a"}', b'{"v": 1e999}',
]
OVERSIZED = json.dumps({"a": "b" * 1_100_000}).encode()
"""Over the 1 MiB payload limit (under the broker's 2 MiB packet limit)."""


def _payload(leaf: str | None, kind: int, edits: list[tuple[int, int, bool]], number: int) -> bytes:
    if kind == 0:
        return random.Random(number).randbytes(number % 65)
    if kind == 1:
        values = [_value(value, number) for _, value, _ in edits]
        shapes = [values[0] if values else None, values, {FLAT_KEYS[field % len(FLAT_KEYS)]: _value(value, number)
                                                          for field, value, _ in edits}]
        return _encode(shapes[number % 3])
    if kind == 2:
        return OVERSIZED if number % (len(SPECIALS) + 1) == len(SPECIALS) else SPECIALS[number % len(SPECIALS)]
    if leaf is None:
        return _encode([_value(value, number) for _, value, _ in edits])
    return _message(leaf, number, edits, valid=kind == 3)


FLAT_KEYS = ["v", "ts", "state", "model", "seq", "request_id", "x"]
_numbers = st.integers(min_value=0, max_value=2**31)


def decode_edits(code: int) -> list[tuple[int, int, bool]]:
    """One to three (field, value, remove) edits packed in one integer: one draw instead of ~12."""
    edits = []
    for _ in range(1 + code % 3):
        code //= 3
        edits.append((code % MAX_FIELDS, (code // MAX_FIELDS) % VALUE_COUNT, (code // (MAX_FIELDS * VALUE_COUNT)) % 5
                      == 0))
        code //= MAX_FIELDS * VALUE_COUNT * 5
    return edits


_edits = st.integers(min_value=0, max_value=(3 * MAX_FIELDS * VALUE_COUNT * 5) ** 3).map(decode_edits)


def payloads(leaf: str | None = None) -> st.SearchStrategy[bytes]:
    """Random bytes, random JSON, special cases, and (for a known leaf) valid and mutated messages of that shape.

    Drawn as a small recipe of integers (kind, edits, a number) and built from it: few draws per example
    keep hypothesis fast, and shrinking still simplifies the recipe.
    """
    return st.builds(lambda kind, edits, number: _payload(leaf, kind, edits, number),
                     st.integers(0, 6), _edits, _numbers)


def topic_and_payload(topics: Topics, *, side: str, own_id: str | None = None) -> st.SearchStrategy[tuple[str, bytes]]:
    """Topics ``side`` ("agent" or "coordinator") subscribes to, plus malformed neighbours, with payloads."""
    if side == "agent":
        assert own_id is not None
        ids = [own_id, own_id, own_id, "someone-else"]
        routes = [(f"{topics.prefix}/control/{agent_id}/{leaf}", leaf) for agent_id in ids
                  for leaf in ("assign", "job", "cancel")]
        root = "control"
    else:
        ids = list(FUZZ_AGENT_IDS)
        routes = [(f"{topics.prefix}/agent/{agent_id}/{leaf}", leaf) for agent_id in ids
                  for leaf in ("status", "hardware", "telemetry", "model", "result")]
        routes += [(f"{topics.prefix}/control/{agent_id}/assign", "assign") for agent_id in ids]
        root = "agent"
    routes += [(topic, None) for topic in (
        f"{topics.prefix}/{root}/{ids[0]}/unknown", f"{topics.prefix}/{root}/{ids[0]}", f"{topics.prefix}/{root}",
        f"{topics.prefix}/{root}//job", f"{topics.prefix}/{root}/a+b/result", f"{topics.prefix}/{root}/#/status",
        f"{topics.prefix}/{root}/{ids[0]}/job/extra", f"{topics.prefix}/coordinator/status", "elsewhere/x/y",
        f"{topics.prefix}/{root}/{'y' * 70}/status",
    )]

    def build(route: int, kind: int, edits: list[tuple[int, int, bool]], number: int) -> tuple[str, bytes]:
        topic, leaf = routes[route]
        return topic, _payload(leaf, kind, edits, number)

    return st.builds(build, st.integers(0, len(routes) - 1), st.integers(0, 6), _edits, _numbers)

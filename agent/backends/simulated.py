"""A backend without a model, for demos and benchmarks only (never the default).

Speed comes from ``--sim-tokens-per-s`` and ``--sim-ttft-ms``; the text is
derived from the prompt so runs are repeatable. Any model name can be
"pulled" (it takes ``--sim-pull-s``). The agent marks itself ``simulated`` in
its status and telemetry so nobody mistakes these answers for a model's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from agent.backends.base import (
    BackendHealth,
    ChatDelta,
    ChatDone,
    ChatEvent,
    ModelNotFound,
    PullProgress,
    RuntimeFacts,
    normalize_model_name,
)
from broker.protocol import ChatMessage
from broker.protocol.messages import ToolCall

FILLER = (
    "the cluster routes each question to the machine that can answer it best while the others keep "
    "their models warm and report their load every few seconds so nothing waits longer than it must"
).split()


MAX_SIMULATED_TOKENS = 32_768
"""Longest simulated answer: a job asking for 2**31 tokens must not build a list of 2**31 words (found by fuzzing)."""


def simulated_text(model: str, messages: list[ChatMessage], max_tokens: int = 48) -> list[str]:
    """Deterministic answer pieces: a header naming the prompt, then filler chosen by the prompt's hash."""
    max_tokens = min(max_tokens, MAX_SIMULATED_TOKENS)
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    words = last_user.split()[:12]
    head = ["[simulated", f"{model}]", "You", "asked:", *words] if words else ["[simulated", f"{model}]"]
    seed = int(hashlib.sha256(last_user.encode()).hexdigest()[:8], 16)
    body = [FILLER[(seed + index) % len(FILLER)] for index in range(max(0, max_tokens - len(head)))]
    pieces = (head + body)[: max(1, max_tokens)]
    return [pieces[0], *(" " + piece for piece in pieces[1:])]


def simulated_json(wanted: str | dict[str, Any], text: str) -> str:
    """A structured answer (``format``: "json" or a JSON schema): ``{"answer": text}``, or the smallest value that
    fits the schema's common keywords (type, properties, required, items, enum, const, minimum, anyOf), so
    demos of JSON mode get JSON as a grammar-constrained runtime would give it."""

    def value(schema: Any, depth: int = 0) -> Any:
        if not isinstance(schema, dict) or depth > 8:
            return text
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for key in ("anyOf", "oneOf", "allOf"):
            if schema.get(key):
                return value(schema[key][0], depth + 1)
        kind = schema.get("type", "object" if "properties" in schema else "string")
        kind = kind[0] if isinstance(kind, list) and kind else kind
        if kind == "object":
            properties = schema.get("properties") or {}
            return {name: value(properties[name], depth + 1) for name in properties}
        if kind == "array":
            return [value(schema.get("items"), depth + 1) for _ in range(int(schema.get("minItems") or 1))]
        if kind in ("integer", "number"):
            return schema.get("minimum", 0)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return text

    return json.dumps({"answer": text} if not isinstance(wanted, dict) else value(wanted), ensure_ascii=False)


def guess_model_bytes(model: str) -> int:
    """A plausible download size: ~0.6 GB per billion parameters (4-bit), 2 GB when the name has no size."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*b\b", model.lower())
    billions = float(match.group(1)) if match else 3.3
    return int(billions * 0.6e9)


class SimulatedBackend:
    """Pretends to be an inference server at a configured speed."""

    name = "simulated"
    simulated = True
    url = "simulated://"

    def __init__(
        self, *, tokens_per_s: float = 20.0, ttft_s: float = 0.3, pull_s: float = 2.0, models: list[str] | None = None
    ) -> None:
        self.tokens_per_s = tokens_per_s
        self.ttft_s = ttft_s
        self.pull_s = pull_s
        self._models = {normalize_model_name(name) for name in models or []}
        self._loaded: set[str] = set()

    async def health(self) -> BackendHealth:
        return BackendHealth(True, version="simulated", models=tuple(sorted(self._models)))

    async def detect(self) -> RuntimeFacts:
        return RuntimeFacts("simulated", "backend simulated", version="simulated", health_check="none (simulated)")

    async def list_models(self) -> list[str]:
        return sorted(self._models)

    async def pull(self, model: str) -> AsyncIterator[PullProgress]:
        total = guess_model_bytes(model)
        steps = 10
        yield PullProgress("pulling manifest", 0, total)
        for step in range(1, steps + 1):
            await asyncio.sleep(self.pull_s / steps)
            yield PullProgress("downloading (simulated)", total * step // steps, total)
        self._models.add(normalize_model_name(model))
        yield PullProgress("success", total, total)

    async def warm(self, model: str, keep_alive: str | None = None) -> None:
        self._require(model)
        await asyncio.sleep(min(0.2, self.ttft_s))
        self._loaded.add(normalize_model_name(model))

    async def delete(self, model: str) -> None:
        self._require(model)
        self._models.discard(normalize_model_name(model))
        self._loaded.discard(normalize_model_name(model))

    async def unload(self, model: str) -> None:
        self._loaded.discard(normalize_model_name(model))

    async def loaded_models(self) -> list[str] | None:
        return sorted(self._loaded)

    def _require(self, model: str) -> None:
        if normalize_model_name(model) not in self._models:
            raise ModelNotFound(f'model "{model}" not found, try pulling it first')

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        options: dict[str, Any] | None = None,
        assistant_prefix: str | None = None,
        keep_alive: str | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: str | dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> AsyncIterator[ChatEvent]:
        self._require(model)
        self._loaded.add(normalize_model_name(model))
        options = options or {}
        limit = options.get("num_predict", options.get("max_tokens", 48))
        pieces = simulated_text(model, messages, limit if isinstance(limit, int) and limit > 0 else 48)
        if response_format is not None:  # structured output: JSON, not prose
            pieces = re.findall(r"\s*\S+", simulated_json(response_format, "".join(pieces).strip()))
        if assistant_prefix:
            full = "".join(pieces)
            if full.startswith(assistant_prefix):
                rest = full[len(assistant_prefix):]
                pieces = re.findall(r"\s*\S+", rest)
        forced = forced_tool(tools, tool_choice)
        if forced:
            pieces = []  # a forced call is the whole answer
        await asyncio.sleep(self.ttft_s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, piece in enumerate(pieces):
            if index:
                # pace against the start so the average rate holds even when the loop is busy
                delay = started + index / self.tokens_per_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield ChatDelta(piece)
        generation_s = max(loop.time() - started, 1e-6)
        prompt_tokens = sum(len(message.content.split()) for message in messages) or 1
        calls = (ToolCall(id=f"call_{len(messages)}", name=forced, arguments="{}"),) if forced else ()
        yield ChatDone("tool_calls" if calls else "stop", prompt_tokens, len(pieces), generation_s, 0.0,
                       tool_calls=calls)


def forced_tool(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> str | None:
    """The simulated model calls a tool only when told to (a named function, or ``required``: the first tool)."""
    if not tools:
        return None
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name") or None
    if tool_choice == "required":
        return (tools[0].get("function") or {}).get("name") or None
    return None

    async def embed(self, model: str, inputs: list[str], keep_alive: str | None = None, *,
                    legacy: bool = False) -> Any:
        """Eight numbers per text, the same for the same text (demos and tests of the embeddings path)."""
        from agent.embeddings import EmbedAnswer  # here: agent.embeddings imports this package

        self._require(model)
        await asyncio.sleep(min(0.05, self.ttft_s))
        vectors: list[list[float]] = []
        for text in inputs:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            vectors.append([round(byte / 255 * 2 - 1, 6) for byte in digest[:8]])
        return EmbedAnswer(vectors, sum(len(text.split()) for text in inputs))

    async def close(self) -> None:
        return None

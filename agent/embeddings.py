"""Embed jobs: ask the runtime's own embedding endpoint and send the vectors back in bounded result chunks.

An embed job (``Job.kind == "embed"``, docs/protocol.md "Embeddings") carries up to 256 texts; the runtime answers
with one vector per text — or, for a model without pooling (llama-cpp-python serving a chat model), one vector
per token, a list of lists. The vectors go back exactly as the runtime gave them, split over as many ``Result``
messages as the 1 MiB payload limit needs (``embedding_index`` says where each chunk starts); the last one has
``done`` and the usage.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from agent.backends.base import BackendError
from broker.protocol import Job, Result, ResultStats

logger = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024
"""JSON bytes of vectors per result message: half the payload limit, so the rest of the message always fits."""

Vector = list[float] | list[list[float]]


@dataclass(frozen=True)
class EmbedAnswer:
    """The runtime's vectors, one per input in input order, and its token count where it gives one."""

    vectors: list[Vector]
    prompt_tokens: int | None = None


class EmbeddingsUnsupported(BackendError):
    """The runtime has no embedding endpoint for this model (or was not started with one)."""

    code = "bad_job"


def _checked(vectors: Any, inputs: list[str], where: str) -> list[Vector]:
    if not isinstance(vectors, list) or len(vectors) != len(inputs):
        count = len(vectors) if isinstance(vectors, list) else "no"
        raise BackendError(f"{where} answered {count} vector(s) for {len(inputs)} input(s)")
    return vectors


async def ollama_embed(client: httpx.AsyncClient, translate: Callable[[int, str], BackendError], model: str,
                       inputs: list[str], keep_alive: str | None, legacy: bool = False) -> EmbedAnswer:
    """Ollama's ``POST /api/embed`` (``input`` as a list; ``embeddings`` back, ``prompt_eval_count``), or with
    ``legacy`` its older ``/api/embeddings`` once per text (whose vectors, unlike /api/embed's, are not
    normalised: a client of the legacy endpoint gets what that endpoint gives)."""
    if legacy:
        vectors = []
        for text in inputs:
            body = {"model": model, "prompt": text}
            if keep_alive is not None:
                body["keep_alive"] = keep_alive
            response = await client.post("/api/embeddings", json=body)
            if response.status_code != 200:
                raise translate(response.status_code, response.text)
            data = response.json()
            vectors.append(data.get("embedding") if isinstance(data, dict) else None)
        return EmbedAnswer(_checked(vectors, inputs, "Ollama's /api/embeddings"))
    body: dict[str, Any] = {"model": model, "input": inputs}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    response = await client.post("/api/embed", json=body)
    if response.status_code != 200:
        raise translate(response.status_code, response.text)
    data = response.json()
    if not isinstance(data, dict):
        raise BackendError("Ollama's /api/embed answered something that is not a JSON object")
    return EmbedAnswer(_checked(data.get("embeddings"), inputs, "Ollama's /api/embed"),
                       data.get("prompt_eval_count") if isinstance(data.get("prompt_eval_count"), int) else None)


async def openai_embed(client: httpx.AsyncClient, translate: Callable[[int, str], BackendError], model: str,
                       inputs: list[str], label: str) -> EmbedAnswer:
    """An OpenAI-compatible ``POST /v1/embeddings`` (floats; ``data[i].embedding`` in ``index`` order).

    A server without embeddings answers 404 or an error naming them (llama-cpp-python without ``--embedding``):
    that is said plainly rather than reported as a missing model."""
    response = await client.post("/v1/embeddings", json={"model": model, "input": inputs, "encoding_format": "float"})
    if response.status_code != 200:
        error = translate(response.status_code, response.text)
        lowered = response.text.lower()
        if response.status_code in (404, 405, 501) or "embedding" in lowered:
            raise EmbeddingsUnsupported(f"{label} does not serve embeddings for {model!r}: {error} "
                                        "(llama-cpp-python needs --embedding true)")
        raise error
    data = response.json()
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise BackendError(f"{label} answered /v1/embeddings without a data list")
    ordered = sorted(items, key=lambda item: item.get("index", 0) if isinstance(item, dict) else 0)
    vectors = [item.get("embedding") if isinstance(item, dict) else None for item in ordered]
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens")
    return EmbedAnswer(_checked(vectors, inputs, label), tokens if isinstance(tokens, int) else None)


def vector_chunks(vectors: list[Vector], limit: int = CHUNK_BYTES) -> list[tuple[int, list[Vector]]]:
    """The vectors in runs whose JSON stays under ``limit`` bytes, each with the index of its first vector.

    One vector over the limit is refused: it could never be sent (a token-level answer for a long text)."""
    chunks: list[tuple[int, list[Vector]]] = []
    current: list[Vector] = []
    start = size = 0
    for index, vector in enumerate(vectors):
        length = len(json.dumps(vector, separators=(",", ":")))
        if length > limit:
            raise BackendError(f"the embedding of input {index} is {length} bytes of JSON, more than one message "
                               f"may carry ({limit}); send shorter texts (or use a model that pools its vectors)")
        if current and size + length > limit:
            chunks.append((start, current))
            current, start, size = [], index, 0
        current.append(vector)
        size += length + 1
    if current or not chunks:
        chunks.append((start, current))
    return chunks


async def embed_results(backend: Any, job: Job, agent_id: str, keep_alive: str | None,
                        received: float) -> list[Result]:
    """Embed the job's inputs on the runtime: the result messages to publish, in order (the last has ``done``).

    Errors propagate as :class:`BackendError`; the job runner answers them like any failed job."""
    embed = getattr(backend, "embed", None)
    if embed is None:
        raise EmbeddingsUnsupported(f"the {getattr(backend, 'name', 'this')} backend cannot compute embeddings")
    started = time.monotonic()
    legacy = job.options.get("embed_endpoint") == "legacy"
    answer: EmbedAnswer = await embed(job.model, list(job.inputs), keep_alive, legacy=legacy)
    chunks = vector_chunks(answer.vectors)
    finished = time.monotonic()
    stats = ResultStats(prompt_tokens=answer.prompt_tokens, total_s=round(finished - received, 4),
                        queue_s=round(max(0.0, started - received), 4))
    logger.info("embed job %s: %d vector(s) in %d message(s), %.2f s", job.request_id, len(answer.vectors),
                len(chunks), finished - started)
    return [Result(request_id=job.request_id, seq=seq, done=seq == len(chunks) - 1, embeddings=vectors,
                   embedding_index=index, stats=stats if seq == len(chunks) - 1 else None, agent_id=agent_id,
                   model=job.model)
            for seq, (index, vectors) in enumerate(chunks)]

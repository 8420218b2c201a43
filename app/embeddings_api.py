"""Embeddings through the cluster: OpenAI's ``POST /v1/embeddings``, Ollama's ``POST /api/embed`` and its legacy
``POST /api/embeddings`` (docs/api.md "Embeddings").

The texts go to agents that have the named model (broker/coordinator/embedding.py batches them); the vectors
come back exactly as the runtime computed them, in each API's own response shape. What the cluster cannot honour
(``dimensions``, token arrays, ``truncate: false``, ``options``) is refused with a 400 naming the parameter.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api_common import ANY_METHOD, ApiContext, ApiError, json_body, validation_message
from app.errors import BadRequest, refuse_lone_surrogates
from broker.coordinator.contract import ROUTING_MODES
from broker.coordinator.embedding import EmbeddingAnswer, EmbeddingFailed
from broker.protocol.messages import MAX_PROMPT_CHARS

logger = logging.getLogger(__name__)

MAX_INPUTS = 2048
"""Texts one request may embed (OpenAI's own limit); the cluster splits them into batches per agent."""
FAILURE_STATUS = {"no_agent": 503, "failed": 502, "timeout": 504, "bad_request": 400}
EMBED_PATHS = ("/v1/embeddings", "/api/embed", "/api/embeddings")


class OpenAIEmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``; a field OpenAI defines that the cluster cannot honour is refused, not dropped."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(default=None, max_length=256)


class OllamaEmbedRequest(BaseModel):
    """``POST /api/embed``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str]
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    dimensions: int | None = None


class OllamaLegacyEmbeddingsRequest(BaseModel):
    """``POST /api/embeddings`` (Ollama's older endpoint: one ``prompt``, one ``embedding``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Any = None


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        message, param = validation_message(error)
        raise BadRequest(message, param=param) from None


def _texts(value: str | list[Any], param: str) -> list[str]:
    """The inputs as a list of strings, within the bounds (count, size, encodable)."""
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise BadRequest(f"{param} is empty: send a string or a list of strings", param=param)
    if not all(isinstance(text, str) for text in texts):
        raise BadRequest(f"{param} holds token ids: the cluster embeds text only (send strings)", param=param)
    if len(texts) > MAX_INPUTS:
        raise BadRequest(f"{param} has {len(texts)} texts; the limit is {MAX_INPUTS} per request", param=param)
    for index, text in enumerate(texts):
        if len(text) > MAX_PROMPT_CHARS:
            raise BadRequest(f"{param}[{index}] has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}",
                             param=param)
        refuse_lone_surrogates(f"{param}[{index}]", text)
    return texts


def _model(name: str) -> str:
    name = name.strip()
    if name in ROUTING_MODES:
        raise BadRequest(f"{name!r} is a routing mode; name an embedding model (e.g. nomic-embed-text)",
                         param="model")
    return name


def _base64(vector: Any) -> str:
    """OpenAI's base64 encoding: the vector's float32 values, little-endian."""
    if vector and isinstance(vector[0], list):
        raise BadRequest("this model returns one vector per token (it does not pool), which base64 cannot "
                         "carry; ask for encoding_format float", param="encoding_format")
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def flat_for_ollama(answer: EmbeddingAnswer, model: str) -> list[Any]:
    """Ollama's APIs promise one list of numbers per input; a model that does not pool (llama-cpp-python serving a
    chat model) gives one per token, which an Ollama client cannot read: refused, saying where it works."""
    if any(vector and isinstance(vector[0], list) for vector in answer.vectors):
        raise BadRequest(f"{model!r} returns one vector per token (its runtime does not pool them), which Ollama's "
                         "API cannot carry; use /v1/embeddings for its token vectors, or an embedding model such as "
                         "nomic-embed-text", param="model")
    return answer.vectors


def build_embeddings_router(context: ApiContext) -> APIRouter:
    """The three embeddings routes (registered before the Ollama catch-all, which would answer 501)."""
    router = APIRouter(dependencies=[Depends(context.require_api_key)], tags=["embeddings"])

    async def embed(model: str, texts: list[str], options: dict[str, Any] | None = None) -> EmbeddingAnswer:
        run = getattr(context.service.coordinator, "embed", None)
        if run is None:
            raise ApiError(501, "this cluster's coordinator does not compute embeddings", "not_supported")
        try:
            return await run(model, texts, options=options)
        except EmbeddingFailed as error:
            raise ApiError(FAILURE_STATUS.get(error.code, 502), error.message, error.code,
                           param="model" if error.code == "no_agent" else None) from None

    def headers(answer: EmbeddingAnswer) -> dict[str, str]:
        return {"X-SLB-Agents": ",".join(answer.agents), "X-SLB-Model": answer.model}

    @router.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> JSONResponse:
        payload: OpenAIEmbeddingRequest = _parse(OpenAIEmbeddingRequest, await json_body(request))
        if payload.dimensions is not None:
            raise BadRequest("dimensions is not supported: the runtimes give each model's full vectors; leave it "
                             "out (or shorten the vectors yourself)", param="dimensions")
        texts = _texts(payload.input, "input")
        answer = await embed(_model(payload.model), texts)
        data = [{"object": "embedding", "index": index,
                 "embedding": _base64(vector) if payload.encoding_format == "base64" else vector}
                for index, vector in enumerate(answer.vectors)]
        tokens = answer.prompt_tokens or 0
        return JSONResponse({"object": "list", "data": data, "model": payload.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=headers(answer))

    def ollama_refusals(payload: OllamaEmbedRequest | OllamaLegacyEmbeddingsRequest) -> None:
        if payload.options:
            raise BadRequest("options are not passed to embeddings: the runtime's defaults apply; leave them out",
                             param="options")
        if getattr(payload, "dimensions", None) is not None:
            raise BadRequest("dimensions is not supported: the runtimes give each model's full vectors",
                             param="dimensions")
        if getattr(payload, "truncate", True) is False:
            raise BadRequest("truncate: false is not supported: the runtime truncates inputs to the model's "
                             "context, as Ollama does by default", param="truncate")

    @router.post("/api/embed")
    async def ollama_embed(request: Request) -> JSONResponse:
        payload: OllamaEmbedRequest = _parse(OllamaEmbedRequest, await json_body(request))
        ollama_refusals(payload)
        texts = _texts(payload.input, "input")
        started = time.perf_counter()
        answer = await embed(_model(payload.model), texts)
        return JSONResponse({"model": payload.model, "embeddings": flat_for_ollama(answer, payload.model),
                             "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
                             "prompt_eval_count": answer.prompt_tokens or 0}, headers=headers(answer))

    @router.post("/api/embeddings")
    async def ollama_legacy_embeddings(request: Request) -> JSONResponse:
        payload: OllamaLegacyEmbeddingsRequest = _parse(OllamaLegacyEmbeddingsRequest, await json_body(request))
        ollama_refusals(payload)
        texts = _texts(payload.prompt, "prompt")
        # The legacy endpoint's vectors are not normalised (/api/embed's are): the agent asks the same endpoint.
        answer = await embed(_model(payload.model), texts, options={"embed_endpoint": "legacy"})
        return JSONResponse({"embedding": flat_for_ollama(answer, payload.model)[0]}, headers=headers(answer))

    @router.api_route("/v1/embeddings", methods=[m for m in ANY_METHOD if m != "POST"], include_in_schema=False)
    @router.api_route("/api/embed", methods=[m for m in ANY_METHOD if m != "POST"], include_in_schema=False)
    @router.api_route("/api/embeddings", methods=[m for m in ANY_METHOD if m != "POST"], include_in_schema=False)
    async def wrong_method(request: Request) -> JSONResponse:
        raise ApiError(405, f"{request.url.path} takes POST, not {request.method}", "method_not_allowed")

    return router

"""Ollama-compatible chat: ``POST /api/chat``, ``POST /api/generate`` (NDJSON unless ``stream: false``),
``GET /api/tags``, and minimal ``/api/show``, ``/api/version``, ``/api/ps`` so the ``ollama`` client and
Open WebUI treat the whole cluster as one Ollama server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.answers import AnswerRecord, provenance, simulated_agents, usage_numbers
from app.api_common import (
    OWNER,
    VIRTUAL_MODELS,
    ApiContext,
    check_total,
    json_body,
    now_iso,
    provenance_headers,
    read_until_routed,
    run_to_end,
    unfinished_error,
    validation_message,
)
from app.errors import BadRequest
from broker.coordinator.contract import Aggregation, QueryFailed, QueryFinished, TextDelta
from broker.protocol.messages import ChatMessage

logger = logging.getLogger(__name__)

OLLAMA_VERSION = "0.6.8"
"""The Ollama API level this surface speaks (clients such as Open WebUI check it)."""
OLLAMA_OPTIONS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "num_predict",
        "stop",
        "seed",
        "repeat_penalty",
        "repeat_last_n",
        "presence_penalty",
        "frequency_penalty",
        "num_ctx",
        "typical_p",
        "mirostat",
        "mirostat_eta",
        "mirostat_tau",
    }
)


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaChatRequest(BaseModel):
    """``POST /api/chat`` (Ollama streams unless told ``stream: false``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None
    aggregation: Aggregation = Aggregation.CONSENSUS
    rag: bool = False


class OllamaGenerateRequest(BaseModel):
    """``POST /api/generate``: one prompt (and an optional system prompt)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None
    raw: bool = False
    aggregation: Aggregation = Aggregation.CONSENSUS
    rag: bool = False


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=200)
    name: str | None = Field(default=None, max_length=200)


def ollama_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The Ollama options this cluster forwards; types are checked so a bad value is a 400, not an agent error."""
    if not options:
        return {}
    kept: dict[str, Any] = {}
    for name, value in options.items():
        if name not in OLLAMA_OPTIONS or value is None:
            continue
        if name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise BadRequest("options.stop must be a string or a list of strings", param="options.stop")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"options.{name} must be a number", param=f"options.{name}")
        kept[name] = value
    return kept


def build_ollama_router(context: ApiContext) -> APIRouter:
    """The ``/api`` routes."""
    service, settings = context.service, context.settings
    ollama = APIRouter(prefix="/api", dependencies=[Depends(context.require_api_key)], tags=["ollama"])

    def model_entry(name: str, family: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": now_iso(),
            "size": 0,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": "",
                "quantization_level": "",
            },
        }

    @ollama.get("/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    @ollama.get("/tags")
    async def tags() -> dict[str, Any]:
        """The routing modes and every model the cluster serves, as Ollama lists local models."""
        models = [model_entry(name, "cluster") for name in VIRTUAL_MODELS]
        models += [model_entry(name, name.split(":")[0]) for name in service.known_models()]
        return {"models": models}

    @ollama.get("/ps")
    async def running() -> dict[str, Any]:
        """Models ready on some agent (Ollama's 'loaded models')."""
        ready = sorted(set(service.coordinator.snapshot().ready_models))
        return {"models": [{**model_entry(name, name.split(":")[0]), "expires_at": now_iso(), "size_vram": 0}
                           for name in ready]}

    @ollama.post("/show")
    async def show(request: Request) -> dict[str, Any]:
        """Minimal model details, enough for clients that call it before chatting."""
        body = await json_body(request)
        try:
            payload = OllamaShowRequest.model_validate(body)
        except ValidationError as error:
            raise BadRequest(validation_message(error)[0]) from None
        name = payload.model or payload.name
        if not name:
            raise BadRequest("model is required", param="model")
        mode = context.resolve_mode(name)
        entry = model_entry(mode, "cluster" if mode in VIRTUAL_MODELS else mode.split(":")[0])
        return {
            "license": "",
            "modelfile": f"# served by {OWNER}: {VIRTUAL_MODELS.get(mode, 'routed to an agent serving it')}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": entry["details"],
            "model_info": {},
            "capabilities": ["completion"],
            "modified_at": entry["modified_at"],
        }

    async def ollama_answer(
        request: Request,
        *,
        model: str,
        messages: list[ChatMessage],
        question: str,
        stream: bool,
        options: dict[str, Any],
        aggregation: Aggregation,
        use_rag: bool,
        kind: Literal["chat", "generate"],
    ) -> Response:
        mode = context.resolve_mode(model)
        started = time.perf_counter()
        answer = await service.ask(
            question if use_rag else "",
            messages=messages,
            mode=mode,
            aggregation=aggregation,
            use_rag=use_rag,
            options=options,
        )

        def piece(text: str) -> dict[str, Any]:
            if kind == "chat":
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        def final(record: AnswerRecord, text: str) -> dict[str, Any]:
            numbers = usage_numbers(record)
            total_s = numbers["latency_s"] or (time.perf_counter() - started)
            eval_s = (
                numbers["output_tokens"] / numbers["tokens_per_s"]
                if numbers["tokens_per_s"] and numbers["output_tokens"]
                else max(0.0, total_s - (numbers["ttft_s"] or 0.0))
            )
            body = {
                "model": ",".join(record.models) or model,
                "created_at": now_iso(),
                **piece(text),
                "done": True,
                "done_reason": "stop",
                "total_duration": int(total_s * 1e9),
                "load_duration": 0,
                "prompt_eval_count": numbers["prompt_tokens"],
                "prompt_eval_duration": int((numbers["ttft_s"] or 0.0) * 1e9),
                "eval_count": numbers["output_tokens"],
                "eval_duration": int(eval_s * 1e9),
                "slb": provenance(record, mode, simulated_agents(service.coordinator.snapshot())),
            }
            if kind == "generate":
                body["context"] = []
            return body

        if not stream:
            record = await run_to_end(answer, request)
            if record.finished is None:
                raise unfinished_error(record)
            return JSONResponse(final(record, record.text), headers=provenance_headers(record))

        routed = await read_until_routed(answer)

        async def ndjson() -> AsyncIterator[str]:
            streamed = False
            try:
                async for event in routed.events():
                    if isinstance(event, TextDelta) and event.text:
                        streamed = True
                        line = {"model": event.model or model, "created_at": now_iso(), **piece(event.text),
                                "done": False}
                        yield json.dumps(line, ensure_ascii=False) + "\n"
                    elif isinstance(event, QueryFinished):
                        if not streamed and event.text:
                            line = {"model": ",".join(event.models) or model, "created_at": now_iso(),
                                    **piece(event.text), "done": False}
                            yield json.dumps(line, ensure_ascii=False) + "\n"
                        yield json.dumps(final(answer.record, ""), ensure_ascii=False) + "\n"
                    elif isinstance(event, QueryFailed):
                        yield json.dumps({"error": event.error}) + "\n"
            finally:
                await answer.aclose()

        return StreamingResponse(
            ndjson(), media_type="application/x-ndjson", headers=provenance_headers(answer.record)
        )

    @ollama.post("/chat")
    async def ollama_chat(request: Request) -> Response:
        """Ollama chat: NDJSON lines while streaming (the default), one object with ``stream: false``."""
        body = await json_body(request)
        try:
            payload = OllamaChatRequest.model_validate(body)
        except ValidationError as error:
            raise BadRequest(validation_message(error)[0]) from None
        if any(message.images for message in payload.messages):
            raise BadRequest("images are not supported by this cluster", param="messages")
        options = ollama_options(payload.options)
        if not payload.messages:
            mode = context.resolve_mode(payload.model)
            return JSONResponse(
                {"model": mode, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": "load"}
            )
        texts = [message.content for message in payload.messages]
        check_total(settings.max_prompt_chars, settings.max_messages, texts)
        messages = [ChatMessage(role=message.role, content=message.content) for message in payload.messages]
        question = next((m.content for m in reversed(payload.messages) if m.role == "user"), "")
        return await ollama_answer(
            request,
            model=payload.model,
            messages=messages,
            question=question,
            stream=payload.stream,
            options=options,
            aggregation=payload.aggregation,
            use_rag=payload.rag,
            kind="chat",
        )

    @ollama.post("/generate")
    async def ollama_generate(request: Request) -> Response:
        """Ollama generate: a prompt in, NDJSON ``response`` pieces out (or one object with ``stream: false``)."""
        body = await json_body(request)
        try:
            payload = OllamaGenerateRequest.model_validate(body)
        except ValidationError as error:
            raise BadRequest(validation_message(error)[0]) from None
        if payload.images:
            raise BadRequest("images are not supported by this cluster", param="images")
        options = ollama_options(payload.options)
        if not payload.prompt:
            mode = context.resolve_mode(payload.model)
            return JSONResponse(
                {"model": mode, "created_at": now_iso(), "response": "", "done": True, "done_reason": "load"}
            )
        texts = [payload.prompt, payload.system or ""]
        check_total(settings.max_prompt_chars, settings.max_messages, texts)
        messages = [ChatMessage(role="system", content=payload.system)] if payload.system else []
        messages.append(ChatMessage(role="user", content=payload.prompt))
        return await ollama_answer(
            request,
            model=payload.model,
            messages=messages,
            question=payload.prompt,
            stream=payload.stream,
            options=options,
            aggregation=payload.aggregation,
            use_rag=payload.rag,
            kind="generate",
        )

    return ollama

"""Ollama-compatible chat: ``POST /api/chat``, ``POST /api/generate`` (NDJSON unless ``stream: false``), plus
``/api/version`` and the model routes of app/ollama_models.py (tags, show, ps, pull, delete), so the ``ollama``
client and Open WebUI treat the whole cluster as one Ollama server. Every other ``/api`` path answers in
Ollama's error shape with what to do instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.answers import AnswerRecord, finish_reason, provenance, simulated_agents, usage_numbers
from app.api_common import (
    ANY_METHOD,
    VIRTUAL_MODELS,
    ApiContext,
    ApiError,
    check_total,
    json_body,
    now_iso,
    provenance_headers,
    read_until_routed,
    restart_event,
    restart_marker,
    run_to_end,
    served_routes,
    unfinished_error,
    validation_message,
    wrong_method,
)
from app.errors import AppError, BadRequest
from app.ollama_models import build_ollama_model_routes, keep_alive_is_zero
from broker.coordinator.contract import Aggregation, AnswerRestarted, QueryFailed, QueryFinished, TextDelta
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


OLLAMA_ELSEWHERE = "on the machine that runs Ollama (its agent then lists the result, and the cluster serves it)"
NOT_SERVED = {
    "create": "the cluster does not create models (/api/create): run `ollama create NAME -f Modelfile` "
              + OLLAMA_ELSEWHERE + ", or pull a library model through /api/pull",
    "copy": "the cluster does not copy models (/api/copy): run `ollama cp SOURCE DESTINATION` " + OLLAMA_ELSEWHERE,
    "push": "the cluster does not push models to a registry (/api/push): run `ollama push NAME` on the machine "
            "that has the model",
    "blobs": "the cluster does not store blobs (/api/blobs belongs to /api/create, which it does not serve): "
             "create the model with `ollama create` " + OLLAMA_ELSEWHERE,
    "embed": "the cluster does not serve embeddings (/api/embed): point your embedding client at an Ollama "
             "server directly; the cluster answers /api/chat and /api/generate",
    "embeddings": "the cluster does not serve embeddings (/api/embeddings): point your embedding client at an "
                  "Ollama server directly; the cluster answers /api/chat and /api/generate",
}
"""Ollama endpoints the cluster does not serve (501), each with what to do instead."""


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

    @ollama.get("/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    models = build_ollama_model_routes(ollama, context)

    unloading: set[asyncio.Task[None]] = set()

    def unload_after(record: AnswerRecord) -> None:
        """``keep_alive: 0`` with a question: once answered, the model leaves the memory of the agents that used it
        (in the background; the answer does not wait for it)."""
        by_model: dict[str, list[str]] = {}
        for index, agent in enumerate(record.agents):
            model = record.models[index] if index < len(record.models) else (record.models or [None])[0]
            if model:
                by_model.setdefault(model, []).append(agent)

        async def run() -> None:
            for model, agents in by_model.items():
                try:
                    await models.unload(model, agents)
                except AppError as error:
                    logger.warning("keep_alive 0: could not unload %s on %s: %s", model, ", ".join(agents),
                                   error.message)

        task = asyncio.get_running_loop().create_task(run(), name="keep-alive-unload")
        unloading.add(task)
        task.add_done_callback(unloading.discard)

    async def load_or_unload(model: str, keep_alive: Any) -> tuple[str, str]:
        """An empty prompt: Ollama's load (or unload with ``keep_alive: 0``); the model name and the done_reason."""
        mode = context.resolve_mode(model)
        if mode in VIRTUAL_MODELS:
            return mode, "load"
        if keep_alive_is_zero(keep_alive):
            await models.unload(mode)
            return mode, "unload"
        await models.load(mode)
        return mode, "load"

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
        keep_alive: Any,
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
                "done_reason": finish_reason(record),
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
            if keep_alive_is_zero(keep_alive):
                unload_after(record)
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
                    elif isinstance(event, AnswerRestarted):
                        streamed = False
                        line = {"model": event.model or model, "created_at": now_iso(),
                                **piece(restart_marker(event)), "done": False, "slb": restart_event(event)}
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
                if keep_alive_is_zero(keep_alive):
                    unload_after(answer.record)

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
            mode, reason = await load_or_unload(payload.model, payload.keep_alive)
            return JSONResponse(
                {"model": mode, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": reason}
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
            keep_alive=payload.keep_alive,
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
            mode, reason = await load_or_unload(payload.model, payload.keep_alive)
            return JSONResponse(
                {"model": mode, "created_at": now_iso(), "response": "", "done": True, "done_reason": reason}
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
            keep_alive=payload.keep_alive,
        )

    served = served_routes(ollama)

    @ollama.api_route("", methods=ANY_METHOD, include_in_schema=False)
    @ollama.api_route("/{path:path}", methods=ANY_METHOD, include_in_schema=False)
    async def not_served(request: Request, path: str = "") -> Response:
        """Everything else under /api: Ollama's error shape, with what to do instead (never FastAPI's 404)."""
        wrong = wrong_method(request.url.path, request.method, served)
        if wrong is not None:
            raise wrong
        advice = NOT_SERVED.get(path.split("/", 1)[0])
        if advice is not None:
            raise ApiError(501, advice, "not_supported")
        listed = ", ".join(sorted(served))
        raise ApiError(404, f"{request.url.path} is not part of this cluster's Ollama API; it serves {listed}",
                       "not_found")

    return ollama

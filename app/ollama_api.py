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
from app.api_parameters import check_ollama, ollama_keep_alive, ollama_options
from app.errors import AppError, BadRequest
from app.images import checked_images
from app.ollama_models import build_ollama_model_routes, keep_alive_is_zero
from app.store.prompt import api_citations
from app.structured import answer_check, ollama_format
from app.tools import RequestToolCall, checked_tools, ollama_calls, wire_calls
from broker.coordinator.contract import Aggregation, AnswerRestarted, QueryFailed, QueryFinished, TextDelta
from broker.protocol.messages import ChatMessage, ToolCall

logger = logging.getLogger(__name__)

OLLAMA_VERSION = "0.6.8"
"""The Ollama API level this surface speaks (clients such as Open WebUI check it)."""
class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[RequestToolCall] | None = None
    tool_name: str | None = Field(default=None, max_length=200)
    name: str | None = Field(default=None, max_length=200)
    thinking: str | None = None  # an earlier turn's thinking: accepted, not sent on (docs/api.md "Parameters")


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
    tools: list[Any] | None = None


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
}
"""Ollama endpoints the cluster does not serve (501), each with what to do instead."""


def runtime_fields(format_value: Any, keep_alive: Any, think: Any) -> dict[str, Any]:
    """What a chat or generate request asks of the runtime beyond messages and options (``QueryRequest`` fields):
    structured output and its check, ``think: false``, and ``keep_alive`` (``0`` is the app's own unload after
    the answer: app/ollama_models.py)."""
    wanted = ollama_format(format_value)
    fields: dict[str, Any] = {"format": wanted, "check_answer": answer_check(wanted)}
    if think is False:
        fields["think"] = False
    lasting = ollama_keep_alive(keep_alive)
    if lasting is not None and not keep_alive_is_zero(keep_alive):
        fields["keep_alive"] = lasting
    return fields


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
        tools: list[dict[str, Any]] | None = None,
        query_fields: dict[str, Any] | None = None,
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
            tools=tools,
            query_fields=query_fields,
        )

        def piece(text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
            if kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = ollama_calls(calls)
                return {"message": message}
            return {"response": text}

        def final(record: AnswerRecord, text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
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
                **piece(text, calls),
                "done": True,
                "done_reason": "stop" if record.tool_calls else finish_reason(record),  # Ollama's word with calls
                "total_duration": int(total_s * 1e9),
                "load_duration": 0,
                "prompt_eval_count": numbers["prompt_tokens"],
                "prompt_eval_duration": int((numbers["ttft_s"] or 0.0) * 1e9),
                "eval_count": numbers["output_tokens"],
                "eval_duration": int(eval_s * 1e9),
                "slb": provenance(record, mode, simulated_agents(service.coordinator.snapshot())),
            }
            if use_rag:  # the sources of a RAG answer, on the final object (docs/api.md)
                body["citations"] = api_citations(answer.citations)
            if kind == "generate":
                body["context"] = []
            return body

        if not stream:
            record = await run_to_end(answer, request)
            if keep_alive_is_zero(keep_alive):
                unload_after(record)
            if record.finished is None:
                raise unfinished_error(record)
            return JSONResponse(final(record, record.text, record.tool_calls), headers=provenance_headers(record))

        routed = await read_until_routed(answer, past_start=tools is not None)  # a refusal of tools is a 400

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
                        if event.tool_calls:  # Ollama sends the calls in a chunk of their own before the last
                            line = {"model": ",".join(event.models) or model, "created_at": now_iso(),
                                    **piece("", list(event.tool_calls)), "done": False}
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
        check_ollama(body, generate=False)  # refused parameters: a 400 naming them (app/api_parameters.py)
        try:
            payload = OllamaChatRequest.model_validate(body)
        except ValidationError as error:
            raise BadRequest(validation_message(error)[0]) from None
        images = checked_images([message.images or [] for message in payload.messages], "messages")
        options = ollama_options(payload.options)
        if not payload.messages:
            mode, reason = await load_or_unload(payload.model, payload.keep_alive)
            return JSONResponse(
                {"model": mode, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": reason}
            )
        texts = [message.content for message in payload.messages]
        check_total(settings.max_prompt_chars, settings.max_messages, texts)
        tools, _ = checked_tools(payload.tools)
        messages = [ChatMessage(role=message.role, content=message.content, tool_calls=wire_calls(message.tool_calls),
                                name=(message.tool_name or message.name) if message.role == "tool" else None,
                                images=pictures)
                    for message, pictures in zip(payload.messages, images, strict=True)]
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
            tools=tools,
            query_fields=runtime_fields(payload.format, payload.keep_alive, body.get("think")),
        )

    @ollama.post("/generate")
    async def ollama_generate(request: Request) -> Response:
        """Ollama generate: a prompt in, NDJSON ``response`` pieces out (or one object with ``stream: false``)."""
        body = await json_body(request)
        check_ollama(body, generate=True)
        try:
            payload = OllamaGenerateRequest.model_validate(body)
        except ValidationError as error:
            raise BadRequest(validation_message(error)[0]) from None
        images = checked_images([payload.images or []], "images")[0]
        options = ollama_options(payload.options)
        if not payload.prompt:
            mode, reason = await load_or_unload(payload.model, payload.keep_alive)
            return JSONResponse(
                {"model": mode, "created_at": now_iso(), "response": "", "done": True, "done_reason": reason}
            )
        texts = [payload.prompt, payload.system or ""]
        check_total(settings.max_prompt_chars, settings.max_messages, texts)
        messages = [ChatMessage(role="system", content=payload.system)] if payload.system else []
        messages.append(ChatMessage(role="user", content=payload.prompt, images=images))
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
            query_fields=runtime_fields(payload.format, payload.keep_alive, body.get("think")),
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

"""OpenAI-compatible chat: ``POST /v1/chat/completions`` (SSE when streamed) and ``GET /v1/models``.

``model`` picks the routing: a model name, or ``auto`` / ``quality`` / ``all``
(docs/api.md). ``aggregation`` and ``rag`` are this server's extensions
(``extra_body`` in the openai SDK). Responses carry ``slb``: who answered, and
with ``rag`` the sources in ``citations`` (the final chunk when streamed).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.answers import AnswerRecord, finish_reason, provenance, simulated_agents, usage_numbers
from app.api_common import (
    ANY_METHOD,
    OWNER,
    VIRTUAL_MODELS,
    ApiContext,
    ApiError,
    check_total,
    json_body,
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
from app.api_parameters import check_openai
from app.errors import BadRequest
from app.images import checked_images, fetched_images, openai_part_image
from app.model_list import ListedModel
from app.store.prompt import api_citations
from app.structured import answer_check, openai_format
from app.tools import RequestToolCall, checked_tools, openai_calls, wire_calls
from broker.coordinator.contract import Aggregation, AnswerRestarted, QueryFailed, QueryFinished, TextDelta
from broker.protocol.messages import ChatMessage

logger = logging.getLogger(__name__)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None
    image_url: Any = None  # a data: URL for vision models (app/images.py)


class OpenAIMessage(BaseModel):
    """A chat message as OpenAI clients send it; only text content is accepted."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[RequestToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=200)
    name: str | None = Field(default=None, max_length=200)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if part.type == "image_url":
                continue  # carried by images()
            if part.type != "text" or part.text is None:
                raise BadRequest(f"only text content is supported, got a {part.type!r} part", param="messages")
            parts.append(part.text)
        return "".join(parts)

    def images(self) -> list[str]:
        """The data: URLs of the ``image_url`` parts (checked by app/images.py)."""
        if not isinstance(self.content, list):
            return []
        return [openai_part_image(part.image_url, "messages") for part in self.content if part.type == "image_url"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    include_obfuscation: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``aggregation`` and ``rag`` are this server's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1, le=1)  # n > 1 is refused first (app/api_parameters.py)
    top_k: int | None = Field(default=None, ge=0)  # llama.cpp's and vLLM's sampling extras
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)
    response_format: Any = None  # app/structured.py
    prompt_cache_key: str | None = Field(default=None, max_length=200)  # the conversation, for affinity routing
    aggregation: Aggregation = Aggregation.CONSENSUS
    rag: bool = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 8:
            raise ValueError("at most 8 stop sequences")
        return value

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repeat_penalty"):
            value = getattr(self, name)
            if value is not None:
                options[name] = value
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            options["num_predict"] = limit
        if self.stop is not None:
            options["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return options


NOT_SERVED = {
    "completions": "the cluster serves chat only: send the prompt as a user message to /v1/chat/completions",
    "embeddings": "the cluster does not serve embeddings (/v1/embeddings): point your embedding client at a "
                  "runtime directly; the cluster answers /v1/chat/completions",
    "responses": "the cluster does not serve the Responses API (/v1/responses): use /v1/chat/completions",
}
"""OpenAI endpoints clients try that the cluster does not serve, each with what to do instead."""


def openai_model_item(model: ListedModel, created: int) -> dict[str, Any]:
    """A ``/v1/models`` entry; ``slb_agents`` (who can answer with it now) and ``slb_holders`` (each agent's own
    name for it and its state) are this server's extensions, ``slb_coming_to`` the agents still pulling it."""
    item: dict[str, Any] = {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "slb_agents": model.agents,
        "slb_holders": [{"agent_id": holder.agent_id, "name": holder.name, "state": holder.state,
                         "simulated": holder.simulated} for holder in model.holders],
    }
    if model.coming_to:
        item["slb_coming_to"] = model.coming_to
    info = model.info
    if info is not None and info.context_length:
        item["slb_context_length"] = info.context_length
    if info is not None and info.parameters_b:
        item["slb_parameters_b"] = info.parameters_b
    return item


def build_openai_router(context: ApiContext) -> APIRouter:
    """The ``/v1`` routes."""
    service, settings = context.service, context.settings
    openai = APIRouter(prefix="/v1", dependencies=[Depends(context.require_api_key)], tags=["openai"])

    def model_items() -> list[dict[str, Any]]:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": OWNER, "description": description}
            for name, description in VIRTUAL_MODELS.items()
        ]
        return data + [openai_model_item(model, created) for model in service.models()]

    @openai.get("/models")
    async def list_models() -> dict[str, Any]:
        """The routing modes and every model the cluster serves, each with the machines that have it."""
        return {"object": "list", "data": model_items()}

    @openai.get("/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        """One model of :func:`list_models` (the SDK's ``models.retrieve``)."""
        name = context.resolve_mode(model)
        found = next((item for item in model_items() if item["id"] == name), None)
        if found is None:  # it left the cluster between the two looks
            raise ApiError(404, f"model {model!r} is not served by this cluster", "model_not_found")
        return found

    @openai.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streamed as server-sent events when ``stream`` is true."""
        body = await json_body(request)
        check_openai(body, ChatCompletionRequest.model_fields)  # refused and unknown parameters: a 400 naming them
        try:
            payload = ChatCompletionRequest.model_validate(body)
        except ValidationError as error:
            message, param = validation_message(error)
            raise BadRequest(message, code="invalid_request", param=param) from None
        wanted = openai_format(payload.response_format)
        query_fields: dict[str, Any] = {"format": wanted, "check_answer": answer_check(wanted)}
        if payload.prompt_cache_key:
            query_fields["conversation"] = payload.prompt_cache_key
        texts = [message.text() for message in payload.messages]
        check_total(settings.max_prompt_chars, settings.max_messages, texts)
        tools, tool_choice = checked_tools(payload.tools, payload.tool_choice)
        mode = context.resolve_mode(payload.model)
        images = checked_images(await fetched_images(
            [message.images() for message in payload.messages], allow_remote=settings.allow_remote_images,
            allow_local=settings.allow_local_image_urls), "messages")
        messages = [
            ChatMessage(role="system" if message.role == "developer" else message.role, content=text,
                        tool_calls=wire_calls(message.tool_calls), tool_call_id=message.tool_call_id,
                        name=message.name if message.role == "tool" else None, images=pictures)
            for message, text, pictures in zip(payload.messages, texts, images, strict=True)
        ]
        question = next((text for message, text in zip(payload.messages, texts, strict=True)
                         if message.role == "user"), "")
        answer = await service.ask(
            question if payload.rag else "",
            messages=messages,
            mode=mode,
            aggregation=payload.aggregation,
            use_rag=payload.rag,
            options=payload.options(),
            tools=tools,
            tool_choice=tool_choice,
            query_fields=query_fields,
        )
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        cited = {"citations": api_citations(answer.citations)} if payload.rag else {}

        def usage(record: AnswerRecord) -> dict[str, int]:
            numbers = usage_numbers(record)
            return {
                "prompt_tokens": numbers["prompt_tokens"],
                "completion_tokens": numbers["output_tokens"],
                "total_tokens": numbers["prompt_tokens"] + numbers["output_tokens"],
            }

        def slb(record: AnswerRecord) -> dict[str, Any]:
            return provenance(record, mode, simulated_agents(service.coordinator.snapshot()))

        def reason(record: AnswerRecord) -> str:
            return "tool_calls" if record.tool_calls else finish_reason(record)

        if not payload.stream:
            record = await run_to_end(answer, request)
            if record.finished is None:
                raise unfinished_error(record)
            message: dict[str, Any] = {"role": "assistant", "content": record.text}
            if record.tool_calls:  # OpenAI: content null when the answer is only calls
                message = {"role": "assistant", "content": record.text or None,
                           "tool_calls": openai_calls(record.tool_calls)}
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": ",".join(record.models) or payload.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "finish_reason": reason(record),
                            "logprobs": None,
                        }
                    ],
                    "usage": usage(record),
                    "system_fingerprint": None,
                    "slb": slb(record),
                    **cited,
                },
                headers=provenance_headers(record),
            )

        routed = await read_until_routed(answer, past_start=tools is not None)  # a refusal of tools is a 400
        record = answer.record
        include_usage = bool(payload.stream_options and payload.stream_options.include_usage)
        obfuscate = bool(payload.stream_options and payload.stream_options.include_obfuscation)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": ",".join(record.models) or payload.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
            if obfuscate and delta.get("content"):  # OpenAI's padding, so chunk sizes do not reveal the text
                body["obfuscation"] = secrets.token_urlsafe(secrets.randbelow(24) + 1)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            streamed = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for event in routed.events():
                    if isinstance(event, TextDelta) and event.text:
                        streamed = True
                        yield chunk({"content": event.text})
                    elif isinstance(event, AnswerRestarted):
                        streamed = False
                        yield chunk({"content": restart_marker(event)}, slb=restart_event(event))
                    elif isinstance(event, QueryFinished):
                        if not streamed and event.text:
                            yield chunk({"content": event.text})
                        if event.tool_calls:  # complete calls, one delta (docs/api.md "Tools")
                            yield chunk({"tool_calls": openai_calls(event.tool_calls, streamed=True)})
                        yield chunk({}, reason(record), slb=slb(record), **cited)
                        if include_usage:
                            usage_chunk = {
                                "id": completion_id,
                                "object": "chat.completion.chunk",
                                "created": created,
                                "model": ",".join(record.models) or payload.model,
                                "choices": [],
                                "usage": usage(record),
                            }
                            yield f"data: {json.dumps(usage_chunk)}\n\n"
                    elif isinstance(event, QueryFailed):
                        error = {
                            "message": event.error,
                            "type": "server_error",
                            "param": None,
                            "code": event.code,
                        }
                        yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await answer.aclose()

        return StreamingResponse(
            sse(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **provenance_headers(record)},
        )

    served = served_routes(openai)

    @openai.api_route("/{path:path}", methods=ANY_METHOD, include_in_schema=False)
    async def not_served(request: Request, path: str) -> Response:
        """Everything else under /v1: OpenAI's error shape, with what to do instead (never FastAPI's 404)."""
        wrong = wrong_method(request.url.path, request.method, served)
        if wrong is not None:
            raise wrong
        advice = NOT_SERVED.get(path.strip("/"))
        listed = ", ".join(sorted(served))
        raise ApiError(404, advice or f"{request.url.path} is not part of this cluster's OpenAI API; it serves "
                                      f"{listed}", "unsupported_endpoint")

    return openai

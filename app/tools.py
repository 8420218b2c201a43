"""Tool calling in both APIs' dialects (docs/api.md "Tools").

The cluster carries tool definitions in OpenAI's shape (which Ollama takes as is) and calls as
:class:`~broker.protocol.messages.ToolCall` (arguments as JSON text). Here requests are checked and calls
are spelled the way each API spells them: OpenAI's arguments are JSON text with an ``id`` per call, Ollama's an
object.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api_common import validation_message
from app.errors import BadRequest
from broker.protocol.messages import MAX_TOOL_CALLS, MAX_TOOLS, ToolCall

TOOL_CHOICES = ("none", "auto", "required")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(BaseModel):
    """One entry of ``tools``; only functions exist in both APIs."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=200)
    arguments: Any = None


class RequestToolCall(BaseModel):
    """A call in an assistant message of the conversation (either API's spelling)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, max_length=200)
    type: str | None = None
    function: CalledFunction


def checked_tools(tools: Any, tool_choice: Any = None) -> tuple[list[dict[str, Any]] | None, Any]:
    """``tools`` and ``tool_choice`` as the cluster carries them, or a 400 naming what is wrong.

    The definitions go on as the client wrote them (fields this server does not know included), so the runtime
    sees exactly what it would have seen.
    """
    if tools is None or tools == []:
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise BadRequest("tool_choice asks for a tool call but the request has no tools", param="tool_choice")
        return None, None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of function definitions", param="tools")
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"too many tools: {len(tools)}; the limit is {MAX_TOOLS}", param="tools")
    try:
        definitions = [ToolDefinition.model_validate(tool) for tool in tools]
    except ValidationError as error:
        raise BadRequest(validation_message(error)[0].replace("invalid request:", "invalid tools:"),
                         param="tools") from None
    names = [definition.function.name for definition in definitions]
    if tool_choice is not None and not (isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES):
        wanted = None
        if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            wanted = tool_choice["function"].get("name")
        if not isinstance(wanted, str):
            raise BadRequest("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}", param="tool_choice")
        if wanted not in names:
            raise BadRequest(f"tool_choice names {wanted!r}, which is not among the tools ({', '.join(names)})",
                             param="tool_choice")
    return [dict(tool) for tool in tools], tool_choice


def wire_calls(calls: list[RequestToolCall] | None) -> list[ToolCall] | None:
    """An assistant message's calls as the protocol carries them (arguments as JSON text)."""
    if not calls:
        return None
    if len(calls) > MAX_TOOL_CALLS:
        raise BadRequest(f"a message has {len(calls)} tool calls; the limit is {MAX_TOOL_CALLS}", param="messages")
    return [ToolCall(id=call.id, name=call.function.name, arguments=arguments_text(call.function.arguments))
            for call in calls]


def arguments_text(arguments: Any) -> str:
    """Arguments as JSON text: OpenAI's text stays as it is, Ollama's object is written compactly."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False, separators=(",", ":"))


def openai_calls(calls: list[ToolCall], *, streamed: bool = False) -> list[dict[str, Any]]:
    """Calls in OpenAI's shape; a call the runtime gave no id gets one (the client answers it by that id)."""
    spelled = []
    for index, call in enumerate(calls):
        item: dict[str, Any] = {"id": call.id or "call_" + secrets.token_hex(12), "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}
        spelled.append({"index": index, **item} if streamed else item)
    return spelled


def ollama_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Calls in Ollama's shape: arguments as an object (text that is not JSON stays text)."""
    spelled = []
    for call in calls:
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            arguments = call.arguments
        item: dict[str, Any] = {"function": {"name": call.name, "arguments": arguments}}
        if call.id:
            item = {"id": call.id, **item}
        spelled.append(item)
    return spelled

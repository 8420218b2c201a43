"""Structured output (docs/api.md, "Structured output"): OpenAI's ``response_format`` and Ollama's ``format`` in,
one wire value out (``"json"`` or a JSON schema, ``Job.format``), and the test every finished answer must pass.

The runtimes enforce the format themselves (Ollama's ``format``, llama.cpp's and llama-cpp-python's grammars,
vLLM's guided decoding); the cluster checks the result anyway, because a runtime may ignore the field (an
OpenAI-compatible server that does not know it) or stop early: an answer that does not parse, or does not fit the
schema, is never returned as a success (the coordinator gives the question to another agent, then fails with
``invalid_output``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from app.errors import BadRequest

logger = logging.getLogger(__name__)

Format = str | dict[str, Any]
"""``"json"`` (any JSON value) or a JSON schema."""


def _walk(value: Any) -> list[Any]:
    """Every dict and list inside ``value`` (the request body is at most 32 levels deep: no recursion limit)."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def checked_schema(schema: Any, param: str) -> dict[str, Any]:
    """``schema`` if it is a usable JSON schema, else a 400 naming ``param``: it must be an object, valid for its
    draft, and refer only to itself (``$ref`` ``#…``: the cluster never fetches a schema from elsewhere)."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{param} must be a JSON schema (an object)", param=param)
    remote = next((node["$ref"] for node in _walk(schema)
                   if isinstance(node.get("$ref"), str) and not node["$ref"].startswith("#")), None)
    if remote is not None:
        raise BadRequest(f"{param} refers to {remote!r}; only references within the schema ('#/…') are allowed",
                         param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as error:
        raise BadRequest(f"{param} is not a valid JSON schema: {error.message}", param=param) from None
    return schema


def openai_format(response_format: Any) -> Format | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (or none) → ``None``; ``json_object`` → ``"json"``;
    ``json_schema`` → its ``json_schema.schema`` (``"json"`` when it has none)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise BadRequest("response_format must be an object such as {\"type\": \"json_object\"}",
                         param="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("response_format.json_schema must be an object with 'name' and 'schema'",
                             param="response_format.json_schema")
        if spec.get("schema") is None:
            return "json"
        return checked_schema(spec["schema"], "response_format.json_schema.schema")
    raise BadRequest(f"response_format.type {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'",
                     param="response_format.type")


def ollama_format(value: Any) -> Format | None:
    """Ollama's ``format``: ``"json"``, a JSON schema, or nothing (``""`` / ``null``)."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return checked_schema(value, "format")
    raise BadRequest(f'invalid format: expected "json" or a JSON schema, got {json.dumps(value)[:60]}',
                     param="format")


def answer_problem(text: str, wanted: Format) -> str | None:
    """Why ``text`` is not the structured answer asked for, or ``None`` when it is."""
    try:
        value = json.loads(text)
    except ValueError as error:
        where = f" at line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        return f"the answer is not valid JSON ({reason}{where}; {len(text)} characters)"
    if not isinstance(wanted, dict):
        return None
    validator = jsonschema.validators.validator_for(wanted)(wanted)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path) or "the top level"
    return f"the answer does not fit the schema: {error.message[:300]} (at {where})"


def answer_check(wanted: Format | None) -> Callable[[str], str | None] | None:
    """The coordinator's test of a finished answer (``QueryRequest.check_answer``) for ``wanted``."""
    if wanted is None:
        return None

    def check(text: str) -> str | None:
        return answer_problem(text, wanted)

    return check

"""TEST DOUBLE of an Ollama server (and of an OpenAI-compatible server) — not a real LLM.

The real runtime cannot run in CI, so the agent, the coordinator, the web app
tests and the benchmarks talk to this small stdlib HTTP server instead. It
speaks the documented wire formats closely enough for the official ``ollama``
client, ``httpx`` and the ``openai`` SDK, and "generates" deterministic text
so tests can check exactly what was streamed.

Endpoints
    Ollama:  POST /api/chat, POST /api/generate (NDJSON when ``stream`` is true or
             absent, one JSON object when false; the last object has done=true,
             done_reason and the *_duration (ns) / *_count stats), GET /api/tags,
             POST /api/pull (NDJSON progress; unknown model -> {"error": "pull model
             manifest: file does not exist"}), POST /api/show, GET /api/ps,
             DELETE /api/delete (body {"model"}; 200 with an empty body, or 404
             {"error": "model 'x' not found"}), GET /api/version. A missing model
             answers 404 with {"error": "model \"x\" not found, try pulling it first"}.
    OpenAI:  GET /v1/models, POST /v1/chat/completions (SSE ``data: {...}`` lines
             ending with ``data: [DONE]``; usage chunk when
             ``stream_options.include_usage``).
    Control: POST /_double/config (JSON object: set any DoubleConfig field),
             GET /_double/stats (counters, see DoubleStats).

Like real Ollama (what a CPU box cannot show with the real thing)
    * ``num_parallel`` (``OLLAMA_NUM_PARALLEL``, default 1 as Ollama picks on small machines;
      ``--num-parallel``, or ``POST /_double/config {"num_parallel": 4}`` while running): at most that many
      generations run at once; the others wait, in arrival order, before any byte of their answer (Ollama
      queues them; it never interrupts a running answer). A caller that hangs up while waiting leaves the queue.
    * ``/api/ps`` lists what is really loaded: a model loads on first use or on a generate/chat with an empty
      prompt / no messages (``done_reason: "load"``), and stays ``keep_alive`` after its last request (Ollama's
      default 5 minutes; ``keep_alive_s`` here). ``keep_alive: 0`` in a chat/generate unloads the model when that
      request ends; an empty prompt with ``keep_alive: 0`` unloads it at once (``done_reason: "unload"``), or when
      its running answers end. A negative ``keep_alive`` keeps it loaded for good. Deleting a model does not
      unload it (neither does Ollama's ``/api/delete``).

    * ``prefill_tokens_per_s`` (0: free): reading the prompt costs one token's time per prompt token that is not
      already in the slot's cache. Each slot keeps the last prompt it read plus the answer it generated (as
      llama.cpp's slots and Ollama's runner do); a request takes the free slot whose cache shares the longest
      prefix with its prompt, so the next turn of a conversation on the same machine reads only the new part.
      Prompt tokens are the words of ``role: content`` of every message.

What it answers
    The reply to a conversation is ``reply_text(prompt)``: "Echo:" followed by
    the words of the last user message (``prompt`` for /api/generate), cycled to
    ``reply_tokens`` tokens when that is set — or to N tokens when the last user
    message holds the marker ``[[reply:N]]`` (a benchmark's way to set a length
    the router cannot see). One word = one token = one
    streamed piece (" word", the first without the space). ``num_predict``
    (Ollama options) or ``max_tokens`` (OpenAI) cut it short (done_reason
    "length"). When the last message is an assistant message, the double
    continues it: if it is a prefix of the full reply, only the rest is
    streamed, otherwise the full reply is.

Tools (Ollama's format on /api/chat, Ollama's /v1 format on /v1)
    With ``tools`` the double calls a tool when the last message is the user's and names it (or ``tool_choice``
    names one; ``none`` never calls): :func:`tool_calls_for`. Ollama: ``message.tool_calls`` with arguments as
    an object, in a chunk of its own before the final one; /v1: one delta ``tool_calls`` chunk (ids
    ``call_N``, compact JSON arguments) and ``finish_reason: "tool_calls"``. After a ``tool`` message the reply
    echoes the tool's result. Models in ``no_tools`` refuse tools with Ollama's 400
    ``registry.ollama.ai/library/<model> does not support tools``.

Speed and faults (fields of :class:`DoubleConfig`, changeable while running)
    tokens_per_s, ttft_s, load_s (first use of a model), pull_total_bytes,
    pull_bytes_per_s; die_after_tokens (drop the connection mid-stream),
    stall_before_first_token_s, stall_after_tokens + stall_s, context_limit
    (prompt words; above it -> error), fail_chat_status (answer every chat with
    this HTTP status), malformed_after_tokens (a line that is not JSON in the middle
    of a stream), interrupt_after_tokens (/v1 only: end the stream cleanly with
    ``data: [DONE]`` and no finish reason, as llama-cpp-python does to a running answer
    when another request arrives), invalid_json (a request with ``format`` / ``response_format``
    gets text that is not JSON; without the fault it gets ``{"answer": …}`` or the schema's properties).
    ``refuse_connections()`` closes the listening socket and every open connection (clients see "connection refused");
    ``accept_connections()`` listens again on the same port.

Example::

    from tests.ollama_double import OllamaDouble, reply_text

    with OllamaDouble(models=["llama3.2:1b"], tokens_per_s=500) as double:
        client = ollama.Client(host=double.url)
        text = "".join(part.message.content for part in
                       client.chat("llama3.2:1b", [{"role": "user", "content": "hi there"}], stream=True))
        assert text == reply_text("hi there")          # "Echo: hi there"
        double.config.die_after_tokens = 1              # the next stream breaks after one token

As a process: ``python -m tests.ollama_double --port 11434 --models llama3.2:1b
--tokens-per-s 50 --ttft-ms 100 --num-parallel 2``; it prints ``READY http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import select
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_PULLABLE = frozenset({
    "llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "llama3.2:latest", "qwen2.5:0.5b", "qwen2.5:1.5b", "qwen2.5:3b",
    "qwen2.5:7b", "qwen2.5:14b", "gemma2:2b", "gemma2:9b", "phi3:mini", "mistral:7b", "tinyllama:latest",
})
"""Models the double can "pull" unless the config says otherwise."""

_TOKEN_RE = re.compile(r"\s*\S+")
REPLY_MARKER = re.compile(r"\[\[reply:(\d{1,6})\]\]")
"""In the last user message: answer this many tokens (overrides ``reply_tokens``)."""
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_KEEP_ALIVE_S = 300.0
"""Ollama keeps a model loaded 5 minutes after its last request unless told otherwise."""


def normalize_model(name: str) -> str:
    """Ollama's naming: a model without a tag means ``:latest``."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def reply_tokens(prompt: str, count: int | None = None) -> list[str]:
    """The pieces the double streams for ``prompt`` (first without a leading space)."""
    words = ["Echo:", *(prompt.split() or ["(empty)"])]
    if count is not None and count > 0:
        words = [words[index % len(words)] for index in range(count)]
    return [words[0], *(" " + word for word in words[1:])]


def reply_text(prompt: str, count: int | None = None) -> str:
    """The full text the double answers to ``prompt``."""
    return "".join(reply_tokens(prompt, count))


def tool_calls_for(messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any = None,
                   ) -> list[dict[str, Any]]:
    """The calls the double makes, in Ollama's shape (arguments as an object): when the last message is the user's
    and names a tool (or ``tool_choice`` names one), that tool is called; each of its string parameters gets the
    word after the tool's name in the message (``"call get_weather Paris"`` → ``{"city": "Paris"}``), numbers 1,
    booleans true. ``tool_choice: none`` and a last message that is a tool result never call."""
    if not tools or tool_choice == "none" or not messages or messages[-1].get("role") != "user":
        return []
    text = str(messages[-1].get("content") or "")
    words = text.replace("?", " ").replace(".", " ").replace(",", " ").split()
    forced = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    for tool in tools:
        function = tool.get("function") or {}
        name = function.get("name")
        if not name or (forced and name != forced) or (not forced and name not in words):
            continue
        after = words[words.index(name) + 1] if name in words and words.index(name) + 1 < len(words) else ""
        properties = (function.get("parameters") or {}).get("properties") or {}
        arguments: dict[str, Any] = {}
        for key, schema in properties.items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            arguments[key] = 1 if kind in ("number", "integer") else True if kind == "boolean" else after
        return [{"function": {"name": name, "arguments": arguments}}]
    return []


def openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls as Ollama's ``/v1`` writes them: an id each, arguments as compact JSON text."""
    return [{"id": f"call_{index}", "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"]["arguments"], separators=(",", ":"))}}
            for index, call in enumerate(calls)]


def requested_format(body: dict[str, Any], api: str) -> str | dict[str, Any] | None:
    """Ollama's ``format`` ("json" or a schema) or OpenAI's ``response_format`` (json_object, json_schema, and
    llama-cpp-python's ``{"type": "json_object", "schema": …}``), as "json" or the schema; ``None``: plain text."""
    if api != "openai":
        wanted = body.get("format")
        return wanted if wanted == "json" or isinstance(wanted, dict) else None
    wanted = body.get("response_format")
    if not isinstance(wanted, dict) or wanted.get("type") not in ("json_object", "json_schema"):
        return None
    schema = wanted.get("schema") or (wanted.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else "json"


def format_reply(wanted: str | dict[str, Any], text: str) -> str:
    """The JSON answer to a structured request: ``{"answer": text}`` for "json"; for a schema, each property
    of the top-level object gets the smallest value of its type (strings get ``text``)."""
    if not isinstance(wanted, dict):
        return json.dumps({"answer": text})
    samples = {"string": text, "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {},
               "null": None}
    properties = wanted.get("properties") or {}
    value = {name: (spec.get("enum") or [samples.get(spec.get("type", "string"), text)])[0]
             for name, spec in properties.items() if isinstance(spec, dict)}
    return json.dumps(value)


def split_tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def prompt_tokens(messages: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """The prompt as the double's prefill reads it: the words of ``role: content`` of every message."""
    words: list[str] = []
    for message in messages:
        words.append(f"{message.get('role')}:")
        words.extend(str(message.get("content") or "").split())
    return tuple(words)


def common_prefix(first: tuple[str, ...], second: tuple[str, ...]) -> int:
    """How many leading tokens two prompts share."""
    count = 0
    for left, right in zip(first, second, strict=False):
        if left != right:
            break
        count += 1
    return count


class InvalidDuration(ValueError):
    """A ``keep_alive`` Ollama would refuse (Go's ``time.ParseDuration`` message)."""


def keep_alive_seconds(value: Any, default: float) -> float | None:
    """Ollama's ``keep_alive``: seconds as a number or a Go duration ("5m", "1h30m", "0"); negative: forever (None)."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidDuration(f"time: invalid duration {json.dumps(value)}")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    text = str(value).strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    parts = _DURATION_RE.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise InvalidDuration(f'time: invalid duration "{text}"')
    seconds = sign * sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    return None if seconds < 0 else seconds


@dataclass
class DoubleConfig:
    """Behaviour of the double; every field may be changed while it runs."""

    models: set[str] = field(default_factory=lambda: {"llama3.2:1b"})
    pullable: set[str] | None = field(default_factory=lambda: set(DEFAULT_PULLABLE))  # None: any name
    tokens_per_s: float = 200.0  # 0: as fast as possible
    ttft_s: float = 0.0
    load_s: float = 0.0
    reply_tokens: int | None = None
    pull_total_bytes: int = 20_000_000
    pull_bytes_per_s: float = 400_000_000.0  # 0: instant
    pull_step_s: float = 0.02
    die_after_tokens: int | None = None
    stall_before_first_token_s: float = 0.0
    stall_after_tokens: int | None = None
    stall_s: float = 0.0
    context_limit: int | None = None
    fail_chat_status: int | None = None
    malformed_after_tokens: int | None = None
    interrupt_after_tokens: int | None = None
    invalid_json: bool = False  # with format / response_format: answer text that is not JSON (a broken runtime)
    prefill_tokens_per_s: float = 0.0  # > 0: reading each prompt token not in the slot's cache costs time
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL: generations at once; the rest wait in order
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # a request's keep_alive overrides it
    version: str = "0.6.5-double"
    no_tools: set[str] = field(default_factory=set)  # models that refuse tools ("... does not support tools")
    vision_models: set[str] = field(default_factory=set)  # models that take images; others refuse them (T3)
    embedding_dims: int = 768  # numbers per vector of /api/embed and /api/embeddings (T3)
    # model -> texts -> vectors: that model's /api/embed and /api/embeddings answer with these (e.g. the real
    # local MiniLM for all-minilm) instead of hash numbers (T5, RAG uploads on the cluster)
    embed_functions: dict[str, Callable[[list[str]], list[list[float]]]] = field(default_factory=dict)


@dataclass
class DoubleStats:
    """What happened, for assertions."""

    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (method, path, body)
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted_by_client: int = 0
    streams_killed: int = 0
    active_streams: int = 0
    pulls_completed: int = 0
    generations_running: int = 0  # holding one of the num_parallel slots now
    peak_generations_running: int = 0
    waited_for_slot: int = 0  # generations that had to queue behind running ones
    left_queue: int = 0  # callers that hung up while waiting for a slot
    arrived: list[str] = field(default_factory=list)  # the last user message of each generation, as they came
    slot_order: list[str] = field(default_factory=list)  # ... and as they got a slot
    unloaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    prompt_tokens_read: int = 0  # prompt tokens prefilled (not found in a slot's cache)
    prompt_tokens_cached: int = 0  # prompt tokens a slot's cache already held (shared prefix)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["requests"] = len(self.requests)
        return data


class _ClientGone(Exception):
    """The client closed the connection while we were streaming."""


class _SlotQueue:
    """At most ``limit()`` generations at once, the others served first come, first served (Ollama's scheduler).

    The limit is read on every wake-up, so changing ``num_parallel`` while requests wait takes effect at once.
    """

    def __init__(self, stats: DoubleStats, stats_lock: threading.Lock) -> None:
        self._condition = threading.Condition()
        self._running = 0
        self._waiting: deque[int] = deque()
        self._tickets = itertools.count()
        self._stats = stats
        self._stats_lock = stats_lock

    def acquire(self, limit: Callable[[], int], gone: Callable[[], bool], stopping: threading.Event) -> bool:
        """Wait for a slot in arrival order; False when the caller hung up or the double stops meanwhile."""
        with self._condition:
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            waited = False
            try:
                while self._waiting[0] != ticket or self._running >= max(1, limit()):
                    if stopping.is_set() or gone():
                        with self._stats_lock:
                            self._stats.left_queue += 1
                        return False
                    waited = True
                    self._condition.wait(0.05)
                self._waiting.popleft()
                self._running += 1
                with self._stats_lock:
                    self._stats.generations_running = self._running
                    self._stats.peak_generations_running = max(self._stats.peak_generations_running, self._running)
                    self._stats.waited_for_slot += int(waited)
                return True
            finally:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                self._condition.notify_all()

    def release(self) -> None:
        with self._condition:
            self._running -= 1
            with self._stats_lock:
                self._stats.generations_running = self._running
            self._condition.notify_all()

    def wake(self) -> None:
        """The limit may have changed: let the waiting re-check it."""
        with self._condition:
            self._condition.notify_all()


class _Killed(Exception):
    """A fault injection dropped the connection."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    double: OllamaDouble

    def handle_error(self, request: object, client_address: object) -> None:
        logger.debug("double: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("double: " + format, *args)

    def setup(self) -> None:
        super().setup()
        self.server.double._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.double._track(self.connection, add=False)

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return {"__invalid__": raw.decode("utf-8", "replace")}
        return value if isinstance(value, dict) else {"__invalid__": value}

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError) as error:
            raise _ClientGone() from error

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as error:
            raise _ClientGone() from error

    def _kill_connection(self) -> None:
        """Drop the connection without finishing the chunked body (a crashed server)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Killed()

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route("GET", {})

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST", self._body())

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE", self._body())

    def _route(self, method: str, body: dict[str, Any]) -> None:
        double = self.server.double
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        with double._lock:
            double.stats.requests.append((method, path, body))
        routes = {
            ("GET", "/"): lambda: self._plain("Ollama is running"),
            ("GET", "/api/version"): lambda: self._json(200, {"version": double.config.version}),
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/show"): lambda: self._show(body),
            ("POST", "/api/pull"): lambda: self._pull(body),
            ("DELETE", "/api/delete"): lambda: self._delete(body),
            ("POST", "/api/chat"): lambda: self._generate(body, api="chat"),
            ("POST", "/api/generate"): lambda: self._generate(body, api="generate"),
            ("POST", "/api/embed"): lambda: self._embed(body, legacy=False),
            ("POST", "/api/embeddings"): lambda: self._embed(body, legacy=True),
            ("GET", "/v1/models"): self._openai_models,
            ("POST", "/v1/chat/completions"): lambda: self._generate(body, api="openai"),
            ("POST", "/_double/config"): lambda: self._configure(body),
            ("GET", "/_double/stats"): lambda: self._json(200, double.stats.as_dict()),
        }
        handler = routes.get((method, path))
        try:
            if handler is None:
                self._json(404, {"error": f"404 page not found: {method} {path}"})
                return
            handler()
        except (_ClientGone, OSError):
            with double._lock:
                double.stats.streams_aborted_by_client += 1
            self.close_connection = True
        except _Killed:
            with double._lock:
                double.stats.streams_killed += 1

    def _plain(self, text: str) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _configure(self, body: dict[str, Any]) -> None:
        config = self.server.double.config
        names = {item.name for item in dataclasses.fields(config)}
        unknown = sorted(set(body) - names)
        if unknown:
            self._json(400, {"error": f"unknown config fields: {unknown}"})
            return
        for name, value in body.items():
            if name in {"models", "pullable", "no_tools"} and value is not None:
                value = {normalize_model(item) for item in value}
            setattr(config, name, value)
        self.server.double._slots.wake()
        self._json(200, {"ok": True})

    def _client_gone(self) -> bool:
        """True when the caller closed its connection (readable with nothing to read) while it waits."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ------------------------------------------------------------------ model inventory

    def _model_entry(self, name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": self.server.double.config.pull_total_bytes,
            "digest": digest,
            "details": {"format": "gguf", "family": name.split(":")[0], "parameter_size": "1.2B",
                        "quantization_level": "Q4_K_M"},
        }

    def _tags(self) -> None:
        models = sorted(self.server.double.config.models)
        self._json(200, {"models": [self._model_entry(name) for name in models]})

    def _ps(self) -> None:
        double = self.server.double
        entries = []
        for name, expires_at in sorted(double.loaded_models().items()):
            entry = self._model_entry(name)
            expires = "2318-08-19T00:00:00Z" if expires_at is None else _iso(expires_at)  # Ollama's "forever"
            entry.update({"expires_at": expires, "size_vram": entry["size"], "context_length": 4096})
            entries.append(entry)
        self._json(200, {"models": entries})

    def _delete(self, body: dict[str, Any]) -> None:
        """Ollama's DELETE /api/delete: 200 with an empty body, 404 naming the model as the caller wrote it."""
        double = self.server.double
        if not body:
            self._json(400, {"error": "missing request body"})
            return
        raw_name = str(body.get("model") or body.get("name") or "")
        if not raw_name.strip() or "__invalid__" in body:
            self._json(400, {"error": f'name "{raw_name}" is invalid'})
            return
        name = normalize_model(raw_name)
        with double._lock:
            present = name in double.config.models
            if present:
                double.config.models.discard(name)
                double.stats.deleted.append(name)
        if not present:
            self._json(404, {"error": f"model '{raw_name}' not found"})
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _show(self, body: dict[str, Any]) -> None:
        name = normalize_model(str(body.get("model") or body.get("name") or ""))
        if name not in self.server.double.config.models:
            self._json(404, {"error": f"model '{name}' not found"})
            return
        entry = self._model_entry(name)
        self._json(200, {
            "modelfile": f"FROM {name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": entry["details"],
            "model_info": {"general.architecture": "llama", "general.parameter_count": 1_235_814_432,
                           "llama.context_length": 131072},
        })

    def _pull(self, body: dict[str, Any]) -> None:
        double = self.server.double
        config = double.config
        name = normalize_model(str(body.get("model") or body.get("name") or ""))
        stream = body.get("stream", True) is not False
        known = config.pullable is None or name in config.pullable or name in config.models
        if not stream:
            if not known:
                self._json(500, {"error": "pull model manifest: file does not exist"})
                return
            time.sleep(config.pull_total_bytes / config.pull_bytes_per_s if config.pull_bytes_per_s else 0)
            config.models.add(name)
            self._json(200, {"status": "success"})
            return
        self._start_stream("application/x-ndjson")
        self._line({"status": "pulling manifest"})
        if not known:
            self._line({"error": "pull model manifest: file does not exist"})
            self._end_stream()
            return
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        total = config.pull_total_bytes
        completed = 0
        started = time.monotonic()
        while completed < total:
            if config.pull_bytes_per_s:
                double._stopping.wait(config.pull_step_s)
                completed = min(total, int((time.monotonic() - started) * config.pull_bytes_per_s))
            else:
                completed = total
            self._line({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": completed})
        small = "sha256:" + hashlib.sha256((name + "/template").encode()).hexdigest()
        self._line({"status": f"pulling {small[7:19]}", "digest": small, "total": 1024, "completed": 1024})
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            self._line({"status": status})
        with double._lock:
            config.models.add(name)
            double.stats.pulls_completed += 1
        self._end_stream()

    def _line(self, payload: dict[str, Any]) -> None:
        self._write_chunk(json.dumps(payload).encode() + b"\n")

    def _openai_models(self) -> None:
        models = sorted(self.server.double.config.models)
        self._json(200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 1_735_689_600, "owned_by": "double"} for name in models
        ]})

    # ------------------------------------------------------------------ generation

    def _error(self, api: str, status: int, message: str, error_type: str = "invalid_request_error",
               code: str | None = None) -> None:
        if api == "openai":
            self._json(status, {"error": {"message": message, "type": error_type, "param": None, "code": code}})
        else:
            self._json(status, {"error": message})

    def _generate(self, body: dict[str, Any], *, api: str) -> None:
        double = self.server.double
        config = double.config
        if "__invalid__" in body:
            self._error(api, 400, "invalid JSON body")
            return
        raw_name = str(body.get("model") or "")
        name = normalize_model(raw_name) if api != "openai" else raw_name
        served = config.models
        if api == "openai":
            served = served | {model.removesuffix(":latest") for model in served}
        if name not in served:
            if api == "openai":
                self._error(api, 404, f"The model `{raw_name}` does not exist.", code="model_not_found")
            else:
                self._error(api, 404, f'model "{raw_name}" not found, try pulling it first')
            return
        try:  # Ollama's OpenAI layer has no keep_alive: the default applies
            keep_alive = keep_alive_seconds(None if api == "openai" else body.get("keep_alive"), config.keep_alive_s)
        except InvalidDuration as error:
            self._error(api, 400, str(error))
            return
        if config.fail_chat_status:
            self._error(api, config.fail_chat_status, "injected failure", error_type="server_error")
            return
        images = body.get("images") if api == "generate" else [
            image for m in body.get("messages") or [] if isinstance(m, dict) for image in m.get("images") or []]
        if images and model_has_no_vision(name, config):
            self._error(api, 400, f"{name} does not support vision")  # Ollama's capability check (images)
            return
        options = body.get("options") or {}
        if api == "generate":
            prompt = str(body.get("prompt") or "")
            messages = [{"role": "user", "content": prompt}] if prompt else []
        else:
            messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        stream = body.get("stream", api != "openai") is not False
        model = normalize_model(name)
        if not messages:  # Ollama's documented way to load (or, with keep_alive 0, unload) a model
            self._load_or_unload(api, name, model, keep_alive)
            return
        prompt_words = sum(len(str(m.get("content") or "").split()) for m in messages) or 1
        if config.context_limit is not None and prompt_words > config.context_limit:
            if api == "openai":
                self._error(api, 400, f"This model's maximum context length is {config.context_limit} tokens. "
                                      f"However, your messages resulted in {prompt_words} tokens.",
                            code="context_length_exceeded")
            else:
                self._error(api, 400, f"input length ({prompt_words} tokens) exceeds the context length "
                                      f"({config.context_limit} tokens)")
            return
        tools = [tool for tool in body.get("tools") or [] if isinstance(tool, dict)]
        if tools and model in {normalize_model(name) for name in config.no_tools}:
            message = f"registry.ollama.ai/library/{model} does not support tools"
            if api == "openai":
                self._error(api, 400, message, error_type="api_error")
            else:
                self._error(api, 400, message)
            return
        tokens = self._reply_for(messages, config.reply_tokens)
        wanted = requested_format(body, api)
        if wanted is not None:  # structured output: JSON (or, with the fault, text that is not JSON)
            tokens = split_tokens("{\"answer\": " if config.invalid_json else format_reply(wanted, "".join(tokens)))
        calls = tool_calls_for(messages, tools, body.get("tool_choice"))
        if calls:
            tokens = []
        limit = options.get("num_predict") if api != "openai" else body.get("max_completion_tokens",
                                                                            body.get("max_tokens"))
        reason = "tool_calls" if calls and api == "openai" else "stop"
        if isinstance(limit, int) and 0 <= limit < len(tokens):
            tokens, reason = tokens[:limit], "length"
        label = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        with double._lock:
            double.stats.arrived.append(label)
        if not double._slots.acquire(lambda: config.num_parallel, self._client_gone, double._stopping):
            self.close_connection = True  # the caller hung up while it waited: nothing to answer
            return
        with double._lock:
            double.stats.slot_order.append(label)
        prompt = prompt_tokens(messages)
        cache_slot, cached = double._take_cache(prompt)
        try:
            load_s = double._use(model, keep_alive)
            prefill_s = (len(prompt) - cached) / config.prefill_tokens_per_s if config.prefill_tokens_per_s else 0.0
            if not stream:
                started = time.monotonic()
                double._stopping.wait(load_s + config.ttft_s + prefill_s + config.stall_before_first_token_s)
                if config.tokens_per_s:
                    double._stopping.wait(len(tokens) / config.tokens_per_s)
                eval_s = time.monotonic() - started
                self._json(200, self._final(api, name, "".join(tokens), reason, prompt_words, len(tokens),
                                            config.ttft_s, eval_s, load_s, calls))
                return
            self._stream(api, name, tokens, reason, prompt_words, load_s + prefill_s, body, calls)
        finally:
            double._put_cache(cache_slot, (*prompt, "assistant:", *"".join(tokens).split()))
            double._release(model)
            double._slots.release()

    def _embed(self, body: dict[str, Any], *, legacy: bool) -> None:
        """Ollama's ``/api/embed`` (``input``: a string or a list; normalised vectors in ``embeddings``) and the
        legacy ``/api/embeddings`` (``prompt``; one raw vector in ``embedding``): the same text always gives the
        same numbers, so a test can compare what came through the cluster with what the double says directly."""
        config = self.server.double.config
        raw_name = str(body.get("model") or "")
        if normalize_model(raw_name) not in config.models:
            self._error("embed", 404, f'model "{raw_name}" not found, try pulling it first')
            return
        function = {normalize_model(name): run for name, run in config.embed_functions.items()}.get(
            normalize_model(raw_name))
        if legacy:
            prompt = str(body.get("prompt") or "")
            self._json(200, {"embedding": function([prompt])[0] if function is not None else
                             embedding_vector(prompt, config.embedding_dims, normalised=False)})
            return
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts:
            self._error("embed", 400, "invalid input type")
            return
        vectors = function([str(text) for text in texts]) if function is not None else [
            embedding_vector(str(text), config.embedding_dims, normalised=True) for text in texts]
        self._json(200, {"model": raw_name, "embeddings": vectors, "total_duration": 1000, "load_duration": 0,
                         "prompt_eval_count": sum(len(str(text).split()) for text in texts)})

    def _load_or_unload(self, api: str, name: str, model: str, keep_alive: float | None) -> None:
        """An empty prompt / no messages: load the model (``done_reason: "load"``), or unload it for keep_alive 0."""
        double = self.server.double
        if keep_alive == 0:
            double._unload(model)
            self._json(200, self._final(api, name, "", "unload", 0, 0, 0.0, 0.0, 0.0))
            return
        load_s = double._use(model, keep_alive)
        try:
            double._stopping.wait(load_s)
        finally:
            double._release(model)
        self._json(200, self._final(api, name, "", "load", 0, 0, 0.0, 0.0, load_s))

    def _reply_for(self, messages: list[dict[str, Any]], count: int | None) -> list[str]:
        # after a tool result the reply echoes that result (the round trip's final answer)
        last_user = messages[-1] if messages[-1].get("role") == "tool" else next(
            (m for m in reversed(messages) if m.get("role") == "user"), None)
        prompt = str(last_user.get("content") or "") if last_user else ""
        marker = REPLY_MARKER.search(prompt)
        if marker is not None and int(marker.group(1)) > 0:
            count = int(marker.group(1))
        tokens = reply_tokens(prompt, count)
        last = messages[-1]
        if last.get("role") == "assistant":
            prefix = str(last.get("content") or "")
            full = "".join(tokens)
            if prefix and full.startswith(prefix):
                return split_tokens(full[len(prefix):])
        return tokens

    def _stream(self, api: str, name: str, tokens: list[str], reason: str, prompt_words: int, load_s: float,
                body: dict[str, Any], calls: list[dict[str, Any]] | None = None) -> None:
        double = self.server.double
        config = double.config
        with double._lock:
            double.stats.streams_started += 1
            double.stats.active_streams += 1
        try:
            self._start_stream("text/event-stream" if api == "openai" else "application/x-ndjson")
            started = time.monotonic()
            double._stopping.wait(load_s + config.ttft_s + config.stall_before_first_token_s)
            first_at = time.monotonic()
            if api == "openai":
                self._sse(self._openai_chunk(name, {"role": "assistant", "content": ""}, None))
            for index, token in enumerate(tokens):
                if config.die_after_tokens is not None and index >= config.die_after_tokens:
                    self._kill_connection()
                if api == "openai" and config.interrupt_after_tokens is not None \
                        and index >= config.interrupt_after_tokens:
                    self._write_chunk(b"data: [DONE]\n\n")  # no finish reason: cut short, but cleanly
                    self._end_stream()
                    return
                if config.stall_after_tokens is not None and index == config.stall_after_tokens and config.stall_s:
                    double._stopping.wait(config.stall_s)
                if index and config.tokens_per_s:
                    double._stopping.wait(1.0 / config.tokens_per_s)
                if config.malformed_after_tokens is not None and index == config.malformed_after_tokens:
                    cut = b'data: {"choices": [{"delta": {"content": "\n\n' if api == "openai" else b'{"message": \n'
                    self._write_chunk(cut)
                if api == "openai":
                    self._sse(self._openai_chunk(name, {"content": token}, None))
                elif api == "chat":
                    self._line({"model": name, "created_at": _now_iso(),
                                "message": {"role": "assistant", "content": token}, "done": False})
                else:
                    self._line({"model": name, "created_at": _now_iso(), "response": token, "done": False})
            if calls and api == "openai":  # Ollama's /v1: the calls whole, in one delta
                self._sse(self._openai_chunk(name, {"tool_calls": [
                    {"index": index, **call} for index, call in enumerate(openai_calls(calls))]}, None))
            elif calls:  # Ollama: the calls in a chunk of their own, before the final one
                self._line({"model": name, "created_at": _now_iso(),
                            "message": {"role": "assistant", "content": "", "tool_calls": calls}, "done": False})
            eval_s = time.monotonic() - first_at
            ttft_s = first_at - started
            if api == "openai":
                self._sse(self._openai_chunk(name, {}, reason))
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage_chunk = self._openai_chunk(name, {}, None)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _usage(prompt_words, len(tokens))
                    self._sse(usage_chunk)
                self._write_chunk(b"data: [DONE]\n\n")
            else:
                self._line(self._final(api, name, "", reason, prompt_words, len(tokens), ttft_s, eval_s, load_s))
            self._end_stream()
            with double._lock:
                double.stats.streams_completed += 1
        finally:
            with double._lock:
                double.stats.active_streams -= 1

    def _sse(self, payload: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    @staticmethod
    def _openai_chunk(name: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"id": "chatcmpl-double", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    @staticmethod
    def _final(api: str, name: str, text: str, reason: str, prompt_tokens: int, output_tokens: int,
               ttft_s: float, eval_s: float, load_s: float, calls: list[dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
        if api == "openai":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = openai_calls(calls)
            return {"id": "chatcmpl-double", "object": "chat.completion", "created": int(time.time()), "model": name,
                    "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                    "usage": _usage(prompt_tokens, output_tokens)}
        final: dict[str, Any] = {"model": name, "created_at": _now_iso()}
        if api == "chat":
            final["message"] = {"role": "assistant", "content": text}
            if calls:
                final["message"]["tool_calls"] = calls
        else:
            final["response"] = text
        final.update({"done": True, "done_reason": reason})
        if reason == "unload":  # Ollama's unload answer carries no timings
            return final
        final.update({
            "total_duration": int((load_s + ttft_s + eval_s) * 1e9),
            "load_duration": int(load_s * 1e9),
        })
        if reason != "load":
            final.update({
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": int(ttft_s * 1e9),
                "eval_count": output_tokens,
                "eval_duration": max(1, int(eval_s * 1e9)),
            })
            if api == "generate":
                final["context"] = list(range(1, prompt_tokens + output_tokens + 1))[:64]
        return final


def model_has_no_vision(name: str, config: DoubleConfig) -> bool:
    return normalize_model(name) not in {normalize_model(model) for model in config.vision_models}


def embedding_vector(text: str, dims: int, *, normalised: bool) -> list[float]:
    """Numbers derived from the text's hash (the same text, the same vector); /api/embed's have length 1."""
    numbers: list[float] = []
    counter = 0
    while len(numbers) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        numbers.extend((byte - 127.5) / 37.0 for byte in digest)
        counter += 1
    numbers = numbers[:dims]
    if normalised:
        norm = math.sqrt(sum(value * value for value in numbers)) or 1.0
        numbers = [value / norm for value in numbers]
    return numbers


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens}


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class OllamaDouble:
    """The test double server: ``start()`` on a free port (or ``port``), ``stop()``, ``url``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, models: Iterable[str] | None = None,
                 **config: Any) -> None:
        self.host = host
        self.port = port
        self.config = DoubleConfig(**config)
        if models is not None:
            self.config.models = {normalize_model(name) for name in models}
        if self.config.pullable is not None:
            self.config.pullable = {normalize_model(name) for name in self.config.pullable}
        self.stats = DoubleStats()
        self.loaded: dict[str, float | None] = {}  # model -> when it unloads (epoch s; None: never)
        self._in_use: Counter[str] = Counter()
        self._session_s: dict[str, float | None] = {}  # keep_alive of the model's latest request
        self._lock = threading.Lock()
        self._slots = _SlotQueue(self.stats, self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._caches: list[tuple[str, ...]] = []  # per slot: the last prompt it read plus its answer
        self._caches_in_use: set[int] = set()
        self._cache_used: list[float] = []  # per slot: when its cache was last written

    def _take_cache(self, prompt: tuple[str, ...]) -> tuple[int, int]:
        """A generation starts: the free slot cache sharing the longest prefix with ``prompt`` (llama.cpp's choice);
        returns its index and how many prompt tokens it already holds."""
        with self._lock:
            while len(self._caches) < max(1, self.config.num_parallel, len(self._caches_in_use) + 1):
                self._caches.append(())
                self._cache_used.append(0.0)
            free = [index for index in range(len(self._caches)) if index not in self._caches_in_use]
            # The longest shared prefix; on a tie (nothing shared) the slot used longest ago, as llama.cpp does.
            index = max(free, key=lambda slot: (common_prefix(self._caches[slot], prompt), -self._cache_used[slot]))
            cached = min(common_prefix(self._caches[index], prompt), max(0, len(prompt) - 1))
            self._caches_in_use.add(index)
            self.stats.prompt_tokens_cached += cached
            self.stats.prompt_tokens_read += len(prompt) - cached
            return index, cached

    def _put_cache(self, index: int, tokens: tuple[str, ...]) -> None:
        with self._lock:
            self._caches[index] = tokens
            self._cache_used[index] = time.monotonic()
            self._caches_in_use.discard(index)

    def clear_caches(self) -> None:
        """Forget every slot's prompt (as a restarted runtime would)."""
        with self._lock:
            self._caches = [() for _ in self._caches]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> OllamaDouble:
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.double = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"ollama-double-{self.port}", daemon=True)
        self._thread.start()
        logger.info("Ollama test double on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and drop every connection (streams end at once)."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def loaded_models(self) -> dict[str, float | None]:
        """What is in memory now (as ``/api/ps`` lists it): model -> unload time (epoch s, None: never)."""
        now = time.time()
        with self._lock:
            for name, expires_at in list(self.loaded.items()):
                if not self._in_use[name] and expires_at is not None and expires_at <= now:
                    del self.loaded[name]
            return dict(self.loaded)

    def _use(self, model: str, keep_alive: float | None) -> float:
        """A request starts using ``model``: it is loaded and held; returns the load time the caller simulates."""
        cold = model not in self.loaded_models()
        with self._lock:
            self.loaded[model] = None
            self._in_use[model] += 1
            self._session_s[model] = keep_alive
        return self.config.load_s if cold else 0.0

    def _release(self, model: str) -> None:
        """A request on ``model`` ended: unload now if its keep_alive was 0, else start the keep_alive clock."""
        with self._lock:
            self._in_use[model] -= 1
            if self._in_use[model] > 0:
                return
            session = self._session_s.get(model, self.config.keep_alive_s)
            if session == 0:
                self.loaded.pop(model, None)
                self.stats.unloaded.append(model)
            elif model in self.loaded:
                self.loaded[model] = None if session is None else time.time() + session

    def _unload(self, model: str) -> None:
        """``keep_alive: 0`` with nothing to generate: unload at once, or as soon as the running answers end."""
        with self._lock:
            self._session_s[model] = 0.0
            if self._in_use[model] > 0 or model not in self.loaded:
                return
            del self.loaded[model]
            self.stats.unloaded.append(model)

    def refuse_connections(self) -> None:
        """Behave like a stopped server: new connections are refused, open ones are dropped."""
        self.stop()

    def accept_connections(self) -> None:
        """Listen again on the same port after :meth:`refuse_connections`."""
        self.start()

    def reset_faults(self) -> None:
        config = self.config
        config.die_after_tokens = None
        config.stall_before_first_token_s = 0.0
        config.stall_after_tokens = None
        config.stall_s = 0.0
        config.context_limit = None
        config.fail_chat_status = None
        config.malformed_after_tokens = None
        config.interrupt_after_tokens = None
        config.invalid_json = False

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        """Bodies of the requests received on ``path``."""
        with self._lock:
            return [body for _, request_path, body in self.stats.requests if request_path == path]

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def __enter__(self) -> OllamaDouble:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def iter_ndjson(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Helper for tests reading raw NDJSON."""
    for line in lines:
        if line.strip():
            yield json.loads(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.ollama_double",
                                     description="Ollama / OpenAI-compatible TEST DOUBLE (no real model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed).")
    parser.add_argument("--models", default="llama3.2:1b", help="Comma-separated models present at start.")
    parser.add_argument("--tokens-per-s", type=float, default=50.0)
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--reply-tokens", type=int, default=None, help="Length of every reply in tokens.")
    parser.add_argument("--pull-mb-per-s", type=float, default=20.0)
    parser.add_argument("--pull-total-mb", type=float, default=50.0)
    parser.add_argument("--prefill-tokens-per-s", type=float, default=0.0,
                        help="Prompt tokens read per second when not in a slot's cache (0: prefill is free).")
    parser.add_argument("--num-parallel", type=int, default=int(os.environ.get("OLLAMA_NUM_PARALLEL") or 1),
                        help="Generations at once, the rest wait in order (default: $OLLAMA_NUM_PARALLEL or 1).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    double = OllamaDouble(
        host=args.host, port=args.port, models=[m for m in args.models.split(",") if m],
        tokens_per_s=args.tokens_per_s, ttft_s=args.ttft_ms / 1000, reply_tokens=args.reply_tokens,
        pull_bytes_per_s=args.pull_mb_per_s * 1e6, pull_total_bytes=int(args.pull_total_mb * 1e6),
        num_parallel=args.num_parallel, prefill_tokens_per_s=args.prefill_tokens_per_s,
    ).start()
    sys.stdout.write(f"READY {double.url}\n")
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        double.stop()


if __name__ == "__main__":
    main()

"""Ask any OpenAI-compatible server one chat question and keep everything it said: text, finish, counts, timing.

The same code reads the real runtime directly and the cluster's ``/v1``, so a comparison between the two
(tests/test_real_runtime.py, bench/bench_real_runtime.py) differs only in where the request went.

A cluster stream may *restart* its answer (failover to a runtime that cannot continue a partial answer,
docs/api.md "Failover"): the chunk that says so has ``slb.event == "restart"`` and, as its content, a note for
clients that show the raw stream; everything streamed before it is void. :class:`ChatAnswer` keeps both the
answer a client should show (``text``: what followed the last restart) and every piece that came
(``raw_text``), so a test can tell a clean restart from a splice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["ChatAnswer", "ask", "chat_body", "restart_signal"]


@dataclass
class ChatAnswer:
    """One answer as a client saw it."""

    status: int
    text: str = ""
    raw_text: str = ""  # every content piece, restarts ignored
    pieces: int = 0  # content pieces since the last restart
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)  # the restart signals, in order
    error: dict[str, Any] | None = None
    slb: dict[str, Any] | None = None
    agents_header: str = ""
    ttft_s: float | None = None
    total_s: float = 0.0

    def brief(self) -> str:
        """For assertion messages."""
        error = f" error={self.error}" if self.error else ""
        return (f"status={self.status} finish={self.finish_reason} tokens={self.completion_tokens} "
                f"restarts={len(self.restarts)}{error} text={self.text[:80]!r}")


def chat_body(model: str, prompt: str, *, max_tokens: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A temperature-0 request (the runtime's answer is then a function of the request)."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def restart_signal(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """The cluster's restart event in a ``/v1`` stream chunk (its ``slb``), or None."""
    slb = chunk.get("slb")
    return slb if isinstance(slb, dict) and slb.get("event") == "restart" else None


def ask(client: httpx.Client, base_url: str, body: dict[str, Any], *, timeout: float = 120.0,
        on_piece: Callable[[ChatAnswer, httpx.Response], None] | None = None) -> ChatAnswer:
    """POST ``body`` to ``{base_url}/chat/completions``; streams when ``body["stream"]``.

    ``on_piece(answer_so_far, response)`` runs after every streamed content piece (to act mid-answer).
    """
    started = time.perf_counter()
    url = f"{base_url.rstrip('/')}/chat/completions"
    if not body.get("stream"):
        response = client.post(url, json=body, timeout=timeout)
        answer = ChatAnswer(status=response.status_code, agents_header=response.headers.get("x-slb-agents", ""))
        answer.total_s = time.perf_counter() - started
        data = _json(response.text)
        if response.status_code != 200 or "choices" not in data:
            answer.error = _error_of(data, response.text)
            return answer
        choice = data["choices"][0]
        answer.text = answer.raw_text = choice["message"].get("content") or ""
        answer.finish_reason = choice.get("finish_reason")
        usage = data.get("usage") or {}
        answer.completion_tokens = usage.get("completion_tokens")
        answer.prompt_tokens = usage.get("prompt_tokens")
        answer.slb = data.get("slb")
        return answer
    with client.stream("POST", url, json=body, timeout=timeout) as response:
        answer = ChatAnswer(status=response.status_code, agents_header=response.headers.get("x-slb-agents", ""))
        if response.status_code != 200:
            response.read()
            answer.error = _error_of(_json(response.text), response.text)
            answer.total_s = time.perf_counter() - started
            return answer
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = _json(data)
            if not chunk:
                answer.error = {"message": f"unreadable chunk: {data[:200]}", "code": "unreadable"}
                break
            _take(answer, chunk, started)
            if on_piece is not None and chunk.get("choices") and (chunk["choices"][0].get("delta") or {}).get(
                    "content"):
                on_piece(answer, response)
    answer.total_s = time.perf_counter() - started
    return answer


def _take(answer: ChatAnswer, chunk: dict[str, Any], started: float) -> None:
    if chunk.get("error"):
        answer.error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        return
    restart = restart_signal(chunk)
    if restart is not None:  # its content is the note for raw readers, not part of the answer
        answer.restarts.append(restart)
        answer.text, answer.pieces = "", 0
        for choice in chunk.get("choices") or []:
            answer.raw_text += (choice.get("delta") or {}).get("content") or ""
        return
    if isinstance(chunk.get("slb"), dict):
        answer.slb = chunk["slb"]
    usage = chunk.get("usage") or {}
    if usage:
        answer.completion_tokens = usage.get("completion_tokens")
        answer.prompt_tokens = usage.get("prompt_tokens")
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if answer.ttft_s is None:
                answer.ttft_s = time.perf_counter() - started
            answer.text += content
            answer.raw_text += content
            answer.pieces += 1
        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_of(data: dict[str, Any], text: str) -> dict[str, Any]:
    error = data.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return {"message": text[:500] or "no body"}

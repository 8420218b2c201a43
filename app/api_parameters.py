"""Every parameter the OpenAI and Ollama chat APIs define: honoured, or refused with a 400 that names it — never
dropped without a word (issue 17.5; the table is in docs/api.md, "Parameters").

The checks read the raw request body before the request models (app/openai_api.py, app/ollama_api.py) parse
it, so a refused parameter gets its own message rather than a type error. OpenAI refuses fields it does not
know ("Unrecognized request argument supplied"), so ``/v1`` does the same; Ollama ignores unknown top-level
fields, so ``/api`` does too, but an unknown key in ``options`` is refused (it is most likely a typo).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from app.errors import BadRequest

logger = logging.getLogger(__name__)

Refusal = tuple[Callable[[Any], bool], str]
"""When a value is refused (the default value of a parameter never is), and why."""

OPENAI_REFUSED: dict[str, Refusal] = {
    "n": (lambda value: value not in (None, 1),
          "only n=1 is supported: the cluster returns one choice per request; send n requests instead"),
    "logprobs": (lambda value: value not in (None, False),
                 "logprobs are not supported: the agents do not carry token log-probabilities back"),
    "top_logprobs": (lambda value: value not in (None, 0),
                     "top_logprobs is not supported: the agents do not carry token log-probabilities back"),
    "logit_bias": (lambda value: bool(value),
                   "logit_bias is not supported: token ids differ between the cluster's models"),
    "store": (lambda value: value not in (None, False),
              "store is not supported: the cluster does not keep completions for later retrieval"),
    "modalities": (lambda value: value not in (None, ["text"]),
                   "only the text modality is supported (modalities: [\"text\"])"),
    "audio": (lambda value: value is not None, "audio output is not supported: the cluster answers with text"),
    "reasoning_effort": (lambda value: value is not None,
                         "reasoning_effort is not supported: the cluster cannot pass a reasoning budget to its "
                         "runtimes; leave it out"),
    "verbosity": (lambda value: value is not None, "verbosity is not supported; leave it out"),
    "web_search_options": (lambda value: value is not None,
                           "web search is not supported: the cluster's models answer from the prompt only"),
    "service_tier": (lambda value: value not in (None, "auto", "default"),
                     "service_tier: the cluster has one tier; send 'auto' or 'default', or leave it out"),
}
"""OpenAI chat-completion parameters the cluster cannot honour, with the values it still accepts (the defaults)."""

OPENAI_ACCEPTED_WITHOUT_EFFECT = {
    "user": "an end-user id for abuse tracing: accepted, logged at debug level",
    "safety_identifier": "as user",
    "metadata": "tags for stored completions; without store (refused) it has no effect, as at OpenAI",
    "prediction": "a speed hint only (the answer is the same without it): accepted, not used",
}
"""Parameters that change nothing in the answer: accepted so clients that send them keep working."""

OPENAI_EXTRA_FIELDS = frozenset({
    "top_k", "min_p", "repeat_penalty",  # llama.cpp's and vLLM's extras, passed on as sampling options
    "prompt_cache_key",  # routes follow-ups to the machine that holds the prompt cache
    "parallel_tool_calls",  # see tools (app/tools.py): the runtime's calls come back as it made them
})
"""Fields the request model may not declare that are still known (never "unrecognized")."""

OLLAMA_OPTIONS: dict[str, type | tuple[type, ...]] = {
    # sampling (every runtime that has them; OpenAI-compatible runtimes get the names in
    # agent/backends/openai_backend.py OPTION_NAMES)
    "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float),
    "typical_p": (int, float), "num_predict": int, "stop": list, "seed": int, "num_keep": int,
    "repeat_penalty": (int, float), "repeat_last_n": int, "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "penalize_newline": bool, "tfs_z": (int, float),
    "mirostat": int, "mirostat_eta": (int, float), "mirostat_tau": (int, float),
    # how the runtime loads and runs the model (Ollama runtimes; others are configured where they start)
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int, "use_mmap": bool,
    "use_mlock": bool, "numa": bool, "low_vram": bool, "f16_kv": bool, "vocab_only": bool, "logits_all": bool,
}
"""Every option Ollama defines (current and recent releases), with its JSON type."""

OLLAMA_REFUSED: dict[str, Refusal] = {
    "think": (lambda value: value not in (None, False),
              "think is not supported: the cluster cannot return a model's thinking separately from its answer; "
              "send think: false or leave it out"),
    "logprobs": (lambda value: value not in (None, False),
                 "logprobs are not supported: the agents do not carry token log-probabilities back"),
    "top_logprobs": (lambda value: value not in (None, 0),
                     "top_logprobs is not supported: the agents do not carry token log-probabilities back"),
    "truncate": (lambda value: value not in (None, True),
                 "truncate: false is not supported: the runtimes use their own context handling"),
    "shift": (lambda value: value not in (None, True),
              "shift: false is not supported: the runtimes use their own context handling"),
}
"""Ollama /api/chat and /api/generate parameters the cluster cannot honour (the defaults are accepted)."""

OLLAMA_GENERATE_REFUSED: dict[str, Refusal] = {
    "raw": (lambda value: value not in (None, False),
            "raw prompts are not supported: the cluster sends chat messages, and each runtime applies its "
            "model's template"),
    "template": (lambda value: bool(value),
                 "template is not supported: each runtime applies its model's own template"),
    "suffix": (lambda value: bool(value),
               "suffix (fill-in-the-middle) is not supported: the cluster sends chat messages"),
    "context": (lambda value: bool(value),
                "context is not supported: the cluster returns an empty context; send the conversation to "
                "/api/chat instead"),
}
"""Refused by /api/generate only (its prompt-level parameters)."""

_DURATION = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
"""A Go duration, as Ollama parses ``keep_alive`` (``"5m"``, ``"1h30m"``, ``"-1s"``)."""


def refuse(body: dict[str, Any], table: dict[str, Refusal], *, quote: Callable[[str], str] = str) -> None:
    """A 400 naming the first parameter of ``body`` whose value ``table`` refuses."""
    for name, (refused, why) in table.items():
        if name in body and refused(body[name]):
            raise BadRequest(f"{quote(name)}: {why}", code="unsupported_parameter", param=name)


def refuse_unknown(body: dict[str, Any], known: Iterable[str]) -> None:
    """OpenAI's answer to a field it does not know: a 400 naming it."""
    known_names = set(known)
    unknown = sorted(name for name in body if name not in known_names)
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {', '.join(unknown)}",
                         code="unknown_parameter", param=unknown[0])


def check_openai(body: dict[str, Any], declared: Iterable[str]) -> None:
    """Refuse what ``/v1/chat/completions`` cannot honour; ``declared``: the request model's own fields."""
    refuse(body, OPENAI_REFUSED)
    refuse_unknown(body, {*declared, *OPENAI_REFUSED, *OPENAI_ACCEPTED_WITHOUT_EFFECT, *OPENAI_EXTRA_FIELDS})
    options = body.get("stream_options")
    if isinstance(options, dict):
        refuse_unknown({f"stream_options.{name}": None for name in options},
                       ("stream_options.include_usage", "stream_options.include_obfuscation"))
    user = body.get("user") or body.get("safety_identifier")
    if user:
        logger.debug("chat completion for end user %r", str(user)[:100])


def check_ollama(body: dict[str, Any], *, generate: bool) -> None:
    """Refuse what ``/api/chat`` (or ``/api/generate``) cannot honour."""
    refuse(body, OLLAMA_REFUSED)
    if generate:
        refuse(body, OLLAMA_GENERATE_REFUSED)


def ollama_options(options: Any) -> dict[str, Any]:
    """The request's ``options``, each checked for its type; an option Ollama does not define is a 400."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object", param="options")
    kept: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        kind = OLLAMA_OPTIONS.get(name)
        if kind is None:
            raise BadRequest(f"options.{name} is not an Ollama option", code="unknown_parameter",
                             param=f"options.{name}")
        if name == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise BadRequest("options.stop must be a string or a list of strings", param="options.stop")
        elif kind is bool:
            if not isinstance(value, bool):
                raise BadRequest(f"options.{name} must be true or false", param=f"options.{name}")
        elif isinstance(value, bool) or not isinstance(value, kind):
            wanted = "an integer" if kind is int else "a number"
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise BadRequest(f"options.{name} must be {wanted}", param=f"options.{name}")
        kept[name] = value
    return kept


def ollama_keep_alive(value: Any) -> str | float | None:
    """``keep_alive`` checked as Ollama parses it (a duration such as ``"10m"``, or seconds), else a 400."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (_DURATION.match(value.strip()) or re.fullmatch(r"[-+]?\d+", value.strip())):
        text = value.strip()
        return float(text) if re.fullmatch(r"[-+]?\d+", text) else text
    raise BadRequest(f'keep_alive: time: invalid duration "{str(value)[:40]}"', param="keep_alive")

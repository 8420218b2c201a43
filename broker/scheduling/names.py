"""Model ids as runtimes spell them, and the one rule that says when two ids name the same model.

Runtimes name one model in several ways: Ollama treats ``llama3.2`` and
``llama3.2:latest`` as one model and lower-cases names; llama.cpp's server and
llama-cpp-python report a GGUF path (``/models/SmolLM2-135M-Instruct-Q4_1.gguf``)
or the alias they were started with (``smollm2``); LM Studio and vLLM report
a path-like id (``Qwen/Qwen2.5-0.5B-Instruct``). :func:`model_key` reduces every
spelling to one key, :func:`same_model` compares by it, and
:func:`parameters_from_name` reads the size a name carries (``135m``, ``8b``,
``8x7b``) for models the catalog does not know.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

_OLLAMA_REGISTRY_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")
MAX_STATED_BILLIONS = 10_000.0
"""A size beyond this in a name is not a size (names come from agents, and may be anything)."""
_SIZE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)\s*([bm])(?![a-z0-9])")


@functools.lru_cache(maxsize=8192)  # called ~20 times per agent per plan (placement at 5,000 agents)
def model_key(name: str) -> str:
    """The comparison key of a model id: case-insensitive, ``:latest`` dropped, a GGUF file by its base name.

    ``llama3.2`` and ``Llama3.2:latest`` → ``llama3.2``; ``/models/SmolLM2.gguf`` and ``smollm2.GGUF`` →
    ``smollm2``; ``registry.ollama.ai/library/qwen2.5:7b`` → ``qwen2.5:7b``.
    """
    text = name.strip().replace("\\", "/").lower()
    if text.endswith(".gguf"):
        return text.rsplit("/", 1)[-1][: -len(".gguf")]
    for prefix in _OLLAMA_REGISTRY_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if text.endswith(":latest"):
        text = text[: -len(":latest")]
    return text


def same_model(left: str | None, right: str | None) -> bool:
    """True when both ids name the same model (see :func:`model_key`)."""
    if not left or not right:
        return False
    return model_key(left) == model_key(right)


def find_model(wanted: str, names: Iterable[str]) -> str | None:
    """The first of ``names`` that is the same model as ``wanted`` (an agent's own spelling of it), or ``None``."""
    key = model_key(wanted)
    return next((name for name in names if model_key(name) == key), None)


def parameters_from_name(name: str) -> float | None:
    """Parameters in billions as the name states them (``qwen2.5:0.5b`` → 0.5, ``smollm2:135m`` → 0.135,
    ``mixtral:8x7b`` → 56, ``Llama-3.2-1B-Instruct-Q4_K_M.gguf`` → 1.0), or ``None`` when it says nothing.

    The tag (after ``:``) is read first: ``qwen2.5:7b`` is 7B, not 2.5B (the family's version has no unit).
    """
    text = name.strip().lower().replace("\\", "/").rsplit("/", 1)[-1]
    base, _, tag = text.partition(":")
    for part in (tag, base):
        match = _SIZE.search(part)
        if match is None:
            continue
        experts, number, unit = match.groups()
        value = float(number) * (int(experts) if experts else 1)
        value = value / 1000.0 if unit == "m" else value
        if 0 < value <= MAX_STATED_BILLIONS:
            return value
    return None

"""Learn what the runtime really does: its kind, how many requests it runs at once, whether it continues a prefill.

Declared settings are guesses (Ollama's ``OLLAMA_NUM_PARALLEL`` is not visible through its API, llama.cpp's slot
count is a server flag, llama-cpp-python runs one request and *interrupts* it when another arrives), and routing
on a guess is how a one-slot runtime got a second job it could not run. So at warm-up the agent measures, with a
few short generations while nothing else runs (the caller holds the job runner exclusively):

* **slots**: ``k`` concurrent short answers; the most streams producing tokens at the same moment is the slot
  count. A stream that ends without a finish reason was interrupted: the runtime cuts running answers short, so
  it gets one slot and nothing is ever sent to it in parallel.
* **continues_prefill**: an answer at temperature 0, then the same question with the first half of that answer
  as a trailing assistant message. A runtime that continues the prefill produces the second half; one that ignores
  it (llama-cpp-python closes the turn and opens a new one) starts over. Failover may only continue a partial
  answer on a runtime that continues it (docs/runtimes.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.backends.base import Backend, BackendError, BackendUnreachable, ChatDelta, RuntimeFacts, Truncated
from broker.protocol import ChatMessage, RuntimeProfile

logger = logging.getLogger(__name__)

SLOT_PROBE_PROMPT = (
    "Count from one to thirty in words, separated by spaces: one two three four five six seven eight nine ten "
    "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty and so on."
)
SLOT_PROBE_TOKENS = 32
SLOT_PROBE_ROUNDS = 2
"""Overlap can only be under-seen (a busy event loop reads a stream late), never over-seen: take the best round."""
PREFILL_PROBE_PROMPT = "Name the planets of the solar system in order from the sun, in one sentence."
PREFILL_PROBE_TOKENS = 32
MAX_PROBED_SLOTS = 4
"""More parallel requests than this are not probed (a home machine rarely serves more at once)."""
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class _Stream:
    """One probe answer: when its tokens came, and whether it ended properly."""

    first_at: float | None
    last_at: float | None
    text: str
    interrupted: bool


async def _generate(backend: Backend, model: str, prompt: str, tokens: int, prefix: str | None = None) -> _Stream:
    first = last = None
    pieces: list[str] = []
    options = {"num_predict": tokens, "temperature": 0, "seed": 7}
    try:
        async for event in backend.chat(model, [ChatMessage(role="user", content=prompt)], options, prefix, None):
            if isinstance(event, ChatDelta):
                last = time.monotonic()
                first = first or last
                pieces.append(event.text)
    except Truncated:
        return _Stream(first, last, "".join(pieces), interrupted=True)
    return _Stream(first, last, "".join(pieces), interrupted=False)


def _max_overlap(streams: list[_Stream]) -> int:
    """The most streams that were producing tokens at one moment (a sweep over first/last token times)."""
    points: list[tuple[float, int]] = []
    for stream in streams:
        if stream.first_at is None or stream.last_at is None:
            continue
        points.append((stream.first_at, 1))
        points.append((stream.last_at, -1))
    points.sort(key=lambda point: (point[0], -point[1]))  # a start at the same instant as an end overlaps it
    best = running = 0
    for _, step in points:
        running += step
        best = max(best, running)
    return max(1, best)


async def measure_slots(backend: Backend, model: str, limit: int) -> tuple[int, bool]:
    """``(slots, interrupts_running)`` from ``limit`` concurrent short answers."""
    count = max(1, min(limit, MAX_PROBED_SLOTS))
    if count == 1:
        return 1, False
    best = 1
    for _ in range(SLOT_PROBE_ROUNDS):
        streams = await asyncio.gather(*(_generate(backend, model, SLOT_PROBE_PROMPT, SLOT_PROBE_TOKENS)
                                         for _ in range(count)))
        if any(stream.interrupted for stream in streams):
            return 1, True
        best = max(best, _max_overlap(list(streams)))
        if best >= count:
            break
    return best, False


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


async def probe_prefill(backend: Backend, model: str) -> bool | None:
    """True when the runtime continues a trailing assistant message; None when the probe cannot tell."""
    full = await _generate(backend, model, PREFILL_PROBE_PROMPT, PREFILL_PROBE_TOKENS)
    words = _words(full.text)
    if full.interrupted or len(words) < 8:
        return None
    cut = full.text.find(" ", len(full.text) // 2)
    if cut <= 0:
        return None
    prefix = full.text[:cut]
    continued = await _generate(backend, model, PREFILL_PROBE_PROMPT, PREFILL_PROBE_TOKENS // 2, prefix=prefix)
    if continued.interrupted:
        return None
    head = _words(prefix)
    expected = words[len(head):len(head) + 3]
    got = _words(continued.text)
    if not expected or not got:
        return None
    if got[: len(head[:3])] == head[:3] and got[:3] != expected[:3]:
        return False  # started the answer over
    return got[: len(expected)] == expected


async def _measure(
    backend: Backend, model: str, limit: int, facts: RuntimeFacts
) -> tuple[int, str, bool | None, bool | None]:
    slots, source, interrupts = 1, "default", None
    if facts.reported_slots:
        slots, source = min(limit, facts.reported_slots), "reported"
    elif limit > 1:
        measured, interrupts = await measure_slots(backend, model, limit)
        slots, source = min(limit, measured), "measured"
    else:
        source = "declared"
    return slots, source, interrupts, await probe_prefill(backend, model)


async def build_profile(
    backend: Backend, model: str, *, limit: int, facts: RuntimeFacts | None = None
) -> RuntimeProfile:
    """Detect and measure; a probe that fails leaves its field at the safe default (one slot, no prefill)."""
    facts = facts or await backend.detect()
    slots, source, interrupts = max(1, limit), "declared", None
    continues: bool | None = None
    if facts.kind == "simulated":
        continues = True
    else:
        try:
            slots, source, interrupts, continues = await asyncio.wait_for(
                _measure(backend, model, limit, facts), PROBE_TIMEOUT_S)
        except BackendUnreachable:
            raise
        except (BackendError, asyncio.TimeoutError) as error:
            logger.warning("runtime probe of %s failed (%s); assuming one slot and no prefill continuation",
                           backend.url, error)
            slots, source = 1, "default"
    profile = RuntimeProfile(kind=facts.kind, detected_by=facts.detected_by, version=facts.version, slots=slots,  # type: ignore[arg-type]
                             slots_source=source, continues_prefill=continues, interrupts_running=interrupts,  # type: ignore[arg-type]
                             health_check=facts.health_check)
    logger.info("runtime at %s: %s %s, %d slot(s) (%s), continues prefill: %s, interrupts running answers: %s",
                backend.url, profile.kind, profile.version or "", profile.slots, profile.slots_source,
                profile.continues_prefill, profile.interrupts_running)
    return profile


class RuntimeKeeper:
    """Owns the agent's runtime profile: detected at start, measured per model (once), applied to the job runner.

    Until a measurement says otherwise an unknown runtime gets one slot: sending a second job to a runtime
    that runs one is what cut answers short (llama-cpp-python) or queued them invisibly (Ollama with
    ``OLLAMA_NUM_PARALLEL=1``). ``limit`` (``--max-parallel``) caps what a measurement may grant.
    """

    def __init__(self, backend: Backend, *, limit: int, probe: bool,
                 on_change: Callable[[RuntimeProfile], None]) -> None:
        self.backend = backend
        self.limit = max(1, limit)
        self.probe = probe
        self._on_change = on_change
        self.facts: RuntimeFacts | None = None
        self.profile: RuntimeProfile | None = None
        self._measured: dict[str, RuntimeProfile] = {}

    @property
    def slots(self) -> int:
        return self.profile.slots if self.profile is not None else (self.limit if not self.probe else 1)

    @property
    def fragile(self) -> bool:
        """Any request may cut a running answer short (llama-cpp-python): ask it nothing that is not needed."""
        profile = self.profile
        return profile is not None and (profile.interrupts_running is True or profile.kind == "llama-cpp-python")

    @property
    def can_pull(self) -> bool:
        """Only through Ollama's own API (or the simulation): an Ollama reached as an OpenAI server cannot pull."""
        return self.backend.name in ("ollama", "simulated")

    def _apply(self, profile: RuntimeProfile) -> None:
        changed = profile != self.profile
        self.profile = profile
        if changed:
            self._on_change(profile)

    async def detect(self) -> RuntimeProfile:
        """Learn the kind (no generation); the slot count is the runtime's own report, declared, or 1."""
        self.facts = facts = await self.backend.detect()
        if facts.reported_slots:
            slots, source = min(self.limit, facts.reported_slots), "reported"
        elif facts.kind == "simulated" or not self.probe:
            slots, source = self.limit, "declared"
        else:
            slots, source = 1, "default"
        profile = RuntimeProfile(kind=facts.kind, detected_by=facts.detected_by, version=facts.version,  # type: ignore[arg-type]
                                 slots=slots, slots_source=source,  # type: ignore[arg-type]
                                 continues_prefill=True if facts.kind == "simulated" else None,
                                 health_check=facts.health_check)
        logger.info("runtime at %s: %s %s (%s)", self.backend.url, facts.kind, facts.version or "", facts.detected_by)
        self._apply(profile)
        return profile

    async def measure(self, model: str) -> RuntimeProfile:
        """Probe with ``model`` (the caller holds the runtime alone); once per model."""
        if self.facts is None:
            await self.detect()
        assert self.facts is not None
        if not self.probe:
            return self.profile  # type: ignore[return-value]
        profile = self._measured.get(model)
        if profile is None:
            profile = self._measured[model] = await build_profile(self.backend, model, limit=self.limit,
                                                                  facts=self.facts)
        self._apply(profile)
        return profile

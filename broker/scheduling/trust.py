"""What an agent claims, checked against what the coordinator itself saw; strikes and quarantine.

Any agent account may publish anything on its own topics (the ACL allows it): 8 × H100, a benchmark of
100,000 tok/s, 1,000 slots, a ready model nobody assigned, and answers that are empty. Issue 13.1 found
such a liar taking every question and answering none. So the coordinator trusts only what it observes:

* an answer is judged when it ends (:func:`judge`): no text at all for a question that allows some is a
  **failure** (the query fails over; the breaker counts it) and a **strike** once another agent has answered
  the same question (so a question that makes every model say nothing — a stop sequence that matches at
  once — strikes nobody); an answer whose own stats claim a speed far above the rate at which its tokens
  actually arrived is a failure and a strike; an agent whose telemetry or benchmark claims such a speed for
  the model, measured on a job that ran alone, gets a strike;
* speeds the router learns are the coordinator's own measurement — tokens delivered over its own clock,
  from the first chunk to the last — never the agent's ``tokens_per_s`` (:class:`Measurement`);
* :class:`Trust` counts strikes: ``strike_limit`` within ``window_s`` quarantine the agent — no new jobs —
  for ``quarantine_s``, twice as long on each repeat (at most ``quarantine_max_s``); after a quarantine the
  agent is on probation, and one strike before :data:`PROBATION_ANSWERS` good answers sends it back.

Nothing here has a clock or touches the network: times are the caller's (monotonic seconds).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from broker.protocol.messages import ResultStats

SPEED_LIE_FACTOR = 20.0
"""A claimed speed this many times the delivered rate is a lie. Generous on purpose: a delivery slowed by a
busy broker or coordinator must never look like one (measured delays stay below 8×, docs/reliability.md)."""
LIE_MIN_TOKENS = 16
LIE_MIN_WINDOW_S = 0.5
"""Delivery judged for lies only when it is long enough to measure: this many tokens over this many seconds."""
MEASURE_MIN_TOKENS = 8
MEASURE_MIN_WINDOW_S = 0.2
"""A speed is learned from an answer of at least this many tokens, delivered over at least this long."""
TOKENS_PER_CHAR_MAX = 2
"""Tokens one delivered character can account for (a CJK character can be two tokens): a claim beyond it is
counted as this."""
CHARS_PER_TOKEN = 4
"""Characters per token, to count the tokens of an answer whose agent did not count them."""
PROBATION_ANSWERS = 3
"""Good answers an agent owes after a quarantine before a single strike stops counting as a relapse."""
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class Delivery:
    """One finished answer as the coordinator saw it; times are its own clock (monotonic seconds)."""

    text: str
    """The text this agent delivered (after a continuation prefix, if any)."""
    continued: bool
    """The job continued a partial answer: adding nothing is then a proper ending (the answer was complete)."""
    output_allowed: bool
    """The question allows an answer at all (``num_predict`` / ``max_tokens`` not 0)."""
    sent_at: float
    first_at: float | None
    done_at: float
    stats: ResultStats | None
    solo: bool = False
    """The job ran alone on the agent (nothing else of ours or, by its telemetry, of anyone else's)."""
    claimed_tokens_per_s: float | None = None
    """What the agent's telemetry or benchmark claims for this model (what the router believed before)."""


@dataclass(frozen=True)
class Measurement:
    """The coordinator's own figures for one answer."""

    tokens: int
    tokens_per_s: float | None
    """Tokens over the delivery window (first chunk to last); ``None`` when too short to tell."""
    ttft_s: float | None

    def as_stats(self, queue_s: float | None) -> ResultStats:
        """For the registry's speed estimate: our figures, the agent's queue time only within our TTFT."""
        queue = None if queue_s is None or self.ttft_s is None else min(max(0.0, queue_s), self.ttft_s)
        return ResultStats(output_tokens=self.tokens, tokens_per_s=self.tokens_per_s, ttft_s=self.ttft_s,
                           queue_s=queue)


@dataclass(frozen=True)
class Verdict:
    """``failure``: the answer must not be used (why); ``strike``: evidence that the agent lies (why);
    ``strike_if_answered``: a strike once another agent answers the same question with text (an empty answer:
    only then is it the agent's doing rather than the question's)."""

    measurement: Measurement
    failure: str | None = None
    strike: str | None = None
    strike_if_answered: str | None = None


def delivered_tokens(text: str, stats: ResultStats | None) -> int:
    """Tokens of an answer: the agent's count, but never more than its text can hold; else counted from text."""
    reported = stats.output_tokens if stats is not None else None
    if reported is None:
        return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    return min(reported, TOKENS_PER_CHAR_MAX * len(text))


def measure(delivery: Delivery) -> Measurement:
    tokens = delivered_tokens(delivery.text, delivery.stats)
    ttft = None if delivery.first_at is None else max(0.0, delivery.first_at - delivery.sent_at)
    rate = None
    if delivery.first_at is not None:
        window = delivery.done_at - delivery.first_at
        if tokens >= MEASURE_MIN_TOKENS and window >= MEASURE_MIN_WINDOW_S:
            rate = round(tokens / window, 2)
    return Measurement(tokens, rate, ttft)


def _lie(claim: float | None, delivered: float | None) -> bool:
    return claim is not None and delivered is not None and claim > SPEED_LIE_FACTOR * delivered


def judge(delivery: Delivery) -> Verdict:
    """Is this finished answer usable, and does it show the agent lying? See the module docstring."""
    measured = measure(delivery)
    if not delivery.text.strip() and delivery.output_allowed and not delivery.continued:
        claimed = delivery.stats.output_tokens if delivery.stats is not None else None
        why = "empty answer: done without any text" + (f" (its stats claim {claimed:,} tokens)" if claimed else "")
        return Verdict(measured, failure=why, strike_if_answered=why)
    window = (delivery.done_at - delivery.first_at) if delivery.first_at is not None else 0.0
    if measured.tokens < LIE_MIN_TOKENS or window < LIE_MIN_WINDOW_S:
        return Verdict(measured)
    rate = measured.tokens / window
    own = delivery.stats.tokens_per_s if delivery.stats is not None else None
    if _lie(own, rate):
        why = f"claimed {own:,.0f} tok/s for an answer delivered at {rate:,.1f} tok/s"
        return Verdict(measured, failure=why, strike=why)
    if delivery.solo and _lie(delivery.claimed_tokens_per_s, rate):
        return Verdict(measured, strike=f"claims {delivery.claimed_tokens_per_s:,.0f} tok/s (telemetry or "
                                        f"benchmark), delivered {rate:,.1f} tok/s on a job of its own")
    return Verdict(measured)


# ---------------------------------------------------------------- strikes and quarantine


@dataclass(frozen=True)
class Standing:
    """How far an agent is trusted now, for the cluster view."""

    strikes: int = 0
    """Strikes so far (``strike_limit`` of them within the window quarantine the agent)."""
    last_strike: str | None = None
    quarantined: bool = False
    reason: str | None = None
    """Why it is (or was last) quarantined."""
    left_s: float | None = None
    """Seconds of quarantine left."""
    quarantines: int = 0
    """Quarantines so far (each doubles the next one)."""
    probation: bool = False


@dataclass
class _Record:
    strikes: deque[tuple[float, str]]
    total: int = 0
    last: str | None = None
    until: float | None = None
    reason: str | None = None
    quarantines: int = 0
    owed: int = 0
    """Good answers still owed after a quarantine (probation while > 0)."""


class Trust:
    """Strikes per agent and the quarantines they lead to; the views read it from any thread."""

    def __init__(self, strike_limit: int, window_s: float, quarantine_s: float, quarantine_max_s: float) -> None:
        self.strike_limit = max(1, strike_limit)
        self.window_s = window_s
        self.quarantine_s = quarantine_s
        self.quarantine_max_s = max(quarantine_s, quarantine_max_s)
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def _record(self, agent_id: str) -> _Record:
        record = self._records.get(agent_id)
        if record is None:
            record = self._records[agent_id] = _Record(deque(maxlen=self.strike_limit))
        return record

    def strike(self, agent_id: str, reason: str, now: float) -> float | None:
        """Count a strike; the quarantine's length in seconds when this one started it, else ``None``."""
        reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
        with self._lock:
            record = self._record(agent_id)
            record.total += 1
            record.last = reason
            if record.until is not None and now < record.until:
                return None  # already quarantined: answers to jobs it had before add no more time
            record.strikes.append((now, reason))
            recent = [(at, why) for at, why in record.strikes if now - at <= self.window_s]
            relapse = record.owed > 0
            if len(recent) < self.strike_limit and not relapse:
                return None
            record.quarantines += 1
            length = min(self.quarantine_max_s, self.quarantine_s * 2 ** (record.quarantines - 1))
            record.until = now + length
            record.owed = PROBATION_ANSWERS
            counted = f"{len(recent)} strike(s) in {self.window_s:g} s" if not relapse else \
                "a strike on probation after an earlier quarantine"
            record.reason = f"{counted}; last: {reason}"
            record.strikes.clear()
            return length

    def good(self, agent_id: str, now: float) -> None:
        """A good answer: pays off probation (answers to jobs sent before a quarantine do not count)."""
        with self._lock:
            record = self._records.get(agent_id)
            if record is not None and record.owed > 0 and (record.until is None or now >= record.until):
                record.owed -= 1

    def quarantined(self, now: float) -> dict[str, str]:
        """Agents in quarantine at ``now``, with the reason."""
        with self._lock:
            return {agent_id: record.reason or "quarantined" for agent_id, record in self._records.items()
                    if record.until is not None and now < record.until}

    def standing(self, agent_id: str, now: float) -> Standing:
        with self._lock:
            record = self._records.get(agent_id)
            if record is None:
                return Standing()
            inside = record.until is not None and now < record.until
            return Standing(
                strikes=record.total,
                last_strike=record.last,
                quarantined=inside,
                reason=record.reason,
                left_s=round(record.until - now, 1) if inside and record.until is not None else None,
                quarantines=record.quarantines,
                probation=record.owed > 0 and not inside,
            )

    def standings(self, now: float) -> dict[str, Standing]:
        """Every agent with a strike or a quarantine on record."""
        with self._lock:
            agents = list(self._records)
        return {agent_id: self.standing(agent_id, now) for agent_id in agents}

"""Which agent answers: expected completion time, baselines, and a circuit breaker.

The policy ``expected_completion`` (the default) picks the agent with the lowest
expected completion time::

    ECT = queue wait + time to first token + expected output tokens ÷ tokens/s

where the queue wait comes from the agent's outstanding jobs (this
coordinator's own in-flight count plus what its telemetry reports beyond
that) and the slots its runtime really has (the measured runtime profile), and
speeds are measured (or, before any measurement, the hardware prior).

Candidates are every agent that *has* the model — ready, loaded or on disk —
not only the agents assigned it (a model on disk costs its load time in the
estimate); ``auto`` and ``quality`` take an agent's ready assignment, or, when
that is missing or failed, the best model it has (:func:`best_offer`). The baselines ``round_robin``, ``random``
and ``least_outstanding`` exist to compare against (bench/).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

from broker.scheduling.availability import servable_models
from broker.scheduling.catalog import Catalog
from broker.scheduling.estimates import expected_speed
from broker.scheduling.names import find_model, same_model
from broker.scheduling.placement import fits_memory
from broker.scheduling.registry import AgentRecord, ClusterState, ModelOffer

RoutingPolicy = Literal["expected_completion", "round_robin", "random", "least_outstanding"]
"""How an agent is chosen among candidates: lowest expected completion time, or a baseline.

Not to be confused with the routing *mode* of a query (``RoutingMode`` in the coordinator's contract)."""

ROUTING_POLICIES: tuple[str, ...] = get_args(RoutingPolicy)
POLICY_ALIASES = {"auto": "expected_completion"}
"""Older names still accepted: ``auto`` was the policy's name before it clashed with the routing mode ``auto``."""


def canonical_policy(name: str) -> RoutingPolicy:
    """The policy called ``name`` (aliases resolved); ``ValueError`` names the choices for an unknown one."""
    name = POLICY_ALIASES.get(name, name)
    if name not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {name!r} (choose {', '.join(ROUTING_POLICIES)})")
    return cast(RoutingPolicy, name)

CONTENTION = 0.1
"""Per-stream slowdown for each other job sharing an agent's parallel slots."""
OVERRUN_FLOOR = 0.25
"""A job already past its expected length is expected to go on for at least this share of its length or of the
time it has streamed so far, whichever is more (a long-running answer, or a machine slower than measured, tends
to go on)."""


@dataclass(frozen=True)
class JobProgress:
    """One job this coordinator has on an agent, as the queue estimate needs it."""

    expected_tokens: float
    generating_s: float | None = None
    """Seconds since its first token; ``None``: no token yet (queued in the agent, or reading its prompt)."""
    tokens: float | None = None
    """Tokens streamed so far (``None``: unknown); with ``generating_s`` it says how fast the agent runs *now*."""


LIVE_MIN_S = 0.5
"""A job must have streamed this long before its pace counts (the first chunks arrive in bursts)."""
LIVE_FULL_S = 2.0
"""Seconds of streaming (summed over the agent's running jobs) after which the live pace replaces the measured
speed entirely; less evidence blends the two in proportion."""


def live_speed(jobs: Sequence[JobProgress], slots: int) -> tuple[float, float] | None:
    """How fast an agent generates *now*, from its running jobs' progress: (tokens/s of one stream alone, weight
    0–1 of that evidence), or ``None`` without evidence.

    Why: the measured speed is an average of finished answers, so it lags a sudden slowdown (a second model
    loaded, thermal throttling, another user on the machine) by several answers — and routing keeps queueing on
    an agent that is no longer fast. Tokens streamed ÷ time since the first token (now, not the last chunk, so a
    stalling agent counts as slow) sees it within a second."""
    streaming = [job for job in jobs if job.generating_s is not None and job.tokens is not None
                 and job.generating_s >= LIVE_MIN_S]
    if not streaming:
        return None
    seconds = sum(job.generating_s for job in streaming)  # type: ignore[misc]
    tokens = sum(max(0.0, job.tokens - 1.0) for job in streaming)  # type: ignore[operator]
    running = sum(1 for job in jobs if job.generating_s is not None)
    sharing = max(0, min(running, slots) - 1)
    return tokens / seconds * (1.0 + CONTENTION * sharing), min(1.0, seconds / LIVE_FULL_S)


@dataclass(frozen=True)
class RouteCandidate:
    """An agent that can take a job for ``model`` now, with what the policies need."""

    agent_id: str
    model: str
    outstanding: int
    slots: int
    tokens_per_s: float
    ttft_s: float
    speed_source: str = "prior"
    cooling_down: bool = False
    availability: str = "ready"
    """ready (its assignment, warm), loaded (in memory) or local (on disk: loading it counts in ``ttft_s``)."""
    continues_prefill: bool = False
    """Its runtime continues a partial answer (a failover may hand it the text so far)."""
    ahead: tuple[JobProgress, ...] | None = None
    """This coordinator's own jobs on the agent (``None``: unknown, every outstanding job counts as an average
    answer); the other ``outstanding`` jobs (reported by telemetry) count as average answers."""
    expected_tokens: float | None = None
    """The predicted answer length on this agent's model (``None``: the router's figure)."""
    prefill_tokens_per_s: float = 0.0
    """How fast the runtime reads a prompt (0: unknown)."""
    cached_tokens: int = 0
    """Prompt tokens of this query the agent most likely still holds in its cache (it served the previous turn of
    the conversation and nothing has pushed that out since)."""
    waiting_ahead: int = 0
    """Older queries waiting in the coordinator for room on this agent (it is full): they go before this one, so
    each counts as an average answer in the queue. Not part of ``outstanding`` (the agent has not got them)."""

    def _stream_speed(self) -> float:
        sharing = min(self.outstanding, self.slots - 1)
        return self.tokens_per_s / (1.0 + CONTENTION * sharing)

    def queue_wait_s(self, output_tokens: float) -> float:
        """Expected wait before this agent starts a new job.

        With the jobs known (``ahead``): the runtime's ``slots`` are filled in order — jobs already generating
        with what is left of their expected answer, the others with a whole one — and the new job takes the slot
        that frees first. So a second job on a one-slot runtime waits for the first one's remaining tokens, and
        a third one for that plus a whole answer. Without them: every job beyond the free slots is an average
        answer. Queries waiting in the coordinator for this (full) agent come after all of those.
        """
        queued = self.outstanding + self.waiting_ahead
        if self.ahead is None:
            waiting_jobs = max(0, queued - self.slots + 1)
            return waiting_jobs * (self.ttft_s + output_tokens / self.tokens_per_s) / self.slots
        if queued < self.slots:
            return 0.0
        speed = self._stream_speed()
        generating = [job for job in self.ahead if job.generating_s is not None]
        waiting = [job for job in self.ahead if job.generating_s is None]
        work = [max(OVERRUN_FLOOR * max(job.expected_tokens / speed, job.generating_s),  # type: ignore[type-var]
                    (job.expected_tokens - job.tokens) / speed if job.tokens is not None
                    else job.expected_tokens / speed - job.generating_s)  # type: ignore[operator]
                for job in generating]
        work += [self.ttft_s + job.expected_tokens / speed for job in waiting]
        work += [self.ttft_s + output_tokens / speed] * (max(0, self.outstanding - len(self.ahead))
                                                         + self.waiting_ahead)
        free = [0.0] * self.slots
        for seconds in work:
            heapq.heappush(free, heapq.heappop(free) + seconds)
        return free[0]

    @property
    def saved_prefill_s(self) -> float:
        """Prompt reading this agent skips thanks to its cache (0 when it holds nothing of this query)."""
        if not self.cached_tokens or self.prefill_tokens_per_s <= 0:
            return 0.0
        return self.cached_tokens / self.prefill_tokens_per_s

    def expected_completion_s(self, output_tokens: float) -> float:
        """Queue wait + time to first token + output tokens at the per-stream speed, less the prompt reading a
        warm cache saves."""
        if self.expected_tokens is not None:
            output_tokens = self.expected_tokens
        service = self.ttft_s + output_tokens / self._stream_speed()
        return self.queue_wait_s(output_tokens) + service - self.saved_prefill_s


@dataclass(frozen=True)
class Route:
    candidate: RouteCandidate
    reason: str
    affinity: bool = False
    """The agent was chosen (also) because it holds the conversation's prompt in its cache."""


def best_offer(record: AgentRecord, catalog: Catalog) -> ModelOffer | None:
    """What ``auto`` and ``quality`` ask of an agent: its ready assignment, else the best chat model it has.

    The fallback (assignment missing, failed, or still pulling) prefers a model in memory, then the largest on
    disk that fits the machine's memory; embedding models never answer a chat.
    """
    offers = [offer for offer in record.offers() if catalog.is_chat(offer.name)]
    if not offers:
        return None
    if offers[0].state == "ready":
        return offers[0]
    loaded = [offer for offer in offers if offer.state == "loaded"]
    local = [offer for offer in offers if offer.state == "local" and fits_memory(record, catalog.estimate(offer.name),
                                                                                   catalog)]
    pool = loaded or local
    if not pool:
        return None
    return max(pool, key=lambda offer: (catalog.size_rank(offer.name), offer.name))


def route_candidates(
    state: ClusterState,
    catalog: Catalog,
    *,
    model: str | None,
    own_inflight: Mapping[str, int],
    external: Mapping[str, int],
    cooling: Mapping[str, bool],
    exclude: frozenset[str] = frozenset(),
    prompt_tokens: int = 0,
    quarantined: Mapping[str, str] | None = None,
    jobs: Mapping[str, Sequence[JobProgress]] | None = None,
    expected_tokens: Callable[[str], float] | None = None,
    cached: Mapping[str, int] | None = None,
    waiting: Mapping[str, int] | None = None,
) -> list[RouteCandidate]:
    """Agents that can answer now — with ``model`` in any state, or (``None``) with their best model — not
    excluded and not in quarantine (:mod:`broker.scheduling.trust`), with their load and speed. Each candidate
    carries the agent's own name for the model.

    ``jobs``: this coordinator's own jobs per agent (their progress makes the queue estimate honest);
    ``expected_tokens(model)``: the predicted answer length per model; ``cached``: prompt tokens of this query
    an agent holds in its cache (the conversation's previous turn ran there); ``waiting``: older queries waiting
    in the coordinator for room on each full agent."""
    found = []
    for record in state.agents.values():
        if record.agent_id in exclude or (quarantined and record.agent_id in quarantined):
            continue
        if model is None:
            offer = best_offer(record, catalog)
        else:
            offers = record.offers()
            name = find_model(model, [offer.name for offer in offers])
            offer = next((offer for offer in offers if offer.name == name), None)
        if offer is None:
            continue
        speed = expected_speed(record, offer.name, catalog, prompt_tokens, loaded=offer.state != "local")
        own_jobs = tuple(jobs.get(record.agent_id, ())) if jobs is not None else None
        tokens_per_s, source = speed.tokens_per_s, speed.source
        live = live_speed(own_jobs, record.slots) if own_jobs else None
        if live is not None and live[0] < tokens_per_s:  # only ever slower: finished answers catch a speed-up
            tokens_per_s = max(0.1, tokens_per_s + live[1] * (live[0] - tokens_per_s))
            source = f"{source}, slower now ({live[0]:.1f} tok/s live)"
        found.append(RouteCandidate(
            agent_id=record.agent_id,
            model=offer.name,
            outstanding=own_inflight.get(record.agent_id, 0) + external.get(record.agent_id, 0),
            slots=record.slots,
            tokens_per_s=tokens_per_s,
            ttft_s=speed.ttft_s,
            speed_source=source,
            cooling_down=cooling.get(record.agent_id, False),
            availability=offer.state,
            continues_prefill=record.continues_prefill,
            ahead=own_jobs,
            expected_tokens=expected_tokens(offer.name) if expected_tokens is not None else None,
            prefill_tokens_per_s=speed.prefill_tokens_per_s,
            cached_tokens=min(prompt_tokens, cached.get(record.agent_id, 0)) if cached else 0,
            waiting_ahead=waiting.get(record.agent_id, 0) if waiting else 0,
        ))
    found.sort(key=lambda candidate: candidate.agent_id)
    return found


AVAILABILITY_NOTES = {"loaded": "is in its runtime's memory (not its assignment)",
                      "local": "is on its disk (not its assignment): it loads first"}


class Router:
    """Applies one routing policy; keeps the little state the baselines need."""

    def __init__(self, policy: RoutingPolicy | str = "expected_completion", rng: random.Random | None = None,
                 first_turn: int = 0) -> None:
        """``first_turn``: where ties start rotating. Several front ends on one cluster each start at a random
        turn, so with equal agents they do not all send their next query to the same one in step."""
        self.policy = canonical_policy(policy)
        self._rng = rng or random.Random()
        self._turn = itertools.count(first_turn)

    def choose(self, candidates: Sequence[RouteCandidate], output_tokens: float) -> Route:
        """Pick one candidate (``candidates`` must not be empty); agents cooling down only as a last resort."""
        if not candidates:
            raise ValueError("no candidates")
        route = self._choose(candidates, output_tokens)
        availability = AVAILABILITY_NOTES.get(route.candidate.availability)
        if availability:
            return Route(route.candidate, f"{route.reason}; {route.candidate.model} {availability}", route.affinity)
        return route

    def _choose(self, candidates: Sequence[RouteCandidate], output_tokens: float) -> Route:
        warm = [candidate for candidate in candidates if not candidate.cooling_down]
        pool = sorted(warm or candidates, key=lambda candidate: candidate.agent_id)
        note = "" if warm else " (every candidate is cooling down)"
        turn = next(self._turn)
        if self.policy == "round_robin":
            chosen = pool[turn % len(pool)]
            return Route(chosen, f"round robin over {len(pool)} agent(s){note}")
        if self.policy == "random":
            return Route(self._rng.choice(pool), f"random among {len(pool)} agent(s){note}")
        if self.policy == "least_outstanding":
            fewest = min(candidate.outstanding / candidate.slots for candidate in pool)
            tied = [candidate for candidate in pool if candidate.outstanding / candidate.slots == fewest]
            chosen = tied[turn % len(tied)]
            return Route(chosen, f"least outstanding: {chosen.outstanding} job(s) on {chosen.slots} slot(s){note}")
        times = {candidate.agent_id: candidate.expected_completion_s(output_tokens) for candidate in pool}
        best = min(times.values())
        # Near-ties rotate, so equal agents share the load and all stay measured.
        tied = [candidate for candidate in pool if times[candidate.agent_id] <= best + abs(best) * 0.02 + 1e-9]
        warm_cache = [candidate for candidate in tied if candidate.saved_prefill_s > 0]
        chosen = warm_cache[0] if warm_cache else tied[turn % len(tied)]
        others = ", ".join(f"{c.agent_id} {times[c.agent_id]:.2f}s" for c in pool if c is not chosen)
        holders = [candidate for candidate in pool if candidate.saved_prefill_s > 0]
        cache_note = ""
        if chosen.saved_prefill_s > 0:
            cache_note = (f"; conversation affinity: {chosen.agent_id} holds {chosen.cached_tokens} prompt tokens "
                          f"of this conversation (saves ~{chosen.saved_prefill_s:.2f}s of prefill)")
        elif holders:
            holder = holders[0]
            cache_note = (f"; conversation affinity declined: {holder.agent_id} holds the conversation but its "
                          f"queue costs more than the ~{holder.saved_prefill_s:.2f}s of prefill it would save")
        return Route(chosen, (
            f"lowest expected completion {times[chosen.agent_id]:.2f}s ({chosen.outstanding} queued, "
            f"ttft {chosen.ttft_s:.2f}s, {chosen.tokens_per_s:.1f} tok/s {chosen.speed_source})"
            + (f" vs {others}" if others else "") + note + cache_note
        ), affinity=chosen.saved_prefill_s > 0)


def prefer_tools(candidates: list[RouteCandidate], catalog: Catalog) -> list[RouteCandidate]:
    """For a query with tools: candidates whose model calls functions (catalog tag ``tools``), else those whose
    model the catalog does not know (its runtime may serve tools), else all (their runtime answers, refusal
    included: tools are never dropped)."""
    able = [c for c in candidates if catalog.supports_tools(c.model)]
    if able:
        return able
    unknown = [c for c in candidates if catalog.supports_tools(c.model) is None]
    return unknown or candidates


def coming_soon(
    state: ClusterState, model: str | None, exclude: frozenset[str], assignment_pending: bool
) -> str | None:
    """Describe an agent that will soon be able to serve (pulling, loading, just assigned), or ``None``.

    ``assignment_pending``: a re-plan is about to run, so an agent without an assignment will get one.
    """
    for record in state.online_agents():
        target = record.current_model
        if record.agent_id in exclude or (model is not None and not same_model(target, model)):
            continue
        model_state = record.model_state
        if model_state is not None and model_state.state in ("pulling", "loading"):
            progress = f" {model_state.progress:.0%}" if model_state.progress is not None else ""
            return f"{record.agent_id} is {model_state.state} {model_state.model or target}{progress}"
        if record.assignment is not None and (model_state is None or model_state.state == "absent"
                                              or model_state.model != record.assignment.model):
            return f"{record.agent_id} was just assigned {record.assignment.model}"
        if record.assignment is None and assignment_pending:
            return f"{record.agent_id} is waiting for its model assignment"
    return None


def no_agent_reason(state: ClusterState, catalog: Catalog, model: str | None, exclude: frozenset[str],
                    quarantined: Mapping[str, str] | None = None) -> str:
    """Why no agent can serve a query (for ``model``, or any model), in words the caller can act on."""
    online = [record for record in state.online_agents() if not (quarantined and record.agent_id in quarantined)]
    held = sorted(quarantined or {})
    held_note = f"; in quarantine (no jobs): {', '.join(held[:5])}{' …' if len(held) > 5 else ''}" if held else ""
    if exclude:
        return f"no other agent can continue this answer (tried {', '.join(sorted(exclude))}){held_note}"
    if not online:
        return f"no agent can serve this: no agent is online{held_note}" if not held else \
            f"no agent can serve this: no online agent is out of quarantine{held_note}"
    servable = [name for name in servable_models(state, catalog, held) if catalog.is_chat(name)]
    if model is not None:
        known = (" (it is in the catalog: pull it with /api/pull, or wait for placement to assign it)"
                 if catalog.model(model) else "")
        available = f"; models available: {', '.join(servable)}" if servable else ""
        return f"no agent can serve model {model!r}: no online agent has it{known}{available}{held_note}"
    problems = "; ".join(
        f"{record.agent_id}: {record.model_state.state if record.model_state else 'no model'}"
        + (f" ({record.model_state.error})" if record.model_state and record.model_state.error else "")
        + ("" if record.reachable else " (runtime unreachable)")
        for record in online
    )
    return (f"no agent can serve this: no agent has a ready model or another model it can answer with "
            f"({problems}){held_note}")


def largest_model(candidates: Sequence[RouteCandidate], catalog: Catalog) -> str | None:
    """The biggest model among the candidates (``quality`` mode): by parameter count (the catalog's, else the
    name's), then by name for ties."""
    if not candidates:
        return None
    return max({candidate.model for candidate in candidates}, key=lambda name: (catalog.size_rank(name), name))


def one_per_agent(candidates: Sequence[RouteCandidate]) -> list[RouteCandidate]:
    """Fan-out targets: every agent with a ready model, cooling ones included only if nothing else is left."""
    warm = [candidate for candidate in candidates if not candidate.cooling_down]
    return warm or list(candidates)


# ---------------------------------------------------------------- other front ends' jobs


REPORT_FRESH_INTERVALS = 1.5
"""A load report counts in full for this many of the agent's telemetry intervals (the next one replaces it)..."""
REPORT_STALE_INTERVALS = 3.0
"""... and fades to nothing by this many (the coordinator's default expiry): the jobs it counted have moved on."""
STREAMING_IDLE_S = 3.0
"""Another front end's job whose chunks stopped this long ago is no longer counted (its final chunk was lost)."""
STREAMING_MAX_JOBS = 256
"""At most this many other jobs are followed per agent (64 slots at most, plus queues): an agent that streams
chunks for endless made-up request ids costs bounded memory."""


@dataclass
class _LoadReport:
    others: int
    at: float
    interval_s: float


class OthersLoad:
    """Jobs on each agent that this process did not send: another front end's (or coordinator's) queries.

    Why: several front ends route their own queries on one broker; with only its own in-flight count each
    sees an idle agent where another has just queued its jobs, and they pile onto the same machine. Two
    sources, the larger wins per agent:

    * **telemetry**: the agent counts every job it runs and queues; beyond this process's own at that moment
      they are someone else's. A report counts in full for 1.5 telemetry intervals and fades to nothing by 3
      (then the agent expires anyway): after a lost report the jobs it counted have moved on.
    * **result chunks**: every front end subscribes to every agent's results, so it sees another front end's
      answers stream within ~30 ms, long before the next telemetry. A request id streaming there that is not
      ours is a running job until its final chunk (or 3 s of silence).

    Time is passed in (monotonic seconds), so the class is pure and tested without a clock.
    """

    def __init__(self) -> None:
        self._reports: dict[str, _LoadReport] = {}
        self._streaming: dict[str, dict[str, float]] = {}

    def report(self, agent_id: str, reported_jobs: int, own_jobs: int, interval_s: float, now: float) -> None:
        """Telemetry: the agent runs or queues ``reported_jobs``, of which ``own_jobs`` are this process's."""
        self._reports[agent_id] = _LoadReport(max(0, reported_jobs - own_jobs), now, max(interval_s, 0.01))

    def chunk(self, agent_id: str, request_id: str, done: bool, now: float) -> None:
        """A result chunk of a job this process did not send (or no longer follows)."""
        jobs = self._streaming.setdefault(agent_id, {})
        if done:
            jobs.pop(request_id, None)
            return
        jobs[request_id] = now
        if len(jobs) > STREAMING_MAX_JOBS:
            self.streaming(agent_id, now)  # drops the silent ones
            while len(jobs) > STREAMING_MAX_JOBS:
                del jobs[min(jobs, key=jobs.__getitem__)]

    def reported(self, agent_id: str, now: float) -> float:
        """Others' jobs from the last telemetry, faded by its age."""
        report = self._reports.get(agent_id)
        if report is None:
            return 0.0
        age = (now - report.at) / report.interval_s
        if age <= REPORT_FRESH_INTERVALS:
            return float(report.others)
        weight = (REPORT_STALE_INTERVALS - age) / (REPORT_STALE_INTERVALS - REPORT_FRESH_INTERVALS)
        return report.others * max(0.0, weight)

    def streaming(self, agent_id: str, now: float) -> int:
        """Others' jobs seen streaming on the agent now (stale ones are dropped here)."""
        jobs = self._streaming.get(agent_id)
        if not jobs:
            return 0
        for request_id in [r for r, seen in jobs.items() if now - seen > STREAMING_IDLE_S]:
            del jobs[request_id]
        return len(jobs)

    def jobs(self, now: float) -> dict[str, int]:
        """Others' jobs per agent: the larger of the faded report and what is seen streaming (rounded)."""
        agents = set(self._reports) | set(self._streaming)
        found = {agent: max(round(self.reported(agent, now)), self.streaming(agent, now)) for agent in agents}
        return {agent: count for agent, count in found.items() if count}


# ---------------------------------------------------------------- circuit breaker


class CircuitBreaker:
    """Agents that keep failing get no new jobs for ``cooldown_s``; a success closes the breaker."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._count: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def record_failure(self, agent_id: str, now: float) -> bool:
        """Count a failure; True when this one opened the breaker."""
        count = self._count.get(agent_id, 0) + 1
        self._count[agent_id] = count
        if count >= self.failures and not self.cooling_down(agent_id, now):
            self._until[agent_id] = now + self.cooldown_s
            self._count[agent_id] = 0
            return True
        return False

    def record_success(self, agent_id: str) -> None:
        self._count.pop(agent_id, None)
        self._until.pop(agent_id, None)

    def cooling_down(self, agent_id: str, now: float) -> bool:
        until = self._until.get(agent_id)
        return until is not None and now < until

    def cooling(self, now: float) -> dict[str, bool]:
        """Agents cooling down at ``now``; safe from another thread (the copy is taken in one step)."""
        return {agent_id: True for agent_id, until in self._until.copy().items() if now < until}

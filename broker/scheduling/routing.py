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

import itertools
import random
from collections.abc import Mapping, Sequence
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

    def queue_wait_s(self, output_tokens: float) -> float:
        """Expected wait before this agent starts a new job: the jobs beyond its free slots, each a full answer."""
        waiting_jobs = max(0, self.outstanding - self.slots + 1)
        return waiting_jobs * (self.ttft_s + output_tokens / self.tokens_per_s) / self.slots

    def expected_completion_s(self, output_tokens: float) -> float:
        """Queue wait + time to first token + output tokens at the per-stream speed."""
        sharing = min(self.outstanding, self.slots - 1)
        speed = self.tokens_per_s / (1.0 + CONTENTION * sharing)
        service = self.ttft_s + output_tokens / speed
        return self.queue_wait_s(output_tokens) + service


@dataclass(frozen=True)
class Route:
    candidate: RouteCandidate
    reason: str


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
) -> list[RouteCandidate]:
    """Agents that can answer now — with ``model`` in any state, or (``None``) with their best model — not
    excluded and not in quarantine (:mod:`broker.scheduling.trust`), with their load and speed. Each candidate
    carries the agent's own name for the model."""
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
        found.append(RouteCandidate(
            agent_id=record.agent_id,
            model=offer.name,
            outstanding=own_inflight.get(record.agent_id, 0) + external.get(record.agent_id, 0),
            slots=record.slots,
            tokens_per_s=speed.tokens_per_s,
            ttft_s=speed.ttft_s,
            speed_source=speed.source,
            cooling_down=cooling.get(record.agent_id, False),
            availability=offer.state,
            continues_prefill=record.continues_prefill,
        ))
    found.sort(key=lambda candidate: candidate.agent_id)
    return found


AVAILABILITY_NOTES = {"loaded": "is in its runtime's memory (not its assignment)",
                      "local": "is on its disk (not its assignment): it loads first"}


class Router:
    """Applies one routing policy; keeps the little state the baselines need."""

    def __init__(self, policy: RoutingPolicy | str = "expected_completion", rng: random.Random | None = None) -> None:
        self.policy = canonical_policy(policy)
        self._rng = rng or random.Random()
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[RouteCandidate], output_tokens: float) -> Route:
        """Pick one candidate (``candidates`` must not be empty); agents cooling down only as a last resort."""
        if not candidates:
            raise ValueError("no candidates")
        route = self._choose(candidates, output_tokens)
        availability = AVAILABILITY_NOTES.get(route.candidate.availability)
        if availability:
            return Route(route.candidate, f"{route.reason}; {route.candidate.model} {availability}")
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
        tied = [candidate for candidate in pool if times[candidate.agent_id] <= best * 1.02 + 1e-9]
        chosen = tied[turn % len(tied)]
        others = ", ".join(f"{c.agent_id} {times[c.agent_id]:.2f}s" for c in pool if c is not chosen)
        return Route(chosen, (
            f"lowest expected completion {times[chosen.agent_id]:.2f}s ({chosen.outstanding} queued, "
            f"ttft {chosen.ttft_s:.2f}s, {chosen.tokens_per_s:.1f} tok/s {chosen.speed_source})"
            + (f" vs {others}" if others else "") + note
        ))


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

"""A discrete-event simulation of a cluster that routes with the project's own code.

Why simulate: a routing comparison needs thousands of requests per policy and
load level, hours of wall time on real agents. Why trust it: every decision
goes through the real routing code — registry events applied with
:func:`broker.scheduling.registry.apply`, candidates from :func:`broker.scheduling.routing.route_candidates`
(so speed estimates come from :mod:`broker.scheduling.estimates` exactly as in the
coordinator), and the choice from :class:`broker.scheduling.routing.Router`; models are
placed by :func:`broker.scheduling.placement.plan_placement`. What the simulation adds is
only what the coordinator and the agents do around those calls, mirrored line
by line (bench/bench_routing.py checks it against a real run):

* coordinator: admission (an agent takes at most ``slots + agent_queue_limit``
  jobs; a query waits for room and retries on every completion or telemetry;
  queries waiting for a full agent count in its queue for later ones),
  its own in-flight count per agent, ``external`` = what telemetry reports
  beyond that, ``AnswerMeasured`` after every answer, the moving average of
  answer lengths (``min(num_predict, average)`` when the job carries a limit);
* agent (``--backend simulated``): ``slots`` parallel jobs, FIFO queue, the
  first token after ``ttft`` and the rest at ``tokens_per_s``; its result stats
  as JobRunner reports them (TTFT counted from the job's arrival, so it
  includes queueing; tokens/s = tokens ÷ generation time); telemetry every
  ``telemetry_interval_s`` with the median speed and TTFT of the last 120 s;
  the warm-up benchmark (8 tokens) in its hardware message.

The ``oracle`` policy is clairvoyant: it knows every answer's length and every
agent's true speed and queue, and sends each query where it will finish first.
"""

from __future__ import annotations

import collections
import heapq
import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import PROFILES
from broker.protocol.messages import Benchmark, Hardware, ModelState, ResultStats, Status, Telemetry
from broker.scheduling.catalog import DEFAULT_CATALOG, Catalog, load_catalog
from broker.scheduling.estimates import AnswerLengths, prompt_shape
from broker.scheduling.placement import PlacementSettings, plan_placement
from broker.scheduling.registry import (
    AnswerMeasured,
    ClusterState,
    HardwareReceived,
    ModelStateReceived,
    StatusReceived,
    TelemetryReceived,
    apply,
)
from broker.scheduling.routing import JobProgress, Router, route_candidates

POLICIES = ("auto", "auto_legacy", "round_robin", "random", "least_outstanding", "oracle")
"""``auto_legacy``: ``auto`` as it was before issue 15 — every outstanding job an average answer, only agents with
room considered, one moving average of answer lengths — kept to measure the change in the same run."""
AGENT_QUEUE_LIMIT = 4  # CoordinatorSettings.agent_queue_limit default
EXPECTED_OUTPUT_TOKENS = 256  # CoordinatorSettings.expected_output_tokens default
OUTPUT_TOKENS_SMOOTHING = 0.1  # broker.coordinator.execution.OUTPUT_TOKENS_SMOOTHING
STATS_WINDOW_S = 120.0  # AgentSettings.stats_window_s default
BENCHMARK_TOKENS = 8  # bench.common.agent_args passes --benchmark-tokens 8

# Answer and prompt lengths: log-normal, as chat traces show (most answers a few hundred tokens, a long tail).
ANSWER_MEDIAN_TOKENS = 180
ANSWER_SIGMA = 0.8
ANSWER_RANGE = (8, 1024)
PROMPT_MEDIAN_TOKENS = 250
PROMPT_SIGMA = 1.0
PROMPT_RANGE = (8, 4000)


@dataclass(frozen=True)
class AgentSpec:
    """One simulated machine: its speed, its first-token time, its declared hardware and parallel slots."""

    agent_id: str
    tokens_per_s: float
    ttft_s: float
    profile: str = "gpu-desktop"
    slots: int = 1


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    kind: int = 0
    """The question's kind (what its first words say: "summarise", "write an essay"…): the shape the length
    predictor sees; kinds differ in their typical answer length."""


@dataclass(frozen=True)
class Slowdown:
    """From request ``at_request`` on, ``agent_id`` runs ``factor`` times slower (speed ÷, first token ×)."""

    at_request: int
    agent_id: str
    factor: float


@dataclass(frozen=True)
class Outcome:
    index: int
    agent_id: str
    arrival_s: float
    first_token_s: float
    finished_s: float

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


def _lognormal(rng: random.Random, median: float, sigma: float, bounds: tuple[int, int], scale: float) -> int:
    value = median * scale * math.exp(rng.gauss(0.0, sigma))
    return int(min(bounds[1] * scale, max(bounds[0], round(value))))


KIND_SIGMA = 0.35
"""Spread of answer lengths within one kind of question (the rest of ANSWER_SIGMA is spread between kinds)."""
KINDS = 8


def _kind_medians(length_scale: float) -> list[float]:
    """Median answer length per kind: spread so that the lengths of all kinds together are about as before."""
    between = math.sqrt(max(0.0, ANSWER_SIGMA ** 2 - KIND_SIGMA ** 2))
    return [ANSWER_MEDIAN_TOKENS * length_scale * math.exp(between * (2 * (k + 0.5) / KINDS - 1) * 1.7)
            for k in range(KINDS)]


def make_workload(seed: int, count: int, rate_per_s: float, length_scale: float = 1.0,
                  kinds: bool = False) -> list[Request]:
    """Poisson arrivals at ``rate_per_s``; log-normal prompt and answer lengths (answers scaled by ``length_scale``).

    ``kinds``: every question has one of :data:`KINDS` kinds whose answers have their own typical length (as
    "summarise in a sentence" and "write an essay" do); the answer is log-normal around its kind's median."""
    rng = random.Random(seed)
    requests: list[Request] = []
    medians = _kind_medians(length_scale)
    now = 0.0
    for index in range(count):
        now += rng.expovariate(rate_per_s)
        prompt = _lognormal(rng, PROMPT_MEDIAN_TOKENS, PROMPT_SIGMA, PROMPT_RANGE, 1.0)
        if kinds:
            kind = rng.randrange(KINDS)
            answer = max(2, _lognormal(rng, medians[kind], KIND_SIGMA, ANSWER_RANGE, 1.0))
            answer = int(min(ANSWER_RANGE[1] * length_scale, answer))
        else:
            kind = 0
            answer = max(2, _lognormal(rng, ANSWER_MEDIAN_TOKENS, ANSWER_SIGMA, ANSWER_RANGE, length_scale))
        requests.append(Request(index, now, prompt, answer, kind))
    return requests


def mean_service_s(spec: AgentSpec, length_scale: float = 1.0, samples: int = 20_000) -> float:
    """Mean time one job occupies a slot (first token + the rest of the answer), over the length distribution."""
    rng = random.Random(7)
    total = 0.0
    for _ in range(samples):
        tokens = max(2, _lognormal(rng, ANSWER_MEDIAN_TOKENS, ANSWER_SIGMA, ANSWER_RANGE, length_scale))
        total += spec.ttft_s + (tokens - 1) / spec.tokens_per_s
    return total / samples


def capacity_per_s(agents: Sequence[AgentSpec], length_scale: float = 1.0) -> float:
    """Requests per second the cluster completes when every slot is always busy."""
    return sum(spec.slots / mean_service_s(spec, length_scale) for spec in agents)


def load_profile(name: str) -> dict[str, Any]:
    data = json.loads((PROFILES / f"{name}.json").read_text())
    data.pop("description", None)
    return data


# ---------------------------------------------------------------- the simulated agent (mirrors agent/jobs.py)


@dataclass
class _Job:
    request: Request
    received_s: float
    expected_tokens: float = 0.0
    start_s: float = 0.0
    first_token_s: float = 0.0
    finish_s: float = 0.0


@dataclass
class _Agent:
    spec: AgentSpec
    model: str
    tokens_per_s: float
    ttft_s: float
    running: list[_Job] = field(default_factory=list)
    queue: collections.deque[_Job] = field(default_factory=collections.deque)
    recent: collections.deque[tuple[float, float, float]] = field(default_factory=collections.deque)

    def summary(self, now: float) -> tuple[float | None, float | None]:
        """RecentStats.summary: medians over the last STATS_WINDOW_S."""
        while self.recent and self.recent[0][0] < now - STATS_WINDOW_S:
            self.recent.popleft()
        if not self.recent:
            return None, None
        return (round(statistics.median(s[1] for s in self.recent), 2),
                round(statistics.median(s[2] for s in self.recent), 4))

    def free_at(self, now: float) -> list[float]:
        """When each slot frees up, given the jobs running and queued (the oracle's knowledge)."""
        slots = sorted([job.finish_s for job in self.running] + [now] * (self.spec.slots - len(self.running)))
        for job in self.queue:
            start = max(now, slots[0])
            heapq.heapreplace(slots, start + self.ttft_s + (job.request.output_tokens - 1) / self.tokens_per_s)
        return slots


class Simulation:
    """One run of one policy over one workload; :meth:`run` returns an outcome per request."""

    def __init__(self, agents: Sequence[AgentSpec], policy: str, workload: Sequence[Request], *, seed: int = 1,
                 length_hint: bool = False, telemetry_interval_s: float = 1.0, slowdown: Slowdown | None = None,
                 catalog: Catalog | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy}")
        self.policy = policy
        self.workload = list(workload)
        self.length_hint = length_hint
        self.telemetry_interval_s = telemetry_interval_s
        self.slowdown = slowdown
        self.catalog = catalog or load_catalog(DEFAULT_CATALOG)
        # The bench calls the policy "auto"; the router calls it "expected_completion" (the oracle needs no router).
        self.router = Router("expected_completion" if policy in ("auto", "auto_legacy", "oracle") else policy,
                             rng=random.Random(seed))
        self.lengths = AnswerLengths(EXPECTED_OUTPUT_TOKENS)
        self.state = ClusterState()
        self.own: dict[str, int] = {}
        self.external: dict[str, int] = {}
        self.output_tokens = float(EXPECTED_OUTPUT_TOKENS)
        self.waiting: collections.deque[Request] = collections.deque()
        self.outcomes: dict[int, Outcome] = {}
        self._events: list[tuple[float, int, str, Any]] = []
        self._counter = 0
        self.agents = self._register(agents)

    # ---------------------------------------------------------------- setup through the real registry and placement

    def _register(self, specs: Sequence[AgentSpec]) -> dict[str, _Agent]:
        hardware: dict[str, Hardware] = {}
        for spec in specs:
            status = Status(state="online", agent_version="sim", backend="simulated", simulated=True,
                            max_parallel=spec.slots)
            self.state = apply(self.state, StatusReceived(spec.agent_id, status), 0.0)
            hardware[spec.agent_id] = Hardware(**load_profile(spec.profile), declared=True)
            self.state = apply(self.state, HardwareReceived(spec.agent_id, hardware[spec.agent_id]), 0.0)
        plan = plan_placement(self.state, self.catalog, PlacementSettings(move_fraction=1.0), 0.0)
        models = {entry.agent_id: entry.target_model for entry in plan.entries}
        agents: dict[str, _Agent] = {}
        for spec in specs:
            model = models[spec.agent_id]
            benchmark = Benchmark(model=model, tokens_per_s=round(
                BENCHMARK_TOKENS / ((BENCHMARK_TOKENS - 1) / spec.tokens_per_s), 2), ttft_s=spec.ttft_s)
            with_benchmark = hardware[spec.agent_id].model_copy(update={"benchmark": benchmark})
            self.state = apply(self.state, HardwareReceived(spec.agent_id, with_benchmark), 0.0)
            self.state = apply(self.state, ModelStateReceived(spec.agent_id, ModelState(model=model, state="ready")),
                               0.0)
            agents[spec.agent_id] = _Agent(spec, model, spec.tokens_per_s, spec.ttft_s)
        return agents

    # ---------------------------------------------------------------- event loop

    def _push(self, at: float, kind: str, data: Any) -> None:
        self._counter += 1
        heapq.heappush(self._events, (at, self._counter, kind, data))

    def run(self) -> list[Outcome]:
        for request in self.workload:
            self._push(request.arrival_s, "arrival", request)
        if self.policy != "oracle":
            for offset, agent_id in enumerate(sorted(self.agents)):
                self._push(self.telemetry_interval_s * offset / max(1, len(self.agents)), "telemetry", agent_id)
        remaining = len(self.workload)
        while self._events and remaining:
            now, _, kind, data = heapq.heappop(self._events)
            if kind == "arrival":
                self._arrive(data, now)
            elif kind == "finish":
                self._finish(data[0], data[1], now)
                remaining -= 1
            elif kind == "telemetry":
                self._telemetry(data, now)
                self._push(now + self.telemetry_interval_s, "telemetry", data)
        return [self.outcomes[request.index] for request in self.workload]

    def _arrive(self, request: Request, now: float) -> None:
        if self.slowdown is not None and request.index == self.slowdown.at_request:
            agent = self.agents[self.slowdown.agent_id]
            agent.tokens_per_s /= self.slowdown.factor
            agent.ttft_s *= self.slowdown.factor
        if self.policy == "oracle":
            self._dispatch(request, self._oracle_choice(request, now), now)
            return
        self.waiting.append(request)
        self._admit(now)

    def _oracle_choice(self, request: Request, now: float) -> str:
        def finish(agent: _Agent) -> float:
            start = max(now, agent.free_at(now)[0])
            return start + agent.ttft_s + (request.output_tokens - 1) / agent.tokens_per_s

        return min(sorted(self.agents), key=lambda agent_id: finish(self.agents[agent_id]))

    def _shape(self, request: Request) -> tuple[object, ...]:
        """QueryExecutor._shape: the prompt's size class and the question's kind (its first words), and the size
        class of its limit when it carries one."""
        limit = request.output_tokens if self.length_hint else 0
        return (*prompt_shape(request.prompt_tokens, 1, False, f"kind{request.kind}"), int(limit).bit_length())

    def _expected_tokens(self, request: Request, model: str | None = None) -> float:
        if self.policy == "auto_legacy":
            if self.length_hint:  # the old QueryExecutor._expected_output_tokens with num_predict in the options
                return min(float(request.output_tokens), self.output_tokens)
            return self.output_tokens
        predicted = self.lengths.predict(model, self._shape(request))
        return min(float(request.output_tokens), predicted) if self.length_hint else predicted

    def _jobs(self, now: float) -> dict[str, list[JobProgress]]:
        """What QueryExecutor.candidates hands routing: each own job's expected length, time generating and tokens
        streamed so far."""
        def progress(agent: _Agent, job: _Job) -> JobProgress:
            if job not in agent.running or now < job.first_token_s:
                return JobProgress(job.expected_tokens)
            generating = now - job.first_token_s
            pace = (job.request.output_tokens - 1) / max(1e-9, job.finish_s - job.first_token_s)
            return JobProgress(job.expected_tokens, generating, min(job.request.output_tokens, 1 + generating * pace))

        return {agent_id: [progress(agent, job) for job in [*agent.running, *agent.queue]]
                for agent_id, agent in self.agents.items()}

    def _admit(self, now: float) -> None:
        """QueryExecutor._admit for every waiting query, oldest first (all wake on the same notify)."""
        still_waiting: collections.deque[Request] = collections.deque()
        legacy = self.policy == "auto_legacy"
        waiting_for: dict[str, int] = {}  # QueryExecutor._waiting_for: older queries still waiting, per agent
        while self.waiting:
            request = self.waiting.popleft()
            candidates = route_candidates(
                self.state, self.catalog, model=None, own_inflight=self.own, external=self.external, cooling={},
                prompt_tokens=request.prompt_tokens, jobs=None if legacy else self._jobs(now),
                expected_tokens=None if legacy else (lambda model, r=request: self._expected_tokens(r, model)),
                waiting=None if legacy else waiting_for)
            room = [c for c in candidates if c.outstanding < c.slots + AGENT_QUEUE_LIMIT]
            if not room:
                still_waiting.append(request)
                continue
            if self.policy == "auto":  # every candidate; a full best one is waited for
                route = self.router.choose(candidates, self._expected_tokens(request))
                if route.candidate not in room:
                    waiting_for[route.candidate.agent_id] = waiting_for.get(route.candidate.agent_id, 0) + 1
                    still_waiting.append(request)
                    continue
            else:
                route = self.router.choose(room, self._expected_tokens(request))
            self._dispatch(request, route.candidate.agent_id, now,
                           route.candidate.expected_tokens or self._expected_tokens(request))
        self.waiting = still_waiting

    def _dispatch(self, request: Request, agent_id: str, now: float, expected_tokens: float = 0.0) -> None:
        self.own[agent_id] = self.own.get(agent_id, 0) + 1
        agent = self.agents[agent_id]
        job = _Job(request, now, expected_tokens)
        if len(agent.running) < agent.spec.slots:
            self._start(agent, job, now)
        else:
            agent.queue.append(job)

    def _start(self, agent: _Agent, job: _Job, now: float) -> None:
        job.start_s = now
        job.first_token_s = now + agent.ttft_s
        job.finish_s = job.first_token_s + (job.request.output_tokens - 1) / agent.tokens_per_s
        agent.running.append(job)
        self._push(job.finish_s, "finish", (agent.spec.agent_id, job))

    def _finish(self, agent_id: str, job: _Job, now: float) -> None:
        agent = self.agents[agent_id]
        agent.running.remove(job)
        tokens = job.request.output_tokens
        generation_s = job.finish_s - job.first_token_s
        # As agent/jobs.py: ttft_s counts from arrival, queue_s says how much of it was queueing, and
        # telemetry reports the backend's own time to first token.
        stats = ResultStats(prompt_tokens=job.request.prompt_tokens, output_tokens=tokens,
                            ttft_s=round(job.first_token_s - job.received_s, 4),
                            tokens_per_s=round(tokens / generation_s, 2), total_s=round(now - job.received_s, 4),
                            queue_s=round(job.start_s - job.received_s, 4))
        agent.recent.append((now, stats.tokens_per_s or 0.0, round(job.first_token_s - job.start_s, 4)))
        if agent.queue:
            self._start(agent, agent.queue.popleft(), now)
        self.outcomes[job.request.index] = Outcome(job.request.index, agent_id, job.request.arrival_s,
                                                   job.first_token_s, job.finish_s)
        count = self.own.get(agent_id, 1) - 1
        if count > 0:
            self.own[agent_id] = count
        else:
            self.own.pop(agent_id, None)
        if self.policy == "oracle":
            return
        # QueryExecutor._end_attempt: measured speed, answer-length average, then wake waiting queries.
        self.state = apply(self.state, AnswerMeasured(agent_id, agent.model, stats), now)
        self.output_tokens += OUTPUT_TOKENS_SMOOTHING * (tokens - self.output_tokens)
        self.lengths.observe(agent.model, self._shape(job.request), tokens)
        self._admit(now)

    def _telemetry(self, agent_id: str, now: float) -> None:
        agent = self.agents[agent_id]
        tokens_per_s, ttft_s = agent.summary(now)
        telemetry = Telemetry(ts=now, jobs_running=len(agent.running), jobs_queued=len(agent.queue),
                              max_parallel=agent.spec.slots, tokens_per_s=tokens_per_s, ttft_s=ttft_s,
                              simulated=True, interval_s=self.telemetry_interval_s, backend_reachable=True)
        self.state = apply(self.state, TelemetryReceived(agent_id, telemetry), now)
        own = self.own.get(agent_id, 0)
        self.external[agent_id] = max(0, telemetry.jobs_running + telemetry.jobs_queued - own)
        self._admit(now)


def simulate(agents: Sequence[AgentSpec], policy: str, workload: Sequence[Request], **options: Any) -> list[Outcome]:
    return Simulation(agents, policy, workload, **options).run()

"""Running one query: admission, one answer with failover, fan-out to every agent, combining the answers.

:class:`QueryExecutor` sees the cluster only through what the coordinator hands
it: a getter for the current registry, a publish function, the in-flight
ledger, the circuit breaker, the wake-up call, and a sink for measured answers.
It never touches MQTT or the coordinator itself, so its whole behaviour is
driven in tests by delivering result chunks to a coordinator without a broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from broker.coordinator.attempts import Attempt, CancelSignal, GoneSignal, InFlight, Run
from broker.coordinator.contract import (
    AGGREGATIONS,
    ROUTING_MODES,
    AgentSwitched,
    AnswerRestarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    RoutingMode,
    TextDelta,
)
from broker.coordinator.errors import QueryError
from broker.coordinator.fanout import FanOut
from broker.coordinator.metrics import CoordinatorMetrics, mode_label
from broker.coordinator.outcomes import claimed_speed, combined_stats, failure_code, failure_kind, output_allowed
from broker.coordinator.settings import CoordinatorSettings
from broker.coordinator.wakeup import Wakeup
from broker.protocol import (
    MAX_PAYLOAD_BYTES,
    Cancel,
    ChatMessage,
    Job,
    Message,
    Result,
    ResultStats,
    Telemetry,
    Topics,
    encode,
    is_valid_agent_id,
)
from broker.protocol.messages import ToolCall
from broker.scheduling.affinity import ConversationMemory, lookup_keys, prompt_tokens, remember_keys
from broker.scheduling.catalog import Catalog
from broker.scheduling.estimates import AnswerLengths, prompt_shape
from broker.scheduling.names import same_model
from broker.scheduling.registry import AnswerMeasured, ClusterState
from broker.scheduling.routing import (
    CircuitBreaker,
    JobProgress,
    OthersLoad,
    Route,
    RouteCandidate,
    Router,
    coming_soon,
    largest_model,
    no_agent_reason,
    prefer_tools,
    route_candidates,
)
from broker.scheduling.trust import Delivery, Trust, judge

logger = logging.getLogger(__name__)

OUTPUT_TOKENS_SMOOTHING = 0.1
DEFAULT_CHARS_PER_TOKEN = 4.0
"""Characters per token before an agent's first answer tells its own figure (English text, common tokenizers)."""
CHARS_PER_TOKEN_SMOOTHING = 0.2
"""Weight of the newest answer in the moving average of answer length."""
NOT_THE_AGENTS_FAULT = {"bad_job", "context_too_long"}
TOOLS_REFUSAL = "does not support tools"
"""Ollama's refusal of tools for a model without them (agent/backends/base.py): passed on in its own words."""
"""Error codes that another agent would hit too: the query fails at once."""
FIRST_TOKEN_QUEUE_FACTOR = 2.0
"""The first-token allowance grows by this many times the expected wait behind queued jobs (and a model load):
estimates are rough, and a queued job that is cut for being queued is lost work."""

Publish = Callable[[str, bytes | Message], None]
"""Publish a QoS 1, non-retained message (dropped while the coordinator has no connection)."""


class PrefixDoesNotFit(Exception):
    """A continuation job would be over the protocol's limits with the partial answer as its prefix."""


@dataclass
class _Answer:
    text: str
    agents: list[str]
    models: list[str]
    stats: ResultStats | None
    failovers: int
    tool_calls: list[ToolCall] = field(default_factory=list)


class QueryExecutor:
    """Runs queries against the registry the coordinator keeps; see docs/scheduling.md."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        catalog: Catalog,
        topics: Topics,
        metrics: CoordinatorMetrics,
        *,
        state: Callable[[], ClusterState],
        publish: Publish,
        ledger: InFlight,
        breaker: CircuitBreaker,
        trust: Trust,
        wakeup: Wakeup,
        answer_measured: Callable[[AnswerMeasured], None],
        assignment_pending: Callable[[], bool],
        settling: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.topics = topics
        self.metrics = metrics
        # Front ends sharing the agents start their tie rotation apart (see Router).
        self.router = Router(settings.routing_policy, first_turn=random.randrange(1 << 16))
        self.others = OthersLoad()
        """Jobs on each agent that this process did not send (other front ends'), for routing."""
        self._state = state
        self._publish = publish
        self._ledger = ledger
        self._breaker = breaker
        self._trust = trust
        self._wakeup = wakeup
        self._answer_measured = answer_measured
        self._assignment_pending = assignment_pending
        self._settling = settling
        """Seconds left of the coordinator's first moments on the broker, while the agents' state still arrives."""
        self._output_tokens = float(settings.expected_output_tokens)
        self._lengths = AnswerLengths(settings.expected_output_tokens)
        self._conversations = ConversationMemory()
        self._waiting_for: dict[str, tuple[float, str]] = {}
        """Queries waiting in admission for a full agent: request id → (since when, which agent)."""
        self._chars_per_token: dict[str, float] = {}
        """Characters per answer token, per agent (from finished answers): turns streamed text into tokens."""
        self._fan_out = FanOut(self)

    # ------------------------------------------------------------------ one query

    async def execute(self, request: QueryRequest, emit: Callable[[QueryEvent], None]) -> None:
        """Answer ``request``, emitting its events; always ends with QueryFinished or QueryFailed."""
        now = time.monotonic()
        mode = request.mode or RoutingMode.AUTO.value
        label = mode_label(mode)
        problem = self.validate(request)
        if problem is not None:
            self._fail_metrics(label, "bad_request")
            emit(QueryFailed(request.request_id, problem, code="bad_request"))
            return
        timeout = request.timeout_s if request.timeout_s and request.timeout_s > 0 else self.settings.default_deadline_s
        run = Run(request, now, now + timeout, emit)
        self._ledger.open_run(run)
        try:
            if mode == RoutingMode.ALL:
                combined = await self._fan_out.run(run)
                invalid = request.check_answer(combined.text) if request.check_answer is not None else None
                if invalid is not None and not combined.tool_calls:
                    raise QueryError("invalid_output", f"the combined answer ({request.aggregation}) is not what "
                                     f"was asked for: {invalid}")
                emit(combined)
            else:
                answer = await self._answer(run, list(request.messages), mode, announce=True)
                latency = time.monotonic() - run.started_at
                emit(QueryFinished(request.request_id, answer.text, answer.agents, answer.models, mode,
                                   stats=answer.stats, failovers=answer.failovers, latency_s=round(latency, 3),
                                   tool_calls=answer.tool_calls))
            self._finish_metrics(run, label)
        except QueryError as error:
            self._fail_metrics(label, error.code)
            emit(QueryFailed(request.request_id, error.message, code=error.code,  # type: ignore[arg-type]
                             partial_text=error.partial_text))
        except asyncio.CancelledError:
            self.metrics.queries.labels(label, "cancelled").inc()
            raise
        except Exception as error:  # noqa: BLE001 - a bug must end the caller's stream with an error, not silently
            logger.exception("query %s failed unexpectedly", request.request_id)
            self._fail_metrics(label, "failed")
            emit(QueryFailed(request.request_id, f"internal error: {error}", code="failed"))
        finally:
            self._ledger.close_run(run)
            for attempt in self._ledger.attempts_of(run):
                self._end_attempt(attempt, cancel_reason="query ended")

    def validate(self, request: QueryRequest) -> str | None:
        """What is wrong with ``request`` (for a ``bad_request`` answer), or ``None``."""
        if not request.messages:
            return "a query needs at least one message"
        if not is_valid_agent_id(request.request_id):
            return "request_id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
        if self._ledger.run(request.request_id) is not None:
            return f"request {request.request_id} is already running"
        if request.aggregation not in AGGREGATIONS:
            return (f"unknown aggregation {request.aggregation!r} "
                    f"({', '.join(AGGREGATIONS[:-1])} or {AGGREGATIONS[-1]})")
        if request.tools and request.mode == RoutingMode.ALL:
            return ("tools cannot be combined across agents (model 'all'): name a model, or use 'auto' or "
                    "'quality' (docs/api.md, Tools)")
        if any(message.images for message in request.messages) and request.mode not in ROUTING_MODES \
                and not self.catalog.has_vision(request.mode):
            return f"{request.mode} does not support vision"  # Ollama's words for images sent to such a model
        size = sum(len(message.content) + sum(len(image) for image in message.images)
                   for message in request.messages)
        if size > MAX_PAYLOAD_BYTES * 0.9:
            return f"the conversation is too large ({size} characters; the limit is about {MAX_PAYLOAD_BYTES:,} bytes)"
        return None

    def _finish_metrics(self, run: Run, label: str) -> None:
        now = time.monotonic()
        self.metrics.queries.labels(label, "ok").inc()
        self.metrics.latency.labels(label).observe(now - run.started_at)
        if run.first_text_at is not None:
            self.metrics.ttft.labels(label).observe(run.first_text_at - run.started_at)

    def _fail_metrics(self, label: str, code: str) -> None:
        self.metrics.queries.labels(label, "cancelled" if code == "cancelled" else "error").inc()
        self.metrics.errors.labels(code).inc()

    # ------------------------------------------------------------------ admission

    @staticmethod
    def _limit(request: QueryRequest) -> float | None:
        for key in ("num_predict", "max_tokens", "max_completion_tokens"):
            limit = request.options.get(key)
            if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
                return float(limit)
        return None

    def _shape(self, request: QueryRequest) -> tuple[object, ...]:
        """The question's shape for the length predictor, with the size class of its ``max_tokens`` (answers under
        a limit of 256 and of 4,096 differ)."""
        messages = request.messages
        question = next((m.content for m in reversed(messages) if m.role == "user"), "")
        opening = " ".join(word for word in question.split()[:6] if word.isalpha())
        limit = self._limit(request)
        return (*prompt_shape(prompt_tokens(messages), sum(1 for m in messages if m.role == "user"),
                              any(m.role == "system" for m in messages), opening),
                int(limit).bit_length() if limit else 0)

    def _expected_output_tokens(self, request: QueryRequest, model: str | None = None) -> float:
        """The predicted answer length (:class:`AnswerLengths`, per model and question shape), capped by the
        question's own limit."""
        predicted = self._lengths.predict(model, self._shape(request))
        limit = self._limit(request)
        return min(limit, predicted) if limit is not None else predicted

    def candidates(self, model: str | None, exclude: frozenset[str], request: QueryRequest) -> list[RouteCandidate]:
        """Agents that could take ``request`` now (``model`` or any ready model), with their load, their queue of
        this coordinator's jobs, speed, the predicted answer length on their model, and a warm prompt cache."""
        tokens = prompt_tokens(request.messages)
        now = time.monotonic()
        state = self._state()
        jobs = {agent: [self._progress(a, now) for a in attempts]
                for agent, attempts in self._ledger.jobs_by_agent().items()}
        mine = self._waiting_for.get(request.request_id)
        waiting = Counter(agent_id for request_id, (since, agent_id) in self._waiting_for.items()
                          if request_id != request.request_id and (mine is None or since < mine[0]))
        cached = self._conversations.cached(lookup_keys(request.messages, request.conversation),
                                            {agent_id: record.slots for agent_id, record in state.agents.items()},
                                            now) if self.settings.conversation_affinity else {}
        found = route_candidates(
            state, self.catalog, model=model, own_inflight=self._ledger.own_jobs,
            external=self.others.jobs(now), cooling=self._breaker.cooling(now), exclude=exclude,
            prompt_tokens=tokens, quarantined=self._trust.quarantined(now), jobs=jobs,
            expected_tokens=lambda name: self._expected_output_tokens(request, name), cached=cached,
            waiting=waiting,
        )
        if any(message.images for message in request.messages):  # images go only to models with vision
            found = [candidate for candidate in found if self.catalog.has_vision(candidate.model)]
        return found

    def report_load(self, agent_id: str, telemetry: Telemetry) -> None:
        """The agent's telemetry counts all its jobs; what exceeds ours came from another front end."""
        self.others.report(agent_id, telemetry.jobs_running + telemetry.jobs_queued,
                           self._ledger.own_jobs.get(agent_id, 0), telemetry.interval_s, time.monotonic())

    def saw_other_chunk(self, agent_id: str, result: Result) -> None:
        """A result chunk of no attempt of ours: another front end's job streams on that agent."""
        self.others.chunk(agent_id, result.request_id, result.done, time.monotonic())

    def _progress(self, attempt: Attempt, now: float) -> JobProgress:
        """A live job as the queue estimate sees it: expected length, seconds since its first token and tokens
        streamed so far (its text ÷ the agent's characters per token) — how fast the agent runs now."""
        if attempt.first_chunk_at is None:
            return JobProgress(attempt.expected_tokens)
        tokens = len(attempt.text) / self._chars_per_token.get(attempt.agent_id, DEFAULT_CHARS_PER_TOKEN)
        return JobProgress(attempt.expected_tokens, now - attempt.first_chunk_at, max(1.0, tokens))

    def _pinned_problem(self, agent_id: str, wanted: str | None) -> str:
        """Why the agent the caller named cannot take this query now, in words the caller can act on."""
        state = self._state()
        record = state.agents.get(agent_id)
        quarantined = self._trust.quarantined(time.monotonic())
        if record is None or not record.online:
            online = ", ".join(sorted(r.agent_id for r in state.online_agents())[:10]) or "none"
            what = "is not part of this cluster" if record is None else "is offline"
            return f"agent {agent_id!r} {what} (agents online: {online}); it was named, so no other agent answers"
        if agent_id in quarantined:
            return f"agent {agent_id!r} is in quarantine ({quarantined[agent_id]}); no other agent answers for it"
        if not record.reachable:
            return f"agent {agent_id!r} cannot reach its runtime; no other agent answers for it"
        models = ", ".join(offer.name for offer in record.offers()[:10]) or "none"
        if wanted is not None:
            return f"agent {agent_id!r} does not have model {wanted!r} (it has: {models})"
        state_note = record.model_state.state if record.model_state is not None else "no model"
        return f"agent {agent_id!r} has no model it can answer with now ({state_note}; models: {models})"

    def _others(self, agent_id: str) -> frozenset[str]:
        return frozenset(other for other in self._state().agents if other != agent_id)

    def _has_room(self, candidate: RouteCandidate) -> bool:
        return candidate.outstanding < candidate.slots + self.settings.agent_queue_limit

    def _coming(self, model: str | None, exclude: frozenset[str]) -> str | None:
        held = frozenset(self._trust.quarantined(time.monotonic()))
        return coming_soon(self._state(), model, exclude | held, self._assignment_pending())

    def settling(self) -> bool:
        """The coordinator has just connected: an agent (or model) it does not know yet may be a moment away."""
        return self._settling() > 0

    async def wait_for_news(self, timeout: float) -> None:
        """Until the cluster changes, or ``timeout``; while the agents' state is still arriving, no longer than the
        rest of that window (its end changes the answer with no message to wake anyone)."""
        settling = self._settling()
        await self._wakeup.wait(min(timeout, settling) if settling > 0 else timeout)

    def _no_agent_reason(self, model: str | None, exclude: frozenset[str]) -> str:
        return no_agent_reason(self._state(), self.catalog, model, exclude, self._trust.quarantined(time.monotonic()))

    async def _admit(self, run: Run, mode: str, exclude: frozenset[str], prefer_model: str | None,
                     prefer_continuing: bool = False) -> Route:
        """Choose an agent, waiting (bounded) for room or for a model that is still loading.

        ``prefer_continuing``: a partial answer exists, so agents whose runtime continues it come first.
        """
        wanted = None if mode in ROUTING_MODES else mode
        give_up = min(run.deadline, time.monotonic() + self.settings.admission_wait_s)
        try:
            return await self._admit_loop(run, mode, wanted, exclude, prefer_model, prefer_continuing, give_up)
        finally:
            self._waiting_for.pop(run.request_id, None)

    async def _admit_loop(self, run: Run, mode: str, wanted: str | None, exclude: frozenset[str],
                          prefer_model: str | None, prefer_continuing: bool, give_up: float) -> Route:
        pinned = run.request.agent
        while True:
            if run.cancel_reason:
                raise QueryError("cancelled", run.cancel_reason)
            candidates = self.candidates(wanted, exclude, run.request)
            if pinned is not None:
                candidates = [c for c in candidates if c.agent_id == pinned]
                if not candidates and self._coming(wanted, exclude | self._others(pinned)) is None \
                        and not self.settling():
                    raise QueryError("no_agent", self._pinned_problem(pinned, wanted))
            if run.request.tools and wanted is None:
                candidates = prefer_tools(candidates, self.catalog)
            if prefer_model is not None and any(same_model(c.model, prefer_model) for c in candidates):
                candidates = [c for c in candidates if same_model(c.model, prefer_model)]
            elif mode == RoutingMode.QUALITY and candidates:
                biggest = largest_model(candidates, self.catalog)
                candidates = [c for c in candidates if same_model(c.model, biggest)]
            if prefer_continuing and any(c.continues_prefill for c in candidates):
                candidates = [c for c in candidates if c.continues_prefill]
            open_ = [c for c in candidates if self._has_room(c)]
            now = time.monotonic()
            if open_ and self.router.policy == "expected_completion" and now < give_up:
                # Choose among every candidate, full ones too: when the best agent's queue is full, waiting for
                # it beats a slow agent with room (its estimate already counts the whole queue).
                route = self.router.choose(candidates, self._expected_output_tokens(run.request))
                if self._has_room(route.candidate):
                    return route
                # Queries that arrive later count this one in that agent's queue (it goes first).
                since = self._waiting_for.get(run.request_id, (now, ""))[0]
                self._waiting_for[run.request_id] = (since, route.candidate.agent_id)
            elif open_:
                return self.router.choose(open_, self._expected_output_tokens(run.request))
            waiting_for = None if candidates else self._coming(wanted, exclude)
            if not candidates and waiting_for is None and (now >= give_up or not self.settling()):
                raise QueryError("no_agent" if not exclude else "failed", self._no_agent_reason(wanted, exclude),
                                 partial_text="")
            if now >= give_up:
                if candidates:
                    load = sum(c.outstanding for c in candidates)
                    room = sum(c.slots + self.settings.agent_queue_limit for c in candidates)
                    raise QueryError("busy", (
                        f"cluster busy: all {len(candidates)} agent(s) that can serve "
                        f"{wanted or 'this query'} are full ({load} jobs for {room} places); "
                        f"waited {self.settings.admission_wait_s:g} s — try again shortly"))
                raise QueryError("no_agent", f"no agent can serve this yet: {waiting_for}; "
                                             f"waited {self.settings.admission_wait_s:g} s")
            await self.wait_for_news(give_up - now)

    # ------------------------------------------------------------------ jobs on agents

    def _send(self, run: Run, candidate: RouteCandidate, messages: list[ChatMessage], prefix: str) -> Attempt:
        """Publish the job; its deadline is the query's (a job that keeps producing tokens is never cut).

        Raises :class:`PrefixDoesNotFit` when ``prefix`` would put the job over the protocol's limits (the caller
        then starts the answer over), and a clear ``bad_request`` for a job that fits nowhere — never a
        validation error that would end the query as an "internal error".
        """
        now = time.monotonic()
        wire_id = run.next_wire_id()
        try:
            job = Job(request_id=wire_id, model=candidate.model, messages=messages, options=dict(run.request.options),
                      deadline=time.time() + (run.deadline - now), assistant_prefix=prefix or None,
                      attempt=run.counter - 1, tools=run.request.tools or None,
                      tool_choice=run.request.tool_choice if run.request.tools else None,
                      format=run.request.format, think=run.request.think, keep_alive=run.request.keep_alive)
        except ValidationError as error:
            if prefix:
                raise PrefixDoesNotFit(f"{len(prefix):,} characters of answer") from None
            raise QueryError("bad_request", f"the job cannot be sent: {error.errors()[0]['msg']}") from None
        payload = encode(job)
        if len(payload) > MAX_PAYLOAD_BYTES:
            if prefix:
                raise PrefixDoesNotFit(f"a job of {len(payload):,} bytes")
            raise QueryError("bad_request", f"the job is {len(payload):,} bytes; the limit is {MAX_PAYLOAD_BYTES:,}")
        # Out first, the bookkeeping after: no result can be read before this method returns (same loop).
        self._publish(self.topics.job(candidate.agent_id), payload)
        allowance, note = self._first_token_allowance(candidate, run.request)
        attempt = Attempt(wire_id, candidate.agent_id, candidate.model, now, run.deadline, prefix=prefix,
                          first_chunk_s=allowance, first_chunk_note=note, max_chars=self.settings.max_answer_chars,
                          solo=candidate.outstanding == 0, output_allowed=output_allowed(run.request),
                          claimed_tokens_per_s=claimed_speed(self._state().agents.get(candidate.agent_id),
                                                             candidate.model),
                          expected_tokens=self._expected_output_tokens(run.request, candidate.model),
                          shape=None if prefix else self._shape(run.request))
        self._conversations.job_sent(candidate.agent_id)
        self._ledger.add_attempt(run, attempt)
        self.metrics.jobs_in_flight.inc()
        logger.debug("job %s → %s (%s, %s)%s", wire_id, candidate.agent_id, candidate.model, candidate.availability,
                     f" continuing after {len(prefix)} chars" if prefix else "")
        return attempt

    def _first_token_allowance(self, candidate: RouteCandidate, request: QueryRequest) -> tuple[float | None, str]:
        """How long the first token may take on ``candidate``: the configured wait, plus room for the jobs queued
        ahead of this one on its runtime's slots and for loading a model from disk (``None``: no extra room)."""
        waiting = max(0, candidate.outstanding - candidate.slots + 1)
        queue_s = candidate.queue_wait_s(self._expected_output_tokens(request))
        load_s = candidate.ttft_s if candidate.availability == "local" else 0.0
        extra = FIRST_TOKEN_QUEUE_FACTOR * (queue_s + load_s)
        if extra <= 0:
            return None, ""
        parts = []
        if waiting:
            parts.append(f"{waiting} job(s) queued ahead on {candidate.slots} slot(s)")
        if load_s:
            parts.append(f"loading {candidate.model}")
        return self.settings.stall_first_token_s + extra, f" (allowing for {' and '.join(parts)})"

    def _end_attempt(self, attempt: Attempt, cancel_reason: str | None = None) -> None:
        """Forget an attempt; tell the agent to stop if it has not finished; judge a finished answer."""
        if not self._ledger.remove_attempt(attempt):
            return
        self.metrics.jobs_in_flight.dec()
        if attempt.error_code == "too_long":
            cancel_reason = attempt.error  # we stopped listening; the agent is still generating
        if (not attempt.done or attempt.error_code == "too_long") and cancel_reason is not None:
            self._publish(self.topics.cancel(attempt.agent_id), Cancel(request_id=attempt.wire_id,
                                                                       reason=cancel_reason))
        if attempt.done and attempt.error is None:
            self._judge(attempt)
        self._wakeup.notify()

    def _judge(self, attempt: Attempt) -> None:
        """Check a finished answer against what we saw of it: learn our own measurement of a good one; reject
        (``attempt.rejected``) and strike an empty or lying one (:func:`broker.scheduling.trust.judge`)."""
        now = time.monotonic()
        verdict = judge(Delivery(  # a call is an answer: its name and arguments count as what was delivered
            text=attempt.text or "".join(call.name + call.arguments for call in attempt.tool_calls),
            continued=bool(attempt.prefix), output_allowed=attempt.output_allowed,
            sent_at=attempt.started_at, first_at=attempt.first_chunk_at, done_at=attempt.done_at or now,
            stats=attempt.stats, solo=attempt.solo, claimed_tokens_per_s=attempt.claimed_tokens_per_s))
        if verdict.strike is not None:
            self._strike(attempt.agent_id, verdict.strike)
        attempt.strike_if_answered = verdict.strike_if_answered
        if verdict.failure is not None:
            attempt.rejected = verdict.failure
            return
        self._breaker.record_success(attempt.agent_id)
        self._trust.good(attempt.agent_id, now)
        measurement = verdict.measurement
        queue_s = attempt.stats.queue_s if attempt.stats is not None else None
        self._answer_measured(AnswerMeasured(attempt.agent_id, attempt.model, measurement.as_stats(queue_s)))
        if measurement.tokens:
            if attempt.text and measurement.tokens >= 8:
                ratio = len(attempt.text) / measurement.tokens
                known = self._chars_per_token.get(attempt.agent_id, ratio)
                self._chars_per_token[attempt.agent_id] = known + CHARS_PER_TOKEN_SMOOTHING * (ratio - known)
            self.metrics.output_tokens.labels(self._model_label(attempt.model)).inc(measurement.tokens)
            self._output_tokens += OUTPUT_TOKENS_SMOOTHING * (measurement.tokens - self._output_tokens)
            if attempt.shape is not None:  # a whole answer (a continuation's length says little about questions)
                self._lengths.observe(attempt.model, attempt.shape, measurement.tokens)

    def _answered_by(self, answered: Attempt, attempts: list[Attempt]) -> None:
        """Another agent answered the question ``attempts`` gave empty answers to: those were the agents' doing."""
        for attempt in attempts:
            if attempt.strike_if_answered is not None and attempt.agent_id != answered.agent_id:
                self._strike(attempt.agent_id, f"{attempt.strike_if_answered}; {answered.agent_id} answered the "
                                               f"same question")
                attempt.strike_if_answered = None

    def _strike(self, agent_id: str, reason: str) -> None:
        self.metrics.strikes.inc()
        length = self._trust.strike(agent_id, reason, time.monotonic())
        logger.warning("agent %s: strike (%s)", agent_id, reason)
        if length is not None:
            self.metrics.quarantines.inc()
            logger.warning("agent %s is in quarantine for %g s (no jobs): %s", agent_id, length,
                           self._trust.standing(agent_id, time.monotonic()).reason)

    def _model_label(self, model: str) -> str:
        """Catalog models by name, others as one value: an agent cannot grow the metric's series at will."""
        entry = self.catalog.model(model)
        return entry.name if entry is not None else "other"

    async def _follow(self, run: Run, attempt: Attempt, on_text: Callable[[str], None]) -> str | None:
        """Stream one attempt to its end; return ``None`` when it finished, else why it failed."""
        first, between = self.settings.stall_first_token_s, self.settings.stall_between_chunks_s
        try:
            while True:
                now = time.monotonic()
                if (expired := run.deadline_passed(now)) is not None:
                    return expired
                stalled = attempt.stall_reason(now, first, between)
                if stalled is not None:
                    return f"stalled: {stalled}"
                signal = await run.next_signal(attempt.next_check(first, between))
                if signal is None:
                    continue
                if isinstance(signal, CancelSignal):
                    raise QueryError("cancelled", signal.reason, partial_text=attempt.text)
                if isinstance(signal, GoneSignal):
                    if signal.wire_id == attempt.wire_id:
                        return signal.reason
                    continue
                if signal.request_id == attempt.wire_id:
                    text = attempt.accept(signal, time.monotonic())
                    if text:
                        run.text_arrived(time.monotonic())
                        on_text(text)
                    if attempt.done:
                        return None
        finally:
            if not attempt.done:
                self._end_attempt(attempt, cancel_reason=run.cancel_reason or "abandoned by the coordinator")
            else:
                self._end_attempt(attempt)

    # ------------------------------------------------------------------ single route with failover

    async def _answer(self, run: Run, messages: list[ChatMessage], mode: str, *, announce: bool) -> _Answer:
        """One answer from one agent at a time; on failure another agent continues the partial text — only if its
        runtime continues a prefill, and the text still fits in a job — or starts the answer over
        (:class:`AnswerRestarted`), never splicing two. An answer judged unusable (empty, lying about its speed)
        is a failure like any other; text it streamed is voided by a restart."""
        exclude: set[str] = set()
        attempts: list[Attempt] = []
        segment: list[Attempt] = []  # the attempts whose text the caller has now (since the last restart)
        void = False  # the caller saw text of a rejected answer: the next attempt starts the answer over
        reasons: list[str] = []
        while True:
            previous = attempts[-1] if attempts else None
            shown = "".join(a.text for a in segment)
            partial = "" if void else shown
            # With tools the partial output may be the start of a call (runtimes parse calls from whole output):
            # the answer restarts rather than splicing a call together from two runtimes.
            tools = bool(run.request.tools)
            try:
                route = await self._admit(run, mode, frozenset(exclude), previous.model if previous else None,
                                          prefer_continuing=bool(partial) and not tools)
            except QueryError as error:
                if previous is not None and error.code in ("no_agent", "failed", "busy"):
                    raise QueryError(failure_code(attempts), f"{'; '.join(reasons)}; and {error.message}",
                                     partial_text=partial) from None
                error.partial_text = partial
                raise
            restart = void or (bool(partial) and (tools or not route.candidate.continues_prefill))
            try:
                attempt = self._send(run, route.candidate, messages, "" if restart else partial)
            except PrefixDoesNotFit as error:
                logger.info("query %s: the partial answer does not fit in a job (%s); restarting it", run.request_id,
                            error)
                restart = True
                attempt = self._send(run, route.candidate, messages, "")
            if restart:
                segment, void = [], False
            attempts.append(attempt)
            segment.append(attempt)
            if previous is not None and restart:
                logger.info("query %s: %s cannot continue the partial answer; restarting it (%d chars discarded)",
                            run.request_id, attempt.agent_id, len(shown))
                self.metrics.answer_restarts.inc()
                run.emit(AnswerRestarted(run.request_id, previous.agent_id, attempt.agent_id, attempt.model,
                                         reasons[-1], len(shown)))
            elif previous is not None:
                run.emit(AgentSwitched(run.request_id, previous.agent_id, attempt.agent_id, attempt.model,
                                       reasons[-1]))
            elif announce:
                pinned = run.request.agent is not None
                reason = f"pinned to {attempt.agent_id} by the caller" if pinned else route.reason
                run.emit(QueryStarted(run.request_id, [attempt.agent_id], [attempt.model], run.request.mode,
                                      reason, affinity=route.affinity, pinned=pinned))
            problem = await self._follow(run, attempt, lambda text, a=attempt: run.emit(
                TextDelta(run.request_id, text, a.agent_id, a.model)))
            if attempt.rejected is not None:
                problem = attempt.rejected
                if attempt.text:
                    void = True
                else:
                    segment.remove(attempt)  # nothing shown: the answer so far stands
            partial = "" if void else "".join(a.text for a in segment)
            if problem is None and attempt.error is None and run.request.check_answer is not None \
                    and not any(a.tool_calls for a in segment):
                invalid = run.request.check_answer(partial)
                if invalid is not None and attempt.stats is not None and attempt.stats.finish_reason == "length":
                    # the token limit cut the answer short: another agent would be cut at the same place
                    raise QueryError("invalid_output", f"{attempt.agent_id}: {invalid}; the answer reached the token "
                                     "limit (max_tokens / num_predict) before it was complete: raise the limit")
                if invalid is not None:  # the runtime ignored the format (or broke it): another answers afresh
                    problem, attempt.error_code = f"invalid output: {invalid}", "invalid_output"
                    void, partial = bool(partial), ""
            if problem is None and attempt.error is None:
                calls = [call for a in segment for call in a.tool_calls]
                if partial.strip():
                    self._answered_by(attempt, attempts)
                    self._conversations.remember(
                        remember_keys(messages, partial, run.request.conversation), attempt.agent_id,
                        prompt_tokens(messages, partial), self._ledger.own_jobs.get(attempt.agent_id, 0),
                        time.monotonic())
                return _Answer(partial, [a.agent_id for a in attempts], [a.model for a in attempts],
                               combined_stats(run, segment, attempts), len(attempts) - 1, calls)
            if (expired := run.deadline_passed(time.monotonic())) is not None:
                earlier = f" (earlier: {'; '.join(reasons)})" if reasons else ""
                got = f" after {len(partial):,} characters from {attempt.agent_id}" if partial else \
                    f" while waiting for {attempt.agent_id}'s first token"
                raise QueryError("timeout", f"{expired}{got}{earlier}", partial_text=partial)
            reason = problem or f"{attempt.error_code or 'error'}: {attempt.error}"
            if attempt.error_code == "bad_job" and TOOLS_REFUSAL in (attempt.error or ""):
                # the runtime's own refusal, word for word, as the runtime would answer (docs/api.md "Tools")
                raise QueryError("bad_request", attempt.error or "", partial_text=partial)
            if attempt.error_code in NOT_THE_AGENTS_FAULT:
                raise QueryError("bad_request" if attempt.error_code == "bad_job" else "failed",
                                 f"{attempt.agent_id} refused the job: {attempt.error}", partial_text=partial)
            if attempt.error_code == "too_long":  # most likely the question's doing: another agent would go on too
                earlier = f" (earlier: {'; '.join(reasons)})" if reasons else ""
                raise QueryError("failed", f"{attempt.agent_id}: {attempt.error}; ask for a shorter answer{earlier}",
                                 partial_text=partial)
            if attempt.error_code not in ("busy", "invalid_output") \
                    and self._breaker.record_failure(attempt.agent_id, time.monotonic()):
                logger.warning("agent %s cools down for %g s after %d failures in a row", attempt.agent_id,
                               self.settings.cooldown_s, self.settings.breaker_failures)
            if run.request.agent is None:  # a named agent gets its own retries, never another agent
                exclude.add(attempt.agent_id)
            reasons.append(f"{attempt.agent_id}: {reason}")
            logger.warning("query %s: %s failed (%s) after %d chars", run.request_id, attempt.agent_id, reason,
                           len(attempt.text))
            if len(attempts) > self.settings.max_failovers:
                raise QueryError(failure_code(attempts),
                                 f"gave up after {len(attempts)} attempt(s): {'; '.join(reasons)}",
                                 partial_text=partial)
            self.metrics.failovers.labels(failure_kind(reason)).inc()

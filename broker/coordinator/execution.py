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
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.coordinator.attempts import Attempt, CancelSignal, GoneSignal, InFlight, Run
from broker.coordinator.contract import (
    AGGREGATIONS,
    ROUTING_MODES,
    AgentAnswer,
    AgentDelta,
    AgentFinished,
    AgentSwitched,
    Aggregation,
    AnswerRestarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    RoutingMode,
    TextDelta,
)
from broker.coordinator.metrics import CoordinatorMetrics, mode_label
from broker.coordinator.settings import CoordinatorSettings
from broker.coordinator.wakeup import Wakeup
from broker.protocol import (
    MAX_PAYLOAD_BYTES,
    Cancel,
    ChatMessage,
    Job,
    Message,
    ResultStats,
    Topics,
    encode,
    is_valid_agent_id,
)
from broker.scheduling import aggregation
from broker.scheduling.catalog import Catalog
from broker.scheduling.names import same_model
from broker.scheduling.registry import AnswerMeasured, ClusterState
from broker.scheduling.routing import (
    CircuitBreaker,
    Route,
    RouteCandidate,
    Router,
    coming_soon,
    largest_model,
    no_agent_reason,
    one_per_agent,
    route_candidates,
)

logger = logging.getLogger(__name__)

OUTPUT_TOKENS_SMOOTHING = 0.1
"""Weight of the newest answer in the moving average of answer length."""
NOT_THE_AGENTS_FAULT = {"bad_job", "context_too_long"}
"""Error codes that another agent would hit too: the query fails at once."""
FIRST_TOKEN_QUEUE_FACTOR = 2.0
"""The first-token allowance grows by this many times the expected wait behind queued jobs (and a model load):
estimates are rough, and a queued job that is cut for being queued is lost work."""

Publish = Callable[[str, bytes | Message], None]
"""Publish a QoS 1, non-retained message (dropped while the coordinator has no connection)."""


class QueryError(Exception):
    """Ends a query with :class:`QueryFailed`."""

    def __init__(self, code: str, message: str, partial_text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.partial_text = partial_text


@dataclass
class _Answer:
    text: str
    agents: list[str]
    models: list[str]
    stats: ResultStats | None
    failovers: int


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
        wakeup: Wakeup,
        answer_measured: Callable[[AnswerMeasured], None],
        assignment_pending: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.topics = topics
        self.metrics = metrics
        self.router = Router(settings.routing_policy)
        self._state = state
        self._publish = publish
        self._ledger = ledger
        self._breaker = breaker
        self._wakeup = wakeup
        self._answer_measured = answer_measured
        self._assignment_pending = assignment_pending
        self._output_tokens = float(settings.expected_output_tokens)

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
                emit(await self._fan_out(run))
            else:
                answer = await self._answer(run, list(request.messages), mode, announce=True)
                latency = time.monotonic() - run.started_at
                emit(QueryFinished(request.request_id, answer.text, answer.agents, answer.models, mode,
                                   stats=answer.stats, failovers=answer.failovers, latency_s=round(latency, 3)))
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
        size = sum(len(message.content) for message in request.messages)
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

    def _expected_output_tokens(self, request: QueryRequest) -> float:
        limit = request.options.get("num_predict") or request.options.get("max_tokens")
        if isinstance(limit, (int, float)) and limit > 0:
            return min(float(limit), self._output_tokens)
        return self._output_tokens

    def candidates(self, model: str | None, exclude: frozenset[str], request: QueryRequest) -> list[RouteCandidate]:
        """Agents that could take ``request`` now (``model`` or any ready model), with their load and speed."""
        prompt_tokens = sum(len(message.content) for message in request.messages) // 4
        return route_candidates(
            self._state(), self.catalog, model=model, own_inflight=self._ledger.own_jobs,
            external=self._ledger.external_jobs, cooling=self._breaker.cooling(time.monotonic()), exclude=exclude,
            prompt_tokens=prompt_tokens,
        )

    def _has_room(self, candidate: RouteCandidate) -> bool:
        return candidate.outstanding < candidate.slots + self.settings.agent_queue_limit

    def _coming(self, model: str | None, exclude: frozenset[str]) -> str | None:
        return coming_soon(self._state(), model, exclude, self._assignment_pending())

    async def _admit(self, run: Run, mode: str, exclude: frozenset[str], prefer_model: str | None,
                     prefer_continuing: bool = False) -> Route:
        """Choose an agent, waiting (bounded) for room or for a model that is still loading.

        ``prefer_continuing``: a partial answer exists, so agents whose runtime continues it come first.
        """
        wanted = None if mode in ROUTING_MODES else mode
        give_up = min(run.deadline, time.monotonic() + self.settings.admission_wait_s)
        while True:
            if run.cancel_reason:
                raise QueryError("cancelled", run.cancel_reason)
            candidates = self.candidates(wanted, exclude, run.request)
            if prefer_model is not None and any(same_model(c.model, prefer_model) for c in candidates):
                candidates = [c for c in candidates if same_model(c.model, prefer_model)]
            elif mode == RoutingMode.QUALITY and candidates:
                biggest = largest_model(candidates, self.catalog)
                candidates = [c for c in candidates if same_model(c.model, biggest)]
            open_ = [c for c in candidates if self._has_room(c)]
            if prefer_continuing and any(c.continues_prefill for c in open_):
                open_ = [c for c in open_ if c.continues_prefill]
            if open_:
                return self.router.choose(open_, self._expected_output_tokens(run.request))
            waiting_for = None if candidates else self._coming(wanted, exclude)
            now = time.monotonic()
            if not candidates and waiting_for is None:
                raise QueryError("no_agent" if not exclude else "failed",
                                 no_agent_reason(self._state(), self.catalog, wanted, exclude), partial_text="")
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
            await self._wakeup.wait(give_up - now)

    async def _fan_out_targets(self, run: Run) -> list[RouteCandidate]:
        """Every agent with a ready model, waiting (bounded) while models are still on their way."""
        give_up = min(run.deadline, time.monotonic() + self.settings.admission_wait_s)
        while True:
            candidates = one_per_agent(self.candidates(None, frozenset(), run.request))
            if candidates:
                return candidates
            coming = self._coming(None, frozenset())
            if coming is None:
                raise QueryError("no_agent", no_agent_reason(self._state(), self.catalog, None, frozenset()))
            now = time.monotonic()
            if now >= give_up:
                raise QueryError("no_agent", f"no agent can serve this yet: {coming}; "
                                             f"waited {self.settings.admission_wait_s:g} s")
            await self._wakeup.wait(give_up - now)
            if run.cancel_reason:
                raise QueryError("cancelled", run.cancel_reason)

    # ------------------------------------------------------------------ jobs on agents

    def _send(self, run: Run, candidate: RouteCandidate, messages: list[ChatMessage], prefix: str) -> Attempt:
        """Publish the job; its deadline is the query's (a job that keeps producing tokens is never cut)."""
        now = time.monotonic()
        wire_id = run.next_wire_id()
        job = Job(request_id=wire_id, model=candidate.model, messages=messages, options=dict(run.request.options),
                  deadline=time.time() + (run.deadline - now), assistant_prefix=prefix or None,
                  attempt=run.counter - 1)
        payload = encode(job)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise QueryError("bad_request", f"the job is {len(payload):,} bytes; the limit is {MAX_PAYLOAD_BYTES:,}")
        allowance, note = self._first_token_allowance(candidate, run.request)
        attempt = Attempt(wire_id, candidate.agent_id, candidate.model, now, run.deadline, prefix=prefix,
                          first_chunk_s=allowance, first_chunk_note=note)
        self._ledger.add_attempt(run, attempt)
        self.metrics.jobs_in_flight.inc()
        self._publish(self.topics.job(candidate.agent_id), payload)
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
        """Forget an attempt; tell the agent to stop if it has not finished; learn from a finished answer."""
        if not self._ledger.remove_attempt(attempt):
            return
        self.metrics.jobs_in_flight.dec()
        if not attempt.done and cancel_reason is not None:
            self._publish(self.topics.cancel(attempt.agent_id), Cancel(request_id=attempt.wire_id,
                                                                       reason=cancel_reason))
        if attempt.done and attempt.error is None:
            self._breaker.record_success(attempt.agent_id)
            if attempt.stats is not None:
                self._answer_measured(AnswerMeasured(attempt.agent_id, attempt.model, attempt.stats))
                if attempt.stats.output_tokens:
                    self.metrics.output_tokens.labels(attempt.model).inc(attempt.stats.output_tokens)
                    self._output_tokens += OUTPUT_TOKENS_SMOOTHING * (attempt.stats.output_tokens - self._output_tokens)
        self._wakeup.notify()

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
        runtime continues a prefill — or starts the answer over (:class:`AnswerRestarted`), never splicing two."""
        exclude: set[str] = set()
        attempts: list[Attempt] = []
        segment: list[Attempt] = []  # the attempts whose text is the answer now (since the last restart)
        reasons: list[str] = []
        while True:
            previous = attempts[-1] if attempts else None
            partial = "".join(a.text for a in segment)
            try:
                route = await self._admit(run, mode, frozenset(exclude), previous.model if previous else None,
                                          prefer_continuing=bool(partial))
            except QueryError as error:
                if previous is not None and error.code in ("no_agent", "failed", "busy"):
                    raise QueryError("failed", f"{'; '.join(reasons)}; and {error.message}",
                                     partial_text=partial) from None
                error.partial_text = partial
                raise
            restart = bool(partial) and not route.candidate.continues_prefill
            if restart:
                segment = []
            attempt = self._send(run, route.candidate, messages, "" if restart else partial)
            attempts.append(attempt)
            segment.append(attempt)
            if previous is not None and restart:
                logger.info("query %s: %s cannot continue a partial answer; restarting it (%d chars discarded)",
                            run.request_id, attempt.agent_id, len(partial))
                self.metrics.answer_restarts.inc()
                run.emit(AnswerRestarted(run.request_id, previous.agent_id, attempt.agent_id, attempt.model,
                                         reasons[-1], len(partial)))
            elif previous is not None:
                run.emit(AgentSwitched(run.request_id, previous.agent_id, attempt.agent_id, attempt.model,
                                       reasons[-1]))
            elif announce:
                run.emit(QueryStarted(run.request_id, [attempt.agent_id], [attempt.model], run.request.mode,
                                      route.reason))
            problem = await self._follow(run, attempt, lambda text, a=attempt: run.emit(
                TextDelta(run.request_id, text, a.agent_id, a.model)))
            partial = "".join(a.text for a in segment)
            if problem is None and attempt.error is None:
                return _Answer(partial, [a.agent_id for a in attempts], [a.model for a in attempts],
                               combined_stats(run, segment, attempts), len(attempts) - 1)
            if (expired := run.deadline_passed(time.monotonic())) is not None:
                earlier = f" (earlier: {'; '.join(reasons)})" if reasons else ""
                got = f" after {len(partial):,} characters from {attempt.agent_id}" if partial else \
                    f" while waiting for {attempt.agent_id}'s first token"
                raise QueryError("timeout", f"{expired}{got}{earlier}", partial_text=partial)
            reason = problem or f"{attempt.error_code or 'error'}: {attempt.error}"
            if attempt.error_code in NOT_THE_AGENTS_FAULT:
                raise QueryError("bad_request" if attempt.error_code == "bad_job" else "failed",
                                 f"{attempt.agent_id} refused the job: {attempt.error}", partial_text=partial)
            if attempt.error_code != "busy" and self._breaker.record_failure(attempt.agent_id, time.monotonic()):
                logger.warning("agent %s cools down for %g s after %d failures in a row", attempt.agent_id,
                               self.settings.cooldown_s, self.settings.breaker_failures)
            exclude.add(attempt.agent_id)
            reasons.append(f"{attempt.agent_id}: {reason}")
            logger.warning("query %s: %s failed (%s) after %d chars", run.request_id, attempt.agent_id, reason,
                           len(attempt.text))
            if len(attempts) > self.settings.max_failovers:
                raise QueryError("failed", f"gave up after {len(attempts)} attempt(s): {'; '.join(reasons)}",
                                 partial_text=partial)
            self.metrics.failovers.labels(failure_kind(reason)).inc()

    # ------------------------------------------------------------------ fan-out

    async def _fan_out(self, run: Run) -> QueryFinished:
        request = run.request
        targets = await self._fan_out_targets(run)
        attempts = [self._send(run, candidate, list(request.messages), "") for candidate in targets]
        run.emit(QueryStarted(run.request_id, [a.agent_id for a in attempts], [a.model for a in attempts],
                              RoutingMode.ALL.value,
                              f"fan-out to {len(attempts)} agent(s), then {request.aggregation}"))
        answers: dict[str, AgentAnswer] = {}
        simulated = {record.agent_id for record in self._state().agents.values() if record.simulated}
        first, between = self.settings.stall_first_token_s, self.settings.stall_between_chunks_s

        def finish(attempt: Attempt, error: str | None) -> None:
            answer = AgentAnswer(attempt.agent_id, attempt.model, attempt.text, attempt.stats, error,
                                 attempt.agent_id in simulated)
            answers[attempt.wire_id] = answer
            run.emit(AgentFinished(run.request_id, answer))
            cancel = None if attempt.done else (error or "fan-out ended")
            self._end_attempt(attempt, cancel_reason=cancel)

        winner: Attempt | None = None
        while len(answers) < len(attempts):
            now = time.monotonic()
            pending = [a for a in attempts if a.wire_id not in answers]
            if (expired := run.deadline_passed(now)) is not None:
                for attempt in pending:
                    finish(attempt, f"no complete answer: {expired}")
                break
            for attempt in pending:
                stalled = attempt.stall_reason(now, first, between)
                if stalled is not None:
                    finish(attempt, f"stalled: {stalled}")
            pending = [a for a in attempts if a.wire_id not in answers]
            if not pending:
                break
            signal = await run.next_signal(min([run.deadline] + [a.next_check(first, between) for a in pending]))
            if signal is None:
                continue
            if isinstance(signal, CancelSignal):
                raise QueryError("cancelled", signal.reason)
            wire_id = signal.wire_id if isinstance(signal, GoneSignal) else signal.request_id
            attempt = self._ledger.attempt_of(run, wire_id)
            if attempt is None or attempt.wire_id in answers:
                continue
            if isinstance(signal, GoneSignal):
                finish(attempt, signal.reason)
                continue
            text = attempt.accept(signal, time.monotonic())
            if text:
                run.text_arrived(time.monotonic())
                run.emit(AgentDelta(run.request_id, attempt.agent_id, attempt.model, text))
            if attempt.done:
                finish(attempt, f"{attempt.error_code or 'error'}: {attempt.error}" if attempt.error else None)
                if attempt.error is None and request.aggregation == Aggregation.FIRST and winner is None:
                    winner = attempt
                    for other in [a for a in attempts if a.wire_id not in answers]:
                        finish(other, "cancelled: another answer came first")
        ordered = [answers[a.wire_id] for a in attempts]
        return await self._combine(run, ordered, winner)

    async def _combine(self, run: Run, answers: list[AgentAnswer], winner: Attempt | None) -> QueryFinished:
        request = run.request
        complete = [answer for answer in answers if answer.error is None and answer.text.strip()]
        latency = round(time.monotonic() - run.started_at, 3)
        agents = [answer.agent_id for answer in answers]
        models = [answer.model for answer in answers]
        if not complete:
            problems = "; ".join(f"{answer.agent_id}: {answer.error or 'empty answer'}" for answer in answers)
            raise QueryError("failed", f"no agent answered ({problems})",
                             partial_text=max((a.text for a in answers), key=len, default=""))
        agreement = aggregation.consensus([answer.text for answer in complete])
        text = complete[agreement.index].text
        combined_by = f"{complete[agreement.index].agent_id} / {complete[agreement.index].model} (consensus)"
        method = request.aggregation
        if method == Aggregation.FIRST and winner is not None:
            first_answer = next(a for a in complete if a.agent_id == winner.agent_id)
            text, combined_by = first_answer.text, f"{first_answer.agent_id} / {first_answer.model} (first)"
        elif method == Aggregation.SYNTHESIZE:
            labelled = [(f"{a.agent_id} / {a.model}", a.text) for a in complete]
            messages = aggregation.synthesis_messages(request.messages, labelled)
            try:
                synthesis = await self._answer(run, messages, RoutingMode.QUALITY.value, announce=False)
                text = synthesis.text
                combined_by = f"{synthesis.agents[-1]} / {synthesis.models[-1]} (synthesis)"
            except QueryError as error:
                if error.code == "cancelled":
                    raise
                logger.warning("query %s: synthesis failed (%s); using the consensus answer", run.request_id,
                               error.message)
                combined_by += f"; synthesis failed: {error.message}"
        return QueryFinished(run.request_id, text, agents, models, RoutingMode.ALL.value, answers=answers,
                             aggregation=method, agreement=agreement.agreement, latency_s=latency,
                             combined_by=combined_by)


def combined_stats(run: Run, segment: list[Attempt], attempts: list[Attempt] | None = None) -> ResultStats:
    """Stats of an answer that may span several agents.

    ``segment``: the attempts whose text is the answer (after a restart, only those since): their output tokens
    add up, the prompt is the first one's, the finish reason is the last one's (the runtime's own), and tokens
    count as the agent's when any part was counted by an agent. Times are the caller's; ``queue_s`` adds up what
    every attempt (``attempts``, default ``segment``) waited for a slot.
    """
    every = attempts if attempts is not None else segment
    stats = [a.stats for a in segment if a.stats is not None]
    outputs = [s.output_tokens for s in stats if s.output_tokens is not None]
    counted_by = {s.tokens_counted_by for s in stats if s.tokens_counted_by is not None}
    queued = [a.stats.queue_s for a in every if a.stats is not None and a.stats.queue_s is not None]
    last = segment[-1].stats if segment else None
    return ResultStats(
        prompt_tokens=next((s.prompt_tokens for s in stats if s.prompt_tokens is not None), None),
        output_tokens=sum(outputs) if outputs else None,
        ttft_s=round(run.first_text_at - run.started_at, 4) if run.first_text_at else None,
        tokens_per_s=last.tokens_per_s if last is not None else None,
        total_s=round(time.monotonic() - run.started_at, 4),
        queue_s=round(sum(queued), 4) if queued else None,
        finish_reason=last.finish_reason if last is not None else None,
        tokens_counted_by="agent" if "agent" in counted_by else ("runtime" if counted_by else None),
    )


def failure_kind(reason: str) -> str:
    """The metrics label of a failover reason."""
    for kind in ("stalled", "went away", "deadline", "busy", "truncated"):
        if kind in reason:
            return kind.replace("went away", "offline")
    return "error"

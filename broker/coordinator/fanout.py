"""Fan-out (mode ``all``): the query goes to one agent per ready model-holder, every answer is kept, and the
answers are combined (consensus, first, or a synthesis by the strongest model).

A part of :class:`~broker.coordinator.execution.QueryExecutor`, kept apart because it is a concern of its own:
it uses the executor's building blocks (send a job, end an attempt, one single-route answer for a synthesis)
and adds the waiting for many answers at once and their aggregation.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from broker.coordinator.attempts import Attempt, CancelSignal, GoneSignal, Run
from broker.coordinator.contract import (
    AgentAnswer,
    AgentDelta,
    AgentFinished,
    Aggregation,
    QueryFinished,
    QueryStarted,
    RoutingMode,
)
from broker.coordinator.errors import QueryError
from broker.scheduling import aggregation
from broker.scheduling.routing import RouteCandidate, one_per_agent

if TYPE_CHECKING:
    from broker.coordinator.execution import QueryExecutor

logger = logging.getLogger(__name__)


class FanOut:
    """Runs one fan-out query for the executor that owns it."""

    def __init__(self, executor: QueryExecutor) -> None:
        self.executor = executor

    async def _targets(self, run: Run) -> list[RouteCandidate]:
        """Every agent with a ready model, waiting (bounded) while models are still on their way."""
        give_up = min(run.deadline, time.monotonic() + self.executor.settings.admission_wait_s)
        pinned = run.request.agent
        others = self.executor._others(pinned) if pinned is not None else frozenset()
        while True:
            candidates = one_per_agent(self.executor.candidates(None, others, run.request))
            if candidates:
                return candidates
            coming = self.executor._coming(None, others)
            now = time.monotonic()
            if coming is None and not (self.executor.settling() and now < give_up):  # else: state on its way
                if pinned is not None:
                    raise QueryError("no_agent", self.executor._pinned_problem(pinned, None))
                raise QueryError("no_agent", self.executor._no_agent_reason(None, frozenset()))
            if now >= give_up:
                raise QueryError("no_agent", f"no agent can serve this yet: {coming}; "
                                             f"waited {self.executor.settings.admission_wait_s:g} s")
            await self.executor.wait_for_news(give_up - now)
            if run.cancel_reason:
                raise QueryError("cancelled", run.cancel_reason)

    async def run(self, run: Run) -> QueryFinished:
        request = run.request
        targets = await self._targets(run)
        attempts = [self.executor._send(run, candidate, list(request.messages), "") for candidate in targets]
        run.emit(QueryStarted(run.request_id, [a.agent_id for a in attempts], [a.model for a in attempts],
                              RoutingMode.ALL.value,
                              f"fan-out to {len(attempts)} agent(s), then {request.aggregation}"))
        answers: dict[str, AgentAnswer] = {}
        simulated = {record.agent_id for record in self.executor._state().agents.values() if record.simulated}
        first, between = self.executor.settings.stall_first_token_s, self.executor.settings.stall_between_chunks_s

        def finish(attempt: Attempt, error: str | None) -> None:
            cancel = None if attempt.done else (error or "fan-out ended")
            self.executor._end_attempt(attempt, cancel_reason=cancel)  # judges a finished answer (attempt.rejected)
            answer = AgentAnswer(attempt.agent_id, attempt.model, attempt.text, attempt.stats,
                                 error or attempt.rejected, attempt.agent_id in simulated)
            answers[attempt.wire_id] = answer
            run.emit(AgentFinished(run.request_id, answer))

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
            attempt = self.executor._ledger.attempt_of(run, wire_id)
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
                if attempt.error is None and attempt.rejected is None and request.aggregation == Aggregation.FIRST \
                        and winner is None:
                    winner = attempt
                    for other in [a for a in attempts if a.wire_id not in answers]:
                        finish(other, "cancelled: another answer came first")
        answered = next((a for a in attempts if answers[a.wire_id].error is None and a.text.strip()), None)
        if answered is not None:
            self.executor._answered_by(answered, attempts)
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
                synthesis = await self.executor._answer(run, messages, RoutingMode.QUALITY.value, announce=False)
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

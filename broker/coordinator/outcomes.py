"""What an answer's attempts add up to: its stats, its failure code, the metrics label of a failover, and what
the router may believe about an agent before measuring it (kept apart from the executor that runs them)."""

from __future__ import annotations

import time

from broker.coordinator.attempts import Attempt, Run
from broker.coordinator.contract import QueryRequest
from broker.protocol import ResultStats
from broker.scheduling.names import same_model
from broker.scheduling.registry import AgentRecord


def failure_code(attempts: list[Attempt]) -> str:
    """``truncated`` when every runtime tried cut its answer short (the caller may want to retry alone or ask
    the runtime's operator); ``invalid_output`` when the last answer did not fit the requested format; ``failed``
    for any other mix of failures."""
    if attempts and all(attempt.error_code == "truncated" for attempt in attempts):
        return "truncated"
    if attempts and attempts[-1].error_code == "invalid_output":  # the last answer did not fit the format asked for
        return "invalid_output"
    return "failed"


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
    for kind in ("stalled", "went away", "deadline", "busy", "truncated", "never arrived", "empty answer",
                 "claimed"):
        if kind in reason:
            return {"went away": "offline", "never arrived": "gap", "empty answer": "empty",
                    "claimed": "implausible"}.get(kind, kind)
    return "error"


def output_allowed(request: QueryRequest) -> bool:
    """Whether the question lets the model say anything (``num_predict`` / ``max_tokens`` of 0 do not)."""
    for key in ("num_predict", "max_tokens", "max_completion_tokens"):
        limit = request.options.get(key)
        if isinstance(limit, int | float) and not isinstance(limit, bool) and limit == 0:
            return False
    return True


def claimed_speed(record: AgentRecord | None, model: str) -> float | None:
    """The fastest speed the agent claims for ``model``: its telemetry (about the model it serves) or its
    benchmark (when measured on that model). What the router believed before measuring it; checked later."""
    if record is None:
        return None
    claims = []
    telemetry = record.telemetry
    if telemetry is not None and telemetry.tokens_per_s and same_model(record.ready_model, model):
        claims.append(telemetry.tokens_per_s)
    benchmark = record.hardware.benchmark if record.hardware is not None else None
    if benchmark is not None and benchmark.tokens_per_s and same_model(benchmark.model, model):
        claims.append(benchmark.tokens_per_s)
    return max(claims) if claims else None

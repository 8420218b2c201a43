"""What an agent is expected to do, from the best evidence at hand.

Evidence, best first: answers the coordinator itself observed (per model),
the agent's telemetry (recent tokens/s and time to first token of the model
it serves), its hardware benchmark, and last the bandwidth-based prior from
:mod:`broker.scheduling.scoring` for an agent nobody has measured yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.scheduling.catalog import Catalog, CatalogModel
from broker.scheduling.registry import AgentRecord
from broker.scheduling.scoring import MeasuredSpeed, Score, estimate_tokens_per_s, score_machine

UNKNOWN_MODEL = CatalogModel(name="unknown", parameters_b=7.0, memory_gb=5.0, tier="unknown")
"""Stand-in size for a model that is not in the catalog (speed prior only)."""

PRIOR_TTFT_BASE_S = 0.25
PREFILL_SPEEDUP = 8.0
"""Prompt tokens are processed this many times faster than answer tokens are generated."""


def measured_speed(record: AgentRecord) -> MeasuredSpeed | None:
    """The most trustworthy measured generation speed of an agent, for its score."""
    serving = record.ready_model or record.current_model
    observed = record.observed.get(serving) if serving else None
    if observed is None and record.observed:
        observed = max(record.observed.values(), key=lambda estimate: estimate.samples)
        serving = next(name for name, estimate in record.observed.items() if estimate is observed)
    if observed is not None and observed.tokens_per_s:
        return MeasuredSpeed(observed.tokens_per_s, serving, "observed")
    telemetry = record.telemetry
    if telemetry is not None and telemetry.tokens_per_s and record.model_state is not None:
        return MeasuredSpeed(telemetry.tokens_per_s, record.model_state.model, "telemetry")
    benchmark = record.hardware.benchmark if record.hardware is not None else None
    if benchmark is not None and benchmark.tokens_per_s:
        return MeasuredSpeed(benchmark.tokens_per_s, benchmark.model, "benchmark")
    return None


SCORE_MEMO_SIZE = 20_000


def agent_score(record: AgentRecord, catalog: Catalog) -> Score:
    """Score of an agent; memoised on (hardware facts, measured speed), which halves a 1,000-agent plan."""
    measured = measured_speed(record)
    key = ("score", record.facts, measured)
    memo = catalog.derived
    score = memo.get(key)
    if score is None:
        if len(memo) >= SCORE_MEMO_SIZE:
            memo.clear()
        score = memo[key] = score_machine(record.facts, catalog, measured)
    return score  # type: ignore[return-value]


@dataclass(frozen=True)
class SpeedExpectation:
    tokens_per_s: float
    ttft_s: float
    source: str


def expected_speed(record: AgentRecord, model: str, catalog: Catalog, prompt_tokens: int = 0) -> SpeedExpectation:
    """Per-stream tokens/s and time to first token of ``model`` on this agent."""
    entry = catalog.model(model) or UNKNOWN_MODEL
    observed = record.observed.get(model)
    telemetry = record.telemetry if record.ready_model == model else None
    benchmark = record.hardware.benchmark if record.hardware is not None else None
    prior_speed = estimate_tokens_per_s(record.facts, entry)
    speed: float | None = None
    source = "prior"
    if observed is not None and observed.tokens_per_s:
        speed, source = observed.tokens_per_s, "observed"
    elif telemetry is not None and telemetry.tokens_per_s:
        speed, source = telemetry.tokens_per_s, "telemetry"
    elif benchmark is not None and benchmark.tokens_per_s:
        bench_model = catalog.model(benchmark.model)
        scale = bench_model.read_gb / entry.read_gb if bench_model is not None else 1.0
        speed, source = benchmark.tokens_per_s * scale, "benchmark"
    tokens_per_s = max(0.1, speed or prior_speed)
    ttft = None
    if observed is not None and observed.ttft_s is not None:
        ttft = observed.ttft_s
    elif telemetry is not None and telemetry.ttft_s is not None:
        ttft = telemetry.ttft_s
    elif benchmark is not None and benchmark.ttft_s is not None and benchmark.model == model:
        ttft = benchmark.ttft_s
    if ttft is None:
        ttft = PRIOR_TTFT_BASE_S + prompt_tokens / (tokens_per_s * PREFILL_SPEEDUP)
    return SpeedExpectation(tokens_per_s, ttft, source)

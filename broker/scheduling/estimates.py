"""What an agent is expected to do, from the best evidence at hand.

Evidence, best first: answers the coordinator itself observed (per model),
the agent's telemetry (recent tokens/s and time to first token of the model
it serves), its hardware benchmark, and last the bandwidth-based prior from
:mod:`broker.scheduling.scoring` for an agent nobody has measured yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.scheduling.catalog import Catalog, CatalogModel
from broker.scheduling.names import model_key, same_model
from broker.scheduling.registry import AgentRecord
from broker.scheduling.scoring import MeasuredSpeed, Score, estimate_tokens_per_s, normalise_speed, score_machine

PRIOR_TTFT_BASE_S = 0.25
PREFILL_SPEEDUP = 8.0
"""Prompt tokens are processed this many times faster than answer tokens are generated."""
LOAD_BASE_S = 1.0
LOAD_GB_PER_S = 1.0
"""Loading a model from disk into memory: a second plus its size at about 1 GB/s (SSD and page cache vary)."""


def load_time_s(model: CatalogModel) -> float:
    """Expected time to load ``model`` before its first token (an agent has it on disk, not in memory)."""
    return LOAD_BASE_S + model.memory_gb / LOAD_GB_PER_S


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
    prefill_tokens_per_s: float = 0.0
    """Prompt tokens read per second: :data:`PREFILL_SPEEDUP` × the generation speed (no runtime reports its own
    yet)."""


def expected_speed(record: AgentRecord, model: str, catalog: Catalog, prompt_tokens: int = 0, *,
                   loaded: bool = True) -> SpeedExpectation:
    """Per-stream tokens/s and time to first token of ``model`` on this agent (``loaded=False``: it must be loaded
    from disk first, which adds to the time to first token).

    For a model the agent was not assigned: what the coordinator observed for that model on that agent, else the
    benchmark scaled by model size, else the catalog's (or the name's) size estimate — never the telemetry, which
    describes the assigned model.
    """
    entry = catalog.estimate(model)
    observed = record.observed.get(model)
    telemetry = record.telemetry if same_model(record.ready_model, model) else None
    benchmark = record.hardware.benchmark if record.hardware is not None else None
    prior_speed = estimate_tokens_per_s(record.facts, entry)
    speed: float | None = None
    source = "prior"
    if observed is not None and observed.tokens_per_s:
        speed, source = observed.tokens_per_s, "observed"
    elif telemetry is not None and telemetry.tokens_per_s:
        speed, source = telemetry.tokens_per_s, "telemetry"
    elif benchmark is not None and benchmark.tokens_per_s:
        bench_model = catalog.estimate(benchmark.model)
        speed, source = benchmark.tokens_per_s * bench_model.read_gb / entry.read_gb, "benchmark"
    tokens_per_s = max(0.1, speed or prior_speed)
    ttft = None
    if observed is not None and observed.ttft_s is not None:
        ttft = observed.ttft_s
    elif telemetry is not None and telemetry.ttft_s is not None:
        ttft = telemetry.ttft_s
    elif benchmark is not None and benchmark.ttft_s is not None and same_model(benchmark.model, model):
        ttft = benchmark.ttft_s
    if ttft is None:
        ttft = PRIOR_TTFT_BASE_S + prompt_tokens / (tokens_per_s * PREFILL_SPEEDUP)
    if not loaded:
        ttft += load_time_s(entry)
    return SpeedExpectation(tokens_per_s, ttft, source, tokens_per_s * PREFILL_SPEEDUP)


def placement_speed(record: AgentRecord, model: CatalogModel, catalog: Catalog) -> tuple[float, str]:
    """Tokens/s placement expects of ``model`` on this agent, and from what: observed on that model, else any
    measurement scaled by model size (speed ∝ 1 / weights), else the bandwidth prior."""
    observed = record.observed.get(model.name)
    if observed is not None and observed.tokens_per_s:
        return observed.tokens_per_s, "observed"
    measured = measured_speed(record)
    if measured is not None:
        on_reference = normalise_speed(measured.tokens_per_s, measured.model, catalog)
        return on_reference * catalog.reference.read_gb / model.read_gb, f"{measured.source}, scaled"
    return estimate_tokens_per_s(record.facts, model), "estimated"


# ---------------------------------------------------------------- answer lengths


def prompt_shape(prompt_tokens: int, turns: int, system: bool, opening: str = "") -> tuple[int, int, bool, str]:
    """What a question looks like to the length predictor: the prompt's size class (powers of two), how many turns
    (up to 4), whether a system prompt sets the scene, and the first words of the question (lower-cased, two
    words: "summarise the", "write a") — the shapes that answers of similar length share."""
    size = max(0, int(prompt_tokens)).bit_length()
    words = " ".join(opening.lower().split()[:2])[:40]
    return size, min(turns, 4), system, words


@dataclass
class _LengthStats:
    mean: float
    count: int


class AnswerLengths:
    """Predicts an answer's length (tokens) when the question sets no ``max_tokens``, from what this cluster has
    seen: a moving average per (model, prompt shape), else per prompt shape, else per model, else overall — each
    trusted once it has :attr:`min_samples` answers. Memory is bounded: at most ``capacity`` keys, the least
    recently updated dropped first."""

    def __init__(self, default_tokens: float, *, capacity: int = 4096, smoothing: float = 0.1,
                 min_samples: int = 3) -> None:
        self.default_tokens = float(default_tokens)
        self.capacity = capacity
        self.smoothing = smoothing
        self.min_samples = min_samples
        self._stats: dict[tuple[object, ...], _LengthStats] = {}

    def __len__(self) -> int:
        return len(self._stats)

    @staticmethod
    def _keys(model: str | None, shape: tuple[object, ...] | None) -> list[tuple[object, ...]]:
        model_part = (model_key(model),) if model else None
        keys: list[tuple[object, ...]] = []
        if model_part and shape is not None:
            keys.append(("model+shape", *model_part, *shape))
        if shape is not None:
            keys.append(("shape", *shape))
        if model_part:
            keys.append(("model", *model_part))
        keys.append(("all",))
        return keys

    def observe(self, model: str | None, shape: tuple[object, ...] | None, tokens: float) -> None:
        for key in self._keys(model, shape):
            stats = self._stats.pop(key, None)  # re-inserted last: the dict's order is the recency order
            if stats is None:
                stats = _LengthStats(float(tokens), 0)
            weight = max(self.smoothing, 1.0 / (stats.count + 1))  # a plain mean until the moving average takes over
            stats.mean += weight * (tokens - stats.mean)
            stats.count += 1
            self._stats[key] = stats
        while len(self._stats) > self.capacity:
            del self._stats[next(iter(self._stats))]

    def predict(self, model: str | None, shape: tuple[object, ...] | None) -> float:
        for key in self._keys(model, shape):
            stats = self._stats.get(key)
            if stats is not None and (stats.count >= self.min_samples or key == ("all",)):
                return stats.mean
        return self.default_tokens

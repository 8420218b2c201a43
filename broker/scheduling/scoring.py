"""Machine score 0–100: small scorers whose points add up, each with a note for the UI.

Starts from the original design's CPU + RAM + GPU weighting and fixes its
weaknesses (see docs/scheduling.md for the formula and worked examples):

* a GPU is judged by its VRAM and vendor, not by its name;
* generation speed is roughly memory bandwidth ÷ bytes read per token (the
  model's weights), so a speed part estimates tokens/s for the catalog's
  reference model — with partial GPU offload when the model does not fit VRAM;
* once an agent has measured its speed (coordinator-observed answers,
  telemetry, or the hardware benchmark) the measurement replaces the estimate.

The same estimate is the router's cold-start prior for an agent it has not
measured yet (:func:`estimate_tokens_per_s`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from broker.protocol.messages import GpuInfo, Hardware
from broker.scheduling.catalog import Catalog, CatalogModel

DETECTION_FAILED_SCORE = 50.0
"""The original design's score for a machine whose hardware could not be read."""

BANDWIDTH_EFFICIENCY = 0.6
"""Share of peak memory bandwidth that token generation reaches in practice."""

FULL_SPEED_TOKENS_PER_S = 25.0
"""Reference-model speed that earns all speed points (well beyond reading speed)."""

VENDOR_FACTOR = {"nvidia": 1.0, "apple": 1.0, "amd": 0.9, "intel": 0.8, "unknown": 0.8}
"""How well the usual runtimes (Ollama, llama.cpp) use each vendor's GPUs."""

INTEGRATED_GPU_POINTS = 8.0
"""An integrated GPU shares system RAM; it speeds up prompt processing a little."""

UNIFIED_GPU_SHARE = 0.67
"""Share of unified memory the GPU may use (macOS's default limit is about two thirds)."""

AcceleratorKind = Literal["discrete", "unified", "integrated", "none"]

_ARM_HINTS = re.compile(r"\b(arm|aarch64|cortex|bcm\d*|broadcom|rockchip|rk3\d+|raspberry|snapdragon)\b", re.IGNORECASE)


@dataclass(frozen=True)
class MachineFacts:
    """What scoring, fit checks and speed priors need, distilled from a Hardware message."""

    cores: int | None
    ghz: float | None
    ram_gb: float | None
    accelerator: AcceleratorKind
    vendor: str
    vram_gb: float | None
    """GPU memory usable for a model: VRAM (summed over same-vendor GPUs), or the GPU share of unified memory."""
    gpu_bandwidth_gbps: float | None
    cpu_bandwidth_gbps: float
    detection_failed: bool

    def __hash__(self) -> int:
        """Hashed once (score memo keys hold the facts; a plan looks up thousands of them)."""
        found = self.__dict__.get("_hash")
        if found is None:
            found = hash((self.cores, self.ghz, self.ram_gb, self.accelerator, self.vendor, self.vram_gb,
                          self.gpu_bandwidth_gbps, self.cpu_bandwidth_gbps, self.detection_failed))
            object.__setattr__(self, "_hash", found)
        return found

    @property
    def has_gpu_pool(self) -> bool:
        """True when models live in GPU memory (fit is checked against VRAM, not RAM)."""
        return self.accelerator == "discrete" and self.vram_gb is not None


def _vendor(gpu: GpuInfo) -> str:
    vendor = (gpu.vendor or "unknown").lower()
    if vendor in VENDOR_FACTOR and vendor != "unknown":
        return vendor
    name = gpu.name.lower()
    for candidate, hints in (
        ("nvidia", ("nvidia", "geforce", "rtx", "gtx", "quadro", "tesla")),
        ("amd", ("amd", "radeon")),
        ("intel", ("intel", "iris", "arc", "uhd")),
        ("apple", ("apple",)),
    ):
        if any(hint in name for hint in hints):
            return candidate
    return "unknown"


def _is_arm(hardware: Hardware) -> bool:
    text = f"{hardware.arch or ''} {hardware.cpu_brand or ''}"
    return bool(_ARM_HINTS.search(text))


def _cpu_bandwidth(hardware: Hardware) -> float:
    """System memory bandwidth estimate (GB/s): more cores usually come with more memory channels."""
    cores = hardware.cpu_physical_cores
    if _is_arm(hardware) and "apple" not in (hardware.cpu_brand or "").lower():
        return min(100.0, 4.0 * cores) if cores else 16.0
    return min(200.0, 40.0 + 2.5 * cores) if cores else 50.0


def _apple_bandwidth(gpu: GpuInfo, hardware: Hardware) -> float:
    text = f"{gpu.name} {hardware.cpu_brand or ''}".lower()
    for hint, bandwidth in (("ultra", 800.0), ("max", 400.0), ("pro", 200.0)):
        if hint in text:
            return bandwidth
    return 100.0


def machine_facts(hardware: Hardware | None) -> MachineFacts:
    """Distil a Hardware message; ``None`` (nothing reported) counts as failed detection."""
    if hardware is None:
        return MachineFacts(None, None, None, "none", "unknown", None, None, 50.0, True)
    cpu_bandwidth = _cpu_bandwidth(hardware)
    failed = (
        not hardware.cpu_physical_cores and not hardware.cpu_max_ghz and not hardware.ram_total_gb and not hardware.gpus
    )
    kind: AcceleratorKind = "none"
    vendor = "unknown"
    vram: float | None = None
    gpu_bandwidth: float | None = None
    gpus = [(gpu, _vendor(gpu)) for gpu in hardware.gpus]
    # Unified memory is a GPU pool of its own only where it is fast (Apple Silicon, or a declared bandwidth);
    # an Intel/AMD iGPU sharing ordinary RAM is integrated and runs at CPU memory speed.
    unified = [(gpu, v) for gpu, v in gpus
               if v == "apple" or (gpu.unified_memory and gpu.memory_bandwidth_gbps)]
    others = [(gpu, v) for gpu, v in gpus if (gpu, v) not in unified]
    # An NVIDIA card without a VRAM figure is still a discrete card; Intel/AMD without one is integrated.
    discrete = [(gpu, v) for gpu, v in others
                if (gpu.vram_total_gb or 0) >= 1.0 or (gpu.vram_total_gb is None and v == "nvidia")]
    if unified:
        gpu, vendor = unified[0]
        kind = "unified"
        vram = gpu.vram_total_gb or (UNIFIED_GPU_SHARE * hardware.ram_total_gb if hardware.ram_total_gb else None)
        gpu_bandwidth = gpu.memory_bandwidth_gbps or _apple_bandwidth(gpu, hardware)
    elif discrete:
        # Runtimes split a model across GPUs of one vendor; use the vendor with the most VRAM.
        by_vendor: dict[str, list[GpuInfo]] = {}
        for gpu, v in discrete:
            by_vendor.setdefault(v, []).append(gpu)
        vendor, group = max(by_vendor.items(), key=lambda item: sum(g.vram_total_gb or 8.0 for g in item[1]))
        kind = "discrete"
        vram = sum(gpu.vram_total_gb or 8.0 for gpu in group)  # unknown NVIDIA VRAM: assume a common 8 GB card
        best = max(group, key=lambda g: g.vram_total_gb or 8.0)
        gpu_bandwidth = best.memory_bandwidth_gbps or min(1500.0, 40.0 * (best.vram_total_gb or 8.0))
    elif gpus:
        kind = "integrated"
        vendor = gpus[0][1]
    return MachineFacts(
        cores=hardware.cpu_physical_cores or None,
        ghz=hardware.cpu_max_ghz or None,
        ram_gb=hardware.ram_total_gb or None,
        accelerator=kind,
        vendor=vendor,
        vram_gb=vram,
        gpu_bandwidth_gbps=gpu_bandwidth,
        cpu_bandwidth_gbps=cpu_bandwidth,
        detection_failed=failed,
    )


def estimate_tokens_per_s(facts: MachineFacts, model: CatalogModel) -> float:
    """Generation speed of ``model`` from bandwidth ÷ weights, with the part that misses VRAM running on the CPU."""
    read = model.read_gb
    cpu_time = read / facts.cpu_bandwidth_gbps
    if facts.accelerator in ("discrete", "unified") and facts.gpu_bandwidth_gbps and facts.vram_gb:
        on_gpu = min(1.0, facts.vram_gb * 0.9 / model.memory_gb)
        seconds = read * on_gpu / facts.gpu_bandwidth_gbps + cpu_time * (1.0 - on_gpu)
    else:
        seconds = cpu_time
    return BANDWIDTH_EFFICIENCY / seconds


def normalise_speed(tokens_per_s: float, model_name: str | None, catalog: Catalog) -> float:
    """A measured speed on ``model_name`` expressed for the reference model (speed scales with 1 / weights)."""
    model = catalog.estimate(model_name) if model_name else None
    if model is None or "size unknown" in model.tags:
        return tokens_per_s
    return tokens_per_s * model.read_gb / catalog.reference.read_gb


# ---------------------------------------------------------------- scorers


@dataclass(frozen=True)
class ScorePart:
    name: str
    points: float
    max_points: float
    note: str


@dataclass(frozen=True)
class MeasuredSpeed:
    """A measured generation speed and the model it was measured on."""

    tokens_per_s: float
    model: str | None
    source: str  # observed, telemetry or benchmark


@dataclass(frozen=True)
class ScoreContext:
    facts: MachineFacts
    catalog: Catalog
    measured: MeasuredSpeed | None


class Scorer(Protocol):
    name: str
    max_points: float

    def score(self, context: ScoreContext) -> ScorePart: ...


class CpuScorer:
    """Cores and clock, as in the original design but on a 20-point scale (CPUs saturate quickly)."""

    name = "cpu"
    max_points = 20.0

    def score(self, context: ScoreContext) -> ScorePart:
        facts = context.facts
        cores = min(10.0, facts.cores * 1.5) if facts.cores else 5.0
        clock = min(10.0, facts.ghz * 2.5) if facts.ghz else 5.0
        note = f"{facts.cores or '?'} cores × 1.5 (≤10) + {facts.ghz or '?'} GHz × 2.5 (≤10)"
        return ScorePart(self.name, cores + clock, self.max_points, note)


class RamScorer:
    """System RAM decides which models can load at all without a GPU."""

    name = "ram"
    max_points = 25.0

    def score(self, context: ScoreContext) -> ScorePart:
        ram = context.facts.ram_gb
        if ram is None:
            return ScorePart(self.name, self.max_points / 2, self.max_points, "RAM unknown: half marks")
        return ScorePart(self.name, min(self.max_points, ram * 1.5), self.max_points, f"{ram:g} GB × 1.5 (≤25)")


class GpuScorer:
    """GPU memory for models, weighted by how well runtimes support the vendor — not the card's name."""

    name = "gpu"
    max_points = 25.0

    def score(self, context: ScoreContext) -> ScorePart:
        facts = context.facts
        factor = VENDOR_FACTOR.get(facts.vendor, VENDOR_FACTOR["unknown"])
        if facts.accelerator in ("discrete", "unified") and facts.vram_gb is not None:
            points = min(self.max_points, 4.0 + facts.vram_gb) * factor
            kind = "VRAM" if facts.accelerator == "discrete" else "unified memory for the GPU"
            return ScorePart(self.name, points, self.max_points,
                             f"(4 + {facts.vram_gb:.1f} GB {kind}, ≤25) × {factor:g} {facts.vendor}")
        if facts.accelerator == "integrated":
            return ScorePart(self.name, INTEGRATED_GPU_POINTS, self.max_points, f"integrated {facts.vendor} GPU")
        return ScorePart(self.name, 0.0, self.max_points, "no GPU")


class SpeedScorer:
    """Expected tokens/s on the reference model: measured when known, else bandwidth ÷ model size."""

    name = "speed"
    max_points = 30.0

    def score(self, context: ScoreContext) -> ScorePart:
        reference = context.catalog.reference
        if context.measured is not None and context.measured.tokens_per_s > 0:
            speed = normalise_speed(context.measured.tokens_per_s, context.measured.model, context.catalog)
            note = (f"measured {context.measured.tokens_per_s:.1f} tok/s on {context.measured.model or '?'} "
                    f"({context.measured.source}) ≈ {speed:.1f} tok/s on {reference.name}")
        else:
            speed = estimate_tokens_per_s(context.facts, reference)
            note = f"estimated {speed:.1f} tok/s on {reference.name} from memory bandwidth"
        fraction = min(1.0, math.log1p(speed) / math.log1p(FULL_SPEED_TOKENS_PER_S))
        return ScorePart(self.name, self.max_points * fraction, self.max_points, note)


DEFAULT_SCORERS: tuple[Scorer, ...] = (CpuScorer(), RamScorer(), GpuScorer(), SpeedScorer())


@dataclass(frozen=True)
class Score:
    total: float
    parts: tuple[ScorePart, ...]
    detection_failed: bool = False

    @property
    def breakdown(self) -> dict[str, float]:
        return {part.name: round(part.points, 1) for part in self.parts}

    def explain(self) -> str:
        if self.detection_failed:
            return f"hardware unknown: {self.total:g} (the original design's default)"
        items = ", ".join(f"{part.name} {part.points:.1f}/{part.max_points:g} [{part.note}]" for part in self.parts)
        return f"{self.total:.1f} = {items}"


def score_machine(
    hardware: Hardware | MachineFacts | None,
    catalog: Catalog,
    measured: MeasuredSpeed | None = None,
    scorers: tuple[Scorer, ...] = DEFAULT_SCORERS,
) -> Score:
    """Score a machine 0–100; failed hardware detection gives 50 unless a speed was measured."""
    facts = hardware if isinstance(hardware, MachineFacts) else machine_facts(hardware)
    if facts.detection_failed and measured is None:
        return Score(DETECTION_FAILED_SCORE, (), detection_failed=True)
    context = ScoreContext(facts, catalog, measured)
    parts = tuple(scorer.score(context) for scorer in scorers)
    total = max(0.0, min(100.0, sum(part.points for part in parts)))
    return Score(round(total, 1), parts)

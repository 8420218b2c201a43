"""Machine scores on hardware fixtures named after real machine kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.protocol import Benchmark, GpuInfo, Hardware
from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
from broker.scheduling.scoring import (
    DETECTION_FAILED_SCORE,
    MeasuredSpeed,
    estimate_tokens_per_s,
    machine_facts,
    normalise_speed,
    score_machine,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
CATALOG = load_catalog(DEFAULT_CATALOG)


def machine(name: str) -> Hardware:
    return Hardware.model_validate(json.loads((FIXTURES / f"{name}.json").read_text()))


def score(name: str) -> float:
    return score_machine(machine(name), CATALOG).total


def test_gpu_desktop_outranks_laptop_outranks_raspberry_pi() -> None:
    assert score("desktop_ryzen9_rtx4090_24g") > score("laptop_i7_iris_16g") > score("raspberry_pi5_8g")


@pytest.mark.parametrize(
    ("name", "tier"),
    [
        ("desktop_ryzen9_rtx4090_24g", "large"),
        ("desktop_ryzen7_rx7800xt_16g", "large"),
        ("mac_m2_16g", "large"),
        ("laptop_i7_iris_16g", "medium"),
        ("server_nogpu_64g", "medium"),
        ("desktop_i5_gtx1650_4g", "medium"),
        ("raspberry_pi5_8g", "small"),
        ("detection_failed", "small"),
    ],
)
def test_default_tiers(name: str, tier: str) -> None:
    assert CATALOG.tier_for_score(score(name)).name == tier


def test_failed_detection_scores_fifty_like_the_original() -> None:
    result = score_machine(machine("detection_failed"), CATALOG)
    assert result.total == DETECTION_FAILED_SCORE
    assert result.detection_failed
    assert score_machine(None, CATALOG).total == DETECTION_FAILED_SCORE


def test_scores_stay_within_0_and_100_and_parts_add_up() -> None:
    for path in FIXTURES.glob("*.json"):
        result = score_machine(machine(path.stem), CATALOG)
        assert 0 <= result.total <= 100
        if result.parts:
            assert result.total == pytest.approx(min(100.0, sum(p.points for p in result.parts)), abs=0.05)
            assert set(result.breakdown) == {"cpu", "ram", "gpu", "speed"}
            assert all(0 <= p.points <= p.max_points for p in result.parts)


def test_gpu_is_judged_by_vram_not_by_name() -> None:
    """Two cards with the same name class but different VRAM score differently; a renamed card scores the same."""
    base = machine("desktop_i5_gtx1650_4g")
    def card(name: str, vram: float) -> Hardware:
        return base.model_copy(update={"gpus": [GpuInfo(name=name, vendor="nvidia", vram_total_gb=vram)]})

    small, big, renamed = card("NVIDIA GeForce RTX 3050", 4), card("NVIDIA GeForce RTX 3050", 12), card("Mystery", 4)
    assert score_machine(big, CATALOG).total > score_machine(small, CATALOG).total
    assert score_machine(renamed, CATALOG).total == score_machine(small, CATALOG).total


def test_vendor_weighs_in() -> None:
    base = machine("desktop_ryzen7_rx7800xt_16g")
    nvidia = base.model_copy(update={"gpus": [GpuInfo(name="x", vendor="nvidia", vram_total_gb=16)]})
    amd = base.model_copy(update={"gpus": [GpuInfo(name="x", vendor="amd", vram_total_gb=16)]})
    gpu_part = {r: score_machine(h, CATALOG).breakdown["gpu"] for r, h in (("nvidia", nvidia), ("amd", amd))}
    assert gpu_part["nvidia"] > gpu_part["amd"]


def test_speed_follows_bandwidth_over_model_size() -> None:
    facts = machine_facts(machine("desktop_ryzen9_rtx4090_24g"))
    big, small = CATALOG.model("llama3.1:8b"), CATALOG.model("llama3.2:1b")
    assert big is not None and small is not None
    ratio = estimate_tokens_per_s(facts, small) / estimate_tokens_per_s(facts, big)
    assert ratio == pytest.approx(big.read_gb / small.read_gb)
    # The 8B model does not fit a 4 GB card: part of it runs at CPU memory speed.
    gtx = machine_facts(machine("desktop_i5_gtx1650_4g"))
    all_on_gpu = gtx.gpu_bandwidth_gbps * 0.6 / big.read_gb  # type: ignore[operator]
    assert estimate_tokens_per_s(gtx, big) < all_on_gpu * 0.7


def test_raspberry_pi_is_recognised_as_a_low_bandwidth_arm_board() -> None:
    pi = machine_facts(machine("raspberry_pi5_8g"))
    laptop = machine_facts(machine("laptop_i7_iris_16g"))
    assert pi.cpu_bandwidth_gbps < laptop.cpu_bandwidth_gbps
    assert pi.accelerator == "none" and laptop.accelerator == "integrated"


def test_apple_unified_memory_counts_as_gpu_memory() -> None:
    facts = machine_facts(machine("mac_m2_16g"))
    assert facts.accelerator == "unified"
    assert facts.vram_gb == pytest.approx(16 * 0.67)


def test_measured_speed_replaces_the_estimate() -> None:
    laptop = machine("laptop_i7_iris_16g")
    estimated = score_machine(laptop, CATALOG)
    fast = score_machine(laptop, CATALOG, MeasuredSpeed(40.0, "llama3.2:3b", "observed"))
    slow = score_machine(laptop, CATALOG, MeasuredSpeed(2.0, "llama3.2:3b", "observed"))
    assert slow.total < estimated.total < fast.total
    assert "measured" in next(p.note for p in fast.parts if p.name == "speed")


def test_measured_speed_is_normalised_to_the_reference_model() -> None:
    # 30 tok/s on a 1B model is far less impressive than 30 tok/s on the 8B reference.
    assert normalise_speed(30.0, "llama3.1:8b", CATALOG) == pytest.approx(30.0)
    assert normalise_speed(30.0, "llama3.2:1b", CATALOG) < 10.0
    assert normalise_speed(30.0, "not-in-catalog", CATALOG) == 30.0


def test_benchmark_lifts_a_failed_detection() -> None:
    unknown = machine("detection_failed").model_copy(
        update={"benchmark": Benchmark(model="llama3.1:8b", tokens_per_s=100.0)})
    assert score_machine(unknown, CATALOG, MeasuredSpeed(100.0, "llama3.1:8b", "benchmark")).total > 50


def test_explain_names_every_part() -> None:
    text = score_machine(machine("desktop_ryzen9_rtx4090_24g"), CATALOG).explain()
    for word in ("cpu", "ram", "gpu", "speed", "VRAM"):
        assert word in text


PROFILES = Path(__file__).resolve().parent.parent / "agent" / "profiles"


@pytest.mark.parametrize(
    ("profile", "tier", "expected"),
    [("gpu-desktop", "large", 100.0), ("laptop", "medium", 72.8), ("raspberry-pi", "small", 34.0)],
)
def test_demo_profiles_land_in_the_three_tiers(profile: str, tier: str, expected: float) -> None:
    """The demo machines of run_all.py --demo (the worked examples in docs/scheduling.md)."""
    hardware = Hardware.model_validate(json.loads((PROFILES / f"{profile}.json").read_text()))
    result = score_machine(hardware, CATALOG)
    assert result.total == pytest.approx(expected, abs=0.05)
    assert CATALOG.tier_for_score(result.total).name == tier


def test_an_igpu_sharing_ram_is_integrated_not_a_gpu_pool() -> None:
    """Intel Iris marked unified_memory shares ordinary RAM at CPU speed; only Apple-style pools count as VRAM."""
    hardware = Hardware.model_validate(json.loads((PROFILES / "laptop.json").read_text()))
    assert machine_facts(hardware).accelerator == "integrated"

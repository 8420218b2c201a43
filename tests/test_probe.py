"""Hardware probe: the builder on snapshots of real machine kinds, profiles, and the agent id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.hardware import (
    APPLE_GPU_SHARE_SMALL,
    GpuMonitor,
    HardwareProfile,
    apply_profile,
    build_hardware,
    collect_raw_facts,
    load_profile,
    probe_hardware,
)
from agent.identity import make_agent_id, resolve_agent_id, sanitize_agent_id
from agent.settings import AgentSettings
from broker.protocol import Hardware, is_valid_agent_id

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = sorted((PROJECT_ROOT / "tests" / "fixtures" / "probe").glob("*.json"))
PROFILES = sorted((PROJECT_ROOT / "agent" / "profiles").glob("*.json"))


def test_there_are_snapshots_of_every_machine_kind() -> None:
    names = " ".join(path.name for path in SNAPSHOTS)
    for kind in ("rtx4090", "laptop", "raspberry-pi", "apple-m2", "no-gpu-library", "rx7900"):
        assert kind in names


@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=lambda path: path.stem)
def test_builder_reads_snapshot(snapshot: Path) -> None:
    data = json.loads(snapshot.read_text())
    hardware = build_hardware(data["raw"])
    expected = data["expected"]
    for key, value in expected.items():
        if key == "gpus":
            continue
        assert getattr(hardware, key) == value, key
    if "gpus" in expected:
        assert len(hardware.gpus) == len(expected["gpus"])
        for gpu, wanted in zip(hardware.gpus, expected["gpus"], strict=True):
            for key, value in wanted.items():
                assert getattr(gpu, key) == value, (gpu, key)
    assert not hardware.declared
    # the result must survive the wire
    assert Hardware.model_validate_json(hardware.model_dump_json()) == hardware


def test_apple_unified_memory_share_is_documented_value() -> None:
    raw = {"system": "Darwin", "machine": "arm64", "cpu": {"brand": "Apple M1"}, "ram_total_bytes": 16 * 1024**3}
    gpu = build_hardware(raw).gpus[0]
    assert gpu.vendor == "apple" and gpu.unified_memory
    assert gpu.vram_total_gb == round(16 * APPLE_GPU_SHARE_SMALL, 1)
    big = build_hardware({**raw, "ram_total_bytes": 128 * 1024**3}).gpus[0]
    assert big.vram_total_gb == 96.0


def test_builder_survives_empty_and_garbage_facts() -> None:
    assert build_hardware({}).gpus == []
    hardware = build_hardware({"nvml": {"gpus": [{}]}, "drm": [{"vendor_id": "0x1002"}], "cpu": None,
                               "cpu_physical_cores": "eight", "ram_total_bytes": -1})
    assert hardware.cpu_physical_cores is None and hardware.ram_total_gb is None
    assert [gpu.vendor for gpu in hardware.gpus] == ["nvidia", "amd"]


def test_nvidia_card_without_driver_is_still_listed() -> None:
    raw = {"system": "Linux", "nvml": {"error": "Driver Not Loaded"},
           "drm": [{"card": "card0", "vendor_id": "0x10de", "device_id": "0x2204"}]}
    (gpu,) = build_hardware(raw).gpus
    assert gpu.vendor == "nvidia" and gpu.vram_total_gb is None and "NVML unavailable" in gpu.name


def test_probe_of_this_machine_never_crashes() -> None:
    raw = collect_raw_facts(include_cpuinfo=False)
    json.dumps(raw)  # JSON-able, so it can become a snapshot
    hardware = build_hardware(raw)
    assert hardware.cpu_logical_cores and hardware.ram_total_gb
    monitor = GpuMonitor()
    utilisation, free = monitor.sample()  # no NVIDIA here: both None, no exception
    monitor.close()
    assert utilisation is None or 0 <= utilisation <= 100
    assert free is None or free >= 0


@pytest.mark.parametrize("profile_path", PROFILES, ids=lambda path: path.stem)
def test_shipped_profiles_are_valid_and_complete(profile_path: Path) -> None:
    profile = load_profile(profile_path)
    assert profile.covers_cpu and profile.ram_total_gb and profile.gpus is not None
    hardware = apply_profile(Hardware(cpu_brand="probed", gpus=[]), profile)
    assert hardware.declared and hardware.cpu_brand == profile.cpu_brand


def test_profile_overrides_only_what_it_declares(tmp_path: Path) -> None:
    probed = Hardware(cpu_brand="Probed CPU", cpu_physical_cores=2, cpu_logical_cores=4, cpu_max_ghz=2.0,
                      ram_total_gb=8, os="Linux 6", arch="x86_64", hostname="box")
    declared = apply_profile(probed, HardwareProfile(ram_total_gb=64, cpu_physical_cores=16))
    assert declared.declared and declared.ram_total_gb == 64 and declared.cpu_physical_cores == 16
    assert declared.cpu_logical_cores == 16  # the probed count belongs to another machine
    assert declared.cpu_brand == "Probed CPU" and declared.hostname == "box" and declared.gpus == []
    path = tmp_path / "p.json"
    path.write_text('{"gpus": [{"name": "RTX 3060", "vendor": "nvidia", "vram_total_gb": 12}]}')
    with_gpu = probe_hardware(load_profile(path))
    assert with_gpu.declared and with_gpu.gpus[0].vram_total_gb == 12


def test_bad_profile_says_which_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.json"
    path.write_text('{"ram_gb": 16}')
    with pytest.raises(ValueError, match="typo.json"):
        load_profile(path)
    with pytest.raises(ValueError, match="missing.json"):
        load_profile(tmp_path / "missing.json")


def test_agent_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = resolve_agent_id(tmp_path, hostname="Anna's MacBook Pro.local")
    assert first.startswith("anna-s-macbook-pro.local-") and is_valid_agent_id(first)
    assert resolve_agent_id(tmp_path, hostname="other") == first
    assert (tmp_path / "agent_id").read_text().strip() == first
    assert resolve_agent_id(tmp_path, given="desk-1") == "desk-1"
    with pytest.raises(ValueError):
        resolve_agent_id(tmp_path, given="bad/id")


def test_agent_id_from_awkward_hostnames() -> None:
    assert sanitize_agent_id("---") == ""
    assert is_valid_agent_id(make_agent_id("---"))
    assert is_valid_agent_id(make_agent_id("ümlaut+host#1"))
    assert is_valid_agent_id(make_agent_id("x" * 200))
    assert make_agent_id("raspberrypi") != make_agent_id("raspberrypi")  # two Pis never collide


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("OLLAMA_NUM_PARALLEL", raising=False)
    settings = AgentSettings()
    assert settings.backend == "ollama" and settings.resolved_backend_url == "http://127.0.0.1:11434"
    assert settings.resolved_max_parallel == 2 and settings.max_queue == 16
    assert AgentSettings(backend="simulated").resolved_max_parallel == 4
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "6")
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:11500")
    monkeypatch.setenv("SLB_CHUNK_INTERVAL_MS", "50")
    settings = AgentSettings()
    assert settings.resolved_max_parallel == 6 and settings.chunk_interval_ms == 50
    assert settings.resolved_backend_url == "http://0.0.0.0:11500"
    with pytest.raises(ValueError):
        AgentSettings(agent_id="a/b")


def test_every_hardware_fixture_is_a_valid_profile() -> None:
    """The coordinator's hardware snapshots double as --hardware-profile files."""
    from agent.hardware import load_profile

    folder = Path(__file__).resolve().parent / "fixtures" / "hardware"
    files = sorted(folder.glob("*.json"))
    assert files
    for path in files:
        profile = load_profile(path)
        assert profile.model_dump(exclude_none=True) or path.name == "detection_failed.json"

"""What the machine can do: collect raw facts, then build a :class:`Hardware` message from them.

Why two steps: collecting touches libraries and files that differ per machine
(psutil, py-cpuinfo, NVML, /sys, sysctl), while building is pure and is tested
on JSON snapshots of real machine kinds (tests/fixtures/probe/). Every probe is
wrapped: a missing library, driver or file gives ``None``, never a crash.

Apple Silicon has no VRAM of its own: the GPU uses unified memory, and macOS
lets the GPU wire about two thirds of RAM on machines up to 36 GB and about
three quarters above (Metal's ``recommendedMaxWorkingSetSize``). The agent
reports that share as ``vram_total_gb`` with ``unified_memory=True``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from broker.protocol import GpuInfo, Hardware

logger = logging.getLogger(__name__)

GIB = 1024**3
APPLE_GPU_SHARE_SMALL = 0.67
"""GPU share of unified memory on Apple Silicon with up to 36 GB RAM."""
APPLE_GPU_SHARE_LARGE = 0.75
"""GPU share of unified memory on Apple Silicon with more than 36 GB RAM."""

PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel"}
ARM_CPU_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd4b": "Cortex-A78C",
}
APPLE_MAX_GHZ = {"M1": 3.2, "M2": 3.5, "M3": 4.05, "M4": 4.5}
"""Performance-core clocks of Apple chips (psutil cannot read them on arm64 macOS)."""


def _safe(what: str, function: Any, *args: Any) -> Any:
    """Run one probe; any failure (missing library, device, permission) gives None."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - a probe must never crash the agent
        logger.debug("probe %s unavailable: %s", what, error)
        return None


# ---------------------------------------------------------------- collect raw facts (touches the machine)


def _collect_cpuinfo() -> dict[str, Any]:
    import cpuinfo  # py-cpuinfo: slow (~1 s), so it is skipped when a profile declares the CPU

    info = cpuinfo.get_cpu_info()
    advertised = info.get("hz_advertised")
    return {
        "brand": info.get("brand_raw") or None,
        "hz_advertised": advertised[0] if isinstance(advertised, (list, tuple)) and advertised else None,
        "arch": info.get("arch"),
    }


def _collect_psutil() -> dict[str, Any]:
    import psutil

    facts: dict[str, Any] = {
        "cpu_physical_cores": _safe("physical cores", psutil.cpu_count, False),
        "cpu_logical_cores": _safe("logical cores", psutil.cpu_count, True),
        "ram_total_bytes": _safe("ram", lambda: psutil.virtual_memory().total),
    }
    frequency = _safe("cpu freq", psutil.cpu_freq)
    facts["cpu_freq_max_mhz"] = getattr(frequency, "max", None) or None
    return facts


def _collect_nvml() -> dict[str, Any]:
    import pynvml  # nvidia-ml-py

    try:
        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - no driver, no library, no device
        return {"error": str(error) or type(error).__name__}
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = _safe("nvml name", pynvml.nvmlDeviceGetName, handle)
            memory = _safe("nvml memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
            gpus.append({
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_bytes": getattr(memory, "total", None),
                "memory_free_bytes": getattr(memory, "free", None),
            })
        driver = _safe("nvml driver", pynvml.nvmlSystemGetDriverVersion)
        return {"gpus": gpus, "driver": driver.decode() if isinstance(driver, bytes) else driver}
    finally:
        _safe("nvml shutdown", pynvml.nvmlShutdown)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _collect_drm(root: Path = Path("/sys/class/drm")) -> list[dict[str, Any]]:
    cards = []
    for card in sorted(root.glob("card*")):
        if not re.fullmatch(r"card\d+", card.name):
            continue
        device = card / "device"
        vram = _read(device / "mem_info_vram_total")
        cards.append({
            "card": card.name,
            "vendor_id": _read(device / "vendor"),
            "device_id": _read(device / "device"),
            "vram_total_bytes": int(vram) if vram and vram.isdigit() else None,
            "product_name": _read(device / "product_name"),
        })
    return cards


def _collect_sysctl() -> dict[str, Any]:
    keys = ["machdep.cpu.brand_string", "hw.memsize", "hw.physicalcpu", "hw.logicalcpu", "hw.perflevel0.physicalcpu"]
    facts: dict[str, Any] = {}
    for key in keys:
        result = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=2, check=False)
        value = result.stdout.strip()
        if result.returncode == 0 and value:
            facts[key] = int(value) if value.isdigit() else value
    return facts


def _collect_proc_cpuinfo() -> dict[str, str]:
    facts: dict[str, str] = {}
    text = _read(Path("/proc/cpuinfo")) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in {"model name", "CPU part", "Hardware", "Model", "CPU implementer"} and key not in facts and value:
            facts[key] = value
    return facts


def collect_raw_facts(*, include_cpuinfo: bool = True) -> dict[str, Any]:
    """Everything the probe reads, as a JSON-able dict (see tests/fixtures/probe/ for real examples)."""
    system = platform.system()
    raw: dict[str, Any] = {
        "system": system,
        "release": platform.release(),
        "machine": platform.machine(),
        "hostname": _safe("hostname", socket.gethostname),
    }
    raw["cpu"] = _safe("cpuinfo", _collect_cpuinfo) if include_cpuinfo else None
    raw.update(_safe("psutil", _collect_psutil) or {})
    raw["nvml"] = _safe("nvml", _collect_nvml) or {"error": "nvidia-ml-py not installed"}
    if system == "Linux":
        raw["drm"] = _safe("drm", _collect_drm) or []
        raw["proc_cpuinfo"] = _safe("proc cpuinfo", _collect_proc_cpuinfo) or {}
        raw["device_tree_model"] = _read(Path("/proc/device-tree/model"))
    elif system == "Darwin":
        raw["sysctl"] = _safe("sysctl", _collect_sysctl) or {}
    return raw


# ---------------------------------------------------------------- build Hardware from raw facts (pure)


def _gib(value: Any) -> float | None:
    return round(value / GIB, 1) if isinstance(value, (int, float)) and value > 0 else None


def _cpu_brand(raw: dict[str, Any]) -> str | None:
    cpu = raw.get("cpu") or {}
    proc = raw.get("proc_cpuinfo") or {}
    sysctl = raw.get("sysctl") or {}
    brand = cpu.get("brand") or sysctl.get("machdep.cpu.brand_string") or proc.get("model name")
    core = ARM_CPU_PARTS.get(str(proc.get("CPU part", "")).lower())
    board = raw.get("device_tree_model") or proc.get("Model")
    if core and (not brand or brand.lower().startswith(("arm", "cortex"))):
        brand = f"{core} ({board})" if board else core
    if not brand and board:
        brand = board
    return " ".join(str(brand).split()) if brand else None


def _cpu_max_ghz(raw: dict[str, Any], brand: str | None) -> float | None:
    mhz = raw.get("cpu_freq_max_mhz")
    if isinstance(mhz, (int, float)) and mhz > 0:
        return round(mhz / 1000, 2)
    if brand:
        apple = re.search(r"Apple (M\d)", brand)
        if apple and apple.group(1) in APPLE_MAX_GHZ:
            return APPLE_MAX_GHZ[apple.group(1)]
        clock = re.search(r"@\s*([\d.]+)\s*GHz", brand)
        if clock:
            return round(float(clock.group(1)), 2)
    advertised = (raw.get("cpu") or {}).get("hz_advertised")
    if isinstance(advertised, (int, float)) and advertised > 0:
        return round(advertised / 1e9, 2)
    return None


def _is_apple_silicon(raw: dict[str, Any]) -> bool:
    return raw.get("system") == "Darwin" and str(raw.get("machine", "")).lower() in {"arm64", "aarch64"}


def apple_gpu_share(ram_total_gb: float) -> float:
    """The part of unified memory macOS lets the GPU use by default."""
    return APPLE_GPU_SHARE_SMALL if ram_total_gb <= 36 else APPLE_GPU_SHARE_LARGE


def _gpus(raw: dict[str, Any], brand: str | None, ram_total_gb: float | None) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    nvml = raw.get("nvml") or {}
    for gpu in nvml.get("gpus") or []:
        gpus.append(GpuInfo(
            name=gpu.get("name") or "NVIDIA GPU",
            vendor="nvidia",
            vram_total_gb=_gib(gpu.get("memory_total_bytes")),
            vram_free_gb=_gib(gpu.get("memory_free_bytes")),
        ))
    have_nvml = bool(gpus)
    for card in raw.get("drm") or []:
        vendor = PCI_VENDORS.get(str(card.get("vendor_id", "")).lower(), "unknown")
        if vendor == "unknown" or (vendor == "nvidia" and have_nvml):
            continue
        vram = _gib(card.get("vram_total_bytes"))
        device = card.get("device_id") or "?"
        product = card.get("product_name")
        if vendor == "nvidia":
            gpus.append(GpuInfo(name=product or f"NVIDIA GPU {device} (NVML unavailable)", vendor="nvidia"))
        elif vendor == "amd":
            integrated = vram is not None and vram < 2
            gpus.append(GpuInfo(
                name=product or f"AMD Radeon {'integrated ' if integrated else ''}GPU {device}",
                vendor="amd",
                vram_total_gb=None if integrated else vram,
                unified_memory=integrated,
            ))
        else:  # intel: integrated unless the driver reports its own VRAM (Arc)
            gpus.append(GpuInfo(
                name=product or (f"Intel Arc GPU {device}" if vram else f"Intel integrated graphics {device}"),
                vendor="intel",
                vram_total_gb=vram,
                unified_memory=vram is None,
            ))
    if _is_apple_silicon(raw):
        chip = brand or "Apple Silicon"
        share = apple_gpu_share(ram_total_gb) if ram_total_gb else None
        gpus.append(GpuInfo(
            name=f"{chip} GPU",
            vendor="apple",
            vram_total_gb=round(ram_total_gb * share, 1) if ram_total_gb and share else None,
            unified_memory=True,
        ))
    return gpus


def build_hardware(raw: dict[str, Any]) -> Hardware:
    """Turn raw facts into the hardware message (pure: tested on snapshots)."""
    sysctl = raw.get("sysctl") or {}
    brand = _cpu_brand(raw)
    physical = raw.get("cpu_physical_cores") or sysctl.get("hw.physicalcpu")
    logical = raw.get("cpu_logical_cores") or sysctl.get("hw.logicalcpu") or physical
    ram_total_gb = _gib(raw.get("ram_total_bytes") or sysctl.get("hw.memsize"))
    arch = raw.get("machine") or (raw.get("cpu") or {}).get("arch")
    system = raw.get("system")
    return Hardware(
        cpu_brand=brand,
        cpu_physical_cores=physical if isinstance(physical, int) and physical > 0 else None,
        cpu_logical_cores=logical if isinstance(logical, int) and logical > 0 else None,
        cpu_max_ghz=_cpu_max_ghz(raw, brand),
        ram_total_gb=ram_total_gb,
        gpus=_gpus(raw, brand, ram_total_gb),
        os=f"{system} {raw.get('release') or ''}".strip() if system else None,
        arch=str(arch).lower() if arch else None,
        hostname=raw.get("hostname"),
    )


# ---------------------------------------------------------------- declared hardware (--hardware-profile)


class DeclaredGpu(BaseModel):
    """One GPU in a hardware profile."""

    model_config = ConfigDict(extra="forbid")

    name: str = "unknown"
    vendor: str = "unknown"
    vram_total_gb: float | None = Field(default=None, ge=0)
    vram_free_gb: float | None = Field(default=None, ge=0)
    unified_memory: bool = False
    memory_bandwidth_gbps: float | None = Field(default=None, ge=0)


class HardwareProfile(BaseModel):
    """A ``--hardware-profile`` file: every field optional; unknown fields are refused (typos).

    The fields are those of the published ``Hardware`` message, so a snapshot taken with
    ``mosquitto_sub`` (less ``v``/``ts``/``benchmark``) can be replayed as a profile.
    """

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    cpu_brand: str | None = None
    cpu_physical_cores: int | None = Field(default=None, ge=1)
    cpu_logical_cores: int | None = Field(default=None, ge=1)
    cpu_max_ghz: float | None = Field(default=None, gt=0)
    ram_total_gb: float | None = Field(default=None, gt=0)
    gpus: list[DeclaredGpu] | None = None
    os: str | None = None
    arch: str | None = None
    hostname: str | None = None

    @property
    def covers_cpu(self) -> bool:
        """True when the slow CPU probe (py-cpuinfo) would add nothing."""
        return self.cpu_brand is not None and self.cpu_max_ghz is not None


def load_profile(path: Path) -> HardwareProfile:
    """Read a profile; raise ValueError with the file name when it is not valid."""
    try:
        return HardwareProfile.model_validate_json(Path(path).read_bytes())
    except OSError as error:
        raise ValueError(f"cannot read hardware profile {path}: {error}") from None
    except ValueError as error:
        raise ValueError(f"invalid hardware profile {path}: {error}") from None


def apply_profile(probed: Hardware, profile: HardwareProfile) -> Hardware:
    """Declared fields win; anything the profile leaves out comes from the probe."""
    declared = profile.model_dump(exclude_none=True, exclude={"description", "gpus"})
    update: dict[str, Any] = {**declared, "declared": True}
    if profile.gpus is not None:
        update["gpus"] = [GpuInfo(**gpu.model_dump()) for gpu in profile.gpus]
    if profile.cpu_physical_cores and not profile.cpu_logical_cores:
        update["cpu_logical_cores"] = profile.cpu_physical_cores  # the probe's count is of another machine
    return probed.model_copy(update=update)


def probe_hardware(profile: HardwareProfile | None = None) -> Hardware:
    """Probe this machine (skipping what the profile already declares) and apply the profile."""
    raw = collect_raw_facts(include_cpuinfo=profile is None or not profile.covers_cpu)
    hardware = build_hardware(raw)
    return apply_profile(hardware, profile) if profile is not None else hardware


# ---------------------------------------------------------------- live GPU load (telemetry)


class GpuMonitor:
    """NVML utilisation and free VRAM for telemetry; ``None`` values where unknown (no NVIDIA, no driver)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as error:  # noqa: BLE001 - no NVIDIA GPU or driver: telemetry says None
            logger.debug("NVML unavailable for telemetry: %s", error)

    def sample(self) -> tuple[float | None, float | None]:
        """(mean GPU utilisation %, total free VRAM GiB) over NVIDIA GPUs."""
        if self._nvml is None or not self._handles:
            return None, None
        utilisations: list[float] = []
        free = 0.0
        have_free = False
        for handle in self._handles:
            rates = _safe("nvml utilization", self._nvml.nvmlDeviceGetUtilizationRates, handle)
            if rates is not None:
                utilisations.append(float(rates.gpu))
            memory = _safe("nvml memory", self._nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                free += memory.free / GIB
                have_free = True
        utilisation = round(sum(utilisations) / len(utilisations), 1) if utilisations else None
        return utilisation, round(free, 2) if have_free else None

    def close(self) -> None:
        if self._nvml is not None:
            _safe("nvml shutdown", self._nvml.nvmlShutdown)
            self._nvml = None


def main() -> None:
    """``python -m agent.hardware [--raw]``: print what the probe sees (to compare with a profile)."""
    logging.basicConfig(level=logging.WARNING)
    raw = collect_raw_facts()
    payload = raw if "--raw" in sys.argv else build_hardware(raw).model_dump(exclude={"v", "ts"})
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + os.linesep)


if __name__ == "__main__":
    main()

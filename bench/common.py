"""What every benchmark shares: goals, the results file, the machine, agent command lines, a broker.

A benchmark is a module with ``run(quick: bool) -> BenchResult`` and a
``main()`` that runs it standalone. Results go to ``bench/results/<name>.json`` (quick runs: ``quick/``)
with the machine they ran on and the load average around the run, because on
a shared 2-core machine an absolute figure means little without the baseline
measured in the same run (every benchmark measures one) and the load.

Child processes, waiting and percentiles are the tests' own (``tests/support/processes.py``): one harness
for the tests, the chaos runs and the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support.processes import REPO, ChildProcess, percentile

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = REPO / "agent" / "profiles"


# ---------------------------------------------------------------- statistics


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """p50 / p95 / p99 / mean / max of ``values`` (rounded), the shape every table uses."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.50), digits),
        "p95": round(percentile(values, 0.95), digits),
        "p99": round(percentile(values, 0.99), digits),
        "mean": round(sum(values) / len(values), digits),
        "max": round(max(values), digits),
    }


# ---------------------------------------------------------------- figures and goals


@dataclass
class Figure:
    """One number of the summary table, with its goal (``op`` is "<=" or ">=") and whether it was met."""

    name: str
    value: float
    unit: str = ""
    op: str | None = None
    limit: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.op is None or self.limit is None or self.value is None or math.isnan(self.value):
            return None if self.op is None else False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    @property
    def goal(self) -> str:
        if self.op is None or self.limit is None:
            return ""
        return f"{'≤' if self.op == '<=' else '≥'} {format_number(self.limit)}{(' ' + self.unit) if self.unit else ''}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["goal"] = self.goal
        data["passed"] = self.passed
        return data


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


@dataclass
class BenchResult:
    """What one benchmark run produced: the table's figures and everything else worth keeping."""

    name: str
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    file: str | None = None
    """Results file name under bench/results/ (default ``<name>.json``)."""

    def add(self, name: str, value: float, unit: str = "", op: str | None = None, limit: float | None = None,
            note: str = "") -> Figure:
        figure = Figure(name, float(value) if value is not None else math.nan, unit, op, limit, note)
        self.figures.append(figure)
        return figure

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.name,
            "mode": "quick" if self.quick else "full",
            "seconds": round(self.seconds, 1),
            "machine": self.machine,
            "error": self.error,
            "figures": [figure.as_dict() for figure in self.figures],
            "details": self.details,
        }


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM and the load average: what docs/benchmarks.md says the figures ran on."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.lower().startswith("model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def results_folder(quick: bool) -> Path:
    """Full-mode results (the figures docs/benchmarks.md quotes) in bench/results/, quick ones in results/quick/."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_result(result: BenchResult) -> Path:
    path = results_folder(result.quick) / (result.file or f"{result.name}.json")
    path.write_text(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
    return path


def print_table(figures: Sequence[tuple[str, Figure]] | Sequence[Figure], title: str | None = None) -> None:
    """One row per figure: bench, figure, value, goal, pass/MISS, and a short note (the baseline it compares to)."""
    rows: list[tuple[str, ...]] = []
    for item in figures:
        bench, figure = item if isinstance(item, tuple) else ("", item)
        unit = f" {figure.unit}" if figure.unit else ""
        verdict = {True: "pass", False: "MISS", None: ""}[figure.passed]
        note = figure.note if len(figure.note) <= 70 else figure.note[:67] + "..."
        rows.append((bench, figure.name, format_number(figure.value) + unit, figure.goal, verdict, note))
    header = ("bench", "figure", "value", "goal", "", "note")
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    if title:
        print(title)  # a benchmark prints figures
    for row in [header, tuple("-" * width for width in widths), *rows]:
        cells = [cell.rjust(width) if index == 2 else cell.ljust(width)
                 for index, (cell, width) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def bench_main(name: str, run: Callable[[bool], BenchResult], description: str | None = None,
               argv: Sequence[str] | None = None) -> BenchResult:
    """The standalone entry point of every benchmark: ``--quick`` (default) or ``--full``; prints and writes JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the short run (default)")
    group.add_argument("--full", action="store_true", help="the long run (docs/benchmarks.md figures)")
    args = parser.parse_args(argv)
    result = timed_run(name, run, quick=not args.full)
    print_table(result.figures, title=f"{name} ({'full' if args.full else 'quick'}, {result.seconds:.0f} s)")
    print(f"wrote {write_result(result)}")  # a benchmark prints figures
    return result


def stop_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, so the ``with``/``finally`` blocks stop every child and broker started."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def timed_run(name: str, run: Callable[[bool], BenchResult], *, quick: bool) -> BenchResult:
    """Run one benchmark, recording the machine and the load before and after; an error is recorded, not raised."""
    stop_on_sigterm()
    machine = machine_info()
    started = time.perf_counter()
    busy_before, own_before = CpuMeter.machine_busy(), _own_cpu()
    try:
        result = run(quick)
    except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
        import traceback

        traceback.print_exc()
        result = BenchResult(name, quick, error=f"{type(error).__name__}: {error}")
    result.seconds = time.perf_counter() - started
    machine["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    busy = (CpuMeter.machine_busy() - busy_before) / result.seconds
    own = (_own_cpu() - own_before) / result.seconds
    # Cores kept busy by other people's work during the run: the figures' context on a shared machine.
    machine["busy_cores_during_run"] = {"all": round(busy, 2), "this_benchmark": round(own, 2),
                                        "others": round(max(0.0, busy - own), 2)}
    result.machine = machine
    return result


def _own_cpu() -> float:
    """CPU seconds of this process and of every child it has waited for (all benchmark children are)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ---------------------------------------------------------------- child processes


def agent_args(broker_url: str, prefix: str, agent_id: str, folder: Path, *, backend: str = "simulated",
               profile: str = "gpu-desktop", tokens_per_s: float | None = None, ttft_ms: float | None = None,
               max_parallel: int | None = None, telemetry_s: float = 1.0, extra: Sequence[str] = ()) -> list[str]:
    """The command line of a real agent process (``python -m agent``)."""
    args = [
        "-m", "agent", "--broker-url", broker_url, "--topic-prefix", prefix, "--agent-id", agent_id,
        "--backend", backend, "--hardware-profile", str(PROFILES / f"{profile}.json"),
        "--data-dir", str(folder / agent_id), "--telemetry-interval-s", str(telemetry_s), "--log-level", "WARNING",
        "--sim-pull-s", "0.1", "--benchmark-tokens", "8",
    ]
    if tokens_per_s is not None:
        args += ["--sim-tokens-per-s", str(tokens_per_s)]
    if ttft_ms is not None:
        args += ["--sim-ttft-ms", str(ttft_ms)]
    if max_parallel is not None:
        args += ["--max-parallel", str(max_parallel)]
    return [*args, *extra]


@contextmanager
def children() -> Iterator[list[ChildProcess]]:
    """A list to add child processes to; all are stopped on the way out, whatever happened."""
    started: list[ChildProcess] = []
    try:
        yield started
    finally:
        for child in started:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        for child in started:
            child.stop()


@contextmanager
def mosquitto() -> Iterator[Any]:
    """A fresh Mosquitto on a free port in a temporary folder (the project's config, persistence off)."""
    from broker.mqtt.local_broker import free_port, start_broker

    with tempfile.TemporaryDirectory(prefix="slb-bench-broker-") as folder:
        broker = start_broker(Path(folder), port=free_port(), prefer="mosquitto",
                              overrides={"persistence": "false", "connection_messages": "false"})
        try:
            yield broker
        finally:
            broker.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (threads included)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU seconds used by given processes (by pid) and by the whole machine over a stretch of wall time."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start: dict[int, float] = {}
        self._wall = 0.0
        self._machine = 0.0

    @staticmethod
    def machine_busy() -> float:
        times = psutil.cpu_times()
        return times.user + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0) + times.nice

    def start(self) -> None:
        self._start = {pid: cpu_seconds(pid) for pid in self.pids}
        self._wall = time.perf_counter()
        self._machine = self.machine_busy()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        used = {pid: cpu_seconds(pid) - before for pid, before in self._start.items()}
        return {
            "wall_s": wall,
            **{f"pid_{pid}_share": value / wall for pid, value in used.items()},
            "machine_busy_cores": (self.machine_busy() - self._machine) / wall,
        }

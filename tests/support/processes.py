"""Child processes, waiting and percentiles: the one harness of the tests, the chaos runs and the benchmarks.

Every child runs ``python <args>`` from the repository root with :func:`child_env` (no ``SLB_`` setting or
``OLLAMA_HOST`` of the caller leaks in, nothing is downloaded), writes its output to a log file, and is
stopped through :func:`broker.mqtt.local_broker.stop_process` (SIGTERM, wait, SIGKILL), by its own pid only.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import TypeVar

from broker.mqtt.local_broker import free_port, stop_process

__all__ = [
    "REPO",
    "AgentProcess",
    "ChildProcess",
    "WaitTimedOut",
    "child_env",
    "free_port",
    "percentile",
    "spawn",
    "stop_in_time",
    "wait_until",
    "wait_until_async",
]

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this repository importable, unbuffered output, offline models, no stray settings.

    ``SLB_*`` and the Ollama variables the agent reads (``OLLAMA_HOST``, ``OLLAMA_NUM_PARALLEL``) are dropped
    so a developer's shell cannot change what a test or benchmark starts.
    """
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("SLB_") and name not in ("OLLAMA_HOST", "OLLAMA_NUM_PARALLEL")}
    env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    env.update(extra)
    return env


@dataclass
class ChildProcess:
    """A child process with its log file; only the pid we started is ever signalled."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` if the process still runs (SIGSTOP / SIGCONT freeze and thaw it)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> float:
        """SIGKILL without waiting (a caller's event loop keeps running); returns when it happened (monotonic)."""
        at = time.monotonic()
        self.signal(SIGKILL)
        return at

    def stop(self, signum: int = SIGTERM, timeout: float = 10.0) -> int | None:
        """Ask it to stop with ``signum``, SIGKILL after ``timeout``; returns the exit code."""
        self.signal(SIGCONT)  # a frozen (SIGSTOP) child cannot act on SIGTERM
        return stop_process(self.process, timeout, signum)

    def log(self, tail: int | None = 4000) -> str:
        """The last ``tail`` characters of its output (all of it for ``None``)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]


class AgentProcess(ChildProcess):
    """A ``python -m agent`` child; its name is its agent id."""

    @property
    def agent_id(self) -> str:
        return self.name


Child = TypeVar("Child", bound=ChildProcess)


def spawn(name: str, args: Sequence[str], folder: Path, *, log_name: str | None = None,
          env: dict[str, str] | None = None, new_session: bool = False,
          kind: type[Child] = ChildProcess, stdin: int = subprocess.DEVNULL) -> Child:  # type: ignore[assignment]
    """Start ``python <args>`` from the repository root; its output goes to ``folder/<name>.log`` (or ``log_name``).

    ``new_session`` puts it in a process group of its own, so a Ctrl-C in the terminal reaches only the
    parent, which then stops its children in order. ``kind``: :class:`AgentProcess` for an agent. ``stdin``:
    ``subprocess.PIPE`` to type into it (the broker's console).
    """
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / (log_name or f"{name}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env if env is not None else child_env(),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=stdin,
                                   start_new_session=new_session)
    return kind(name, process, log_path)


def stop_in_time(process: subprocess.Popen[bytes], timeout: float, describe: Callable[[], str]) -> int | None:
    """SIGTERM ``process`` and wait: its exit code, or a test failure (with ``describe()``) if it took longer than
    ``timeout`` (it is then killed, by :func:`stop_process`, so nothing is left behind)."""
    if process.poll() is not None:
        return process.returncode
    started = time.monotonic()
    code = stop_process(process, timeout)
    if time.monotonic() - started >= timeout:
        raise WaitTimedOut(f"the process did not stop within {timeout:g} s of SIGTERM:\n{describe()}")
    return code


class WaitTimedOut(AssertionError, TimeoutError):
    """A wait ran out: a test failure for pytest, a ``TimeoutError`` for the benchmarks."""


def _timed_out(timeout: float, what: str, last: object, describe: Callable[[], str] | None) -> WaitTimedOut:
    detail = f"; last: {last!r}" if isinstance(last, BaseException) else ""
    context = f"\n{describe()}" if describe is not None else ""
    return WaitTimedOut(f"timed out after {timeout:g} s waiting for {what}{detail}{context}")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, describe: Callable[[], str] | None = None,
               *, interval: float = 0.05, ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; :class:`WaitTimedOut` otherwise.

    ``ignore``: exceptions that mean "not yet" (e.g. an HTTP error while a server starts); ``describe``
    adds context (logs, what is seen) to the timeout message.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except ignore as error:
            last = error
        if last and not isinstance(last, BaseException):
            return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, last, describe)
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], timeout: float, what: str,
                           describe: Callable[[], str] | None = None, *, interval: float = 0.05) -> T:
    """:func:`wait_until` for code on an event loop: the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, None, describe)
        await asyncio.sleep(interval)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

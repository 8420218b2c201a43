"""A real cluster to break: agent processes on the Ollama test double, a coordinator in this event loop.

Why real processes: a SIGKILL must close a real socket so the broker publishes
the agent's last will, exactly as when a machine dies. Why the Ollama double
behind every agent: its answers are deterministic (``reply_text``), so a run
can check the final text of every query to the character.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.coordinator.contract import (
    AgentSwitched,
    AnswerRestarted,
    QueryEvent,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    TextDelta,
)
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.protocol import ChatMessage
from tests.ollama_double import OllamaDouble, reply_text
from tests.support.processes import REPO, AgentProcess, percentile, spawn, wait_until_async

PROFILES = REPO / "agent" / "profiles"
MODEL = "llama3.2:3b"
"""What placement gives the laptop profile every chaos agent declares."""

CLEAR_FAILURE_CODES = {"no_agent", "busy", "timeout", "failed", "cancelled"}
POLL_S = 0.02
"""How often the scenarios look at the coordinator's view while they wait (fine enough for the figures)."""


@dataclass
class QueryOutcome:
    """Everything a caller saw of one query, with timings (monotonic seconds)."""

    request: QueryRequest
    expected: str
    started_at: float
    events: list[QueryEvent] = field(default_factory=list)
    ended_at: float | None = None

    @property
    def final(self) -> QueryFinished | QueryFailed | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, QueryFinished | QueryFailed) else None

    @property
    def streamed(self) -> str:
        """The answer as a caller shows it: text after the last restart (AnswerRestarted voids what came before)."""
        restarts = [index for index, event in enumerate(self.events) if isinstance(event, AnswerRestarted)]
        since = restarts[-1] + 1 if restarts else 0
        return "".join(event.text for event in self.events[since:] if isinstance(event, TextDelta))

    @property
    def switches(self) -> list[AgentSwitched | AnswerRestarted]:
        """Every failover: continued elsewhere (AgentSwitched) or restarted elsewhere (AnswerRestarted)."""
        return [event for event in self.events if isinstance(event, AgentSwitched | AnswerRestarted)]

    @property
    def serving(self) -> str | None:
        """The agent answering right now (after the last switch)."""
        switches = self.switches
        if switches:
            return switches[-1].to_agent
        started = next((event for event in self.events if isinstance(event, QueryStarted)), None)
        return started.agents[0] if started is not None and started.agents else None

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def verdict(self) -> str:
        """``exact`` (complete and correct), ``clear_error``, or what went wrong."""
        final = self.final
        if final is None:
            return "no_final_event"
        if isinstance(final, QueryFinished):
            if final.text != self.expected:
                return "wrong_text"
            if self.streamed != final.text:
                return "stream_differs_from_final"
            return "exact"
        if final.code in CLEAR_FAILURE_CODES and final.error.strip():
            if final.partial_text and not self.expected.startswith(final.partial_text):
                return "wrong_partial_text"
            return "clear_error"
        return f"unclear_error:{final.code}"


@dataclass
class Report:
    """What a scenario measured, and every way in which it fell short."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "figures": self.figures, "problems": self.problems}


def summary(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 / max / mean, rounded for reports (None for no values)."""
    if not values:
        return {"p50": None, "p95": None, "max": None, "mean": None}
    return {
        "p50": round(percentile(values, 0.5), 3),
        "p95": round(percentile(values, 0.95), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


class Cluster:
    """Agents (child processes) on one Ollama double, plus an in-process coordinator."""

    def __init__(
        self,
        broker_url: str,
        topic_prefix: str,
        folder: Path,
        *,
        double: OllamaDouble,
        telemetry_s: float = 0.5,
        keepalive_s: int = 4,
        agent_extra: list[str] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.topic_prefix = topic_prefix
        self.folder = folder
        self.double = double
        self.telemetry_s = telemetry_s
        self.keepalive_s = keepalive_s
        self.agent_extra = list(agent_extra or [])
        self.agents: dict[str, AgentProcess] = {}
        self.retired: list[AgentProcess] = []
        self.coordinator: Coordinator | None = None
        folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ agents

    def spawn(self, agent_id: str, *extra: str, backend_url: str | None = None) -> AgentProcess:
        """Start (or restart) an agent with this id; the previous process of that id must be dead."""
        previous = self.agents.get(agent_id)
        if previous is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                previous.process.wait(10)
            if previous.alive():
                raise RuntimeError(f"agent {agent_id} is still running")
            self.retired.append(previous)
        data_dir = self.folder / agent_id
        command = [
            "-m", "agent",
            "--broker-url", self.broker_url,
            "--topic-prefix", self.topic_prefix,
            "--agent-id", agent_id,
            "--data-dir", str(data_dir),
            "--backend", "ollama",
            "--backend-url", backend_url or self.double.url,
            "--hardware-profile", str(PROFILES / "laptop.json"),
            "--telemetry-interval-s", str(self.telemetry_s),
            "--backend-check-interval-s", "1",
            "--backend-retry-max-s", "1",
            "--benchmark-tokens", "2",
            "--mqtt-keepalive", str(self.keepalive_s),
            "--max-parallel", "8",
            *self.agent_extra,
            *extra,
        ]
        handle = spawn(agent_id, command, data_dir, log_name=f"agent-{len(self.retired)}-{time.monotonic_ns()}.log",
                       new_session=True, kind=AgentProcess)
        self.agents[agent_id] = handle
        return handle

    # ------------------------------------------------------------------ coordinator

    def coordinator_settings(self, **overrides: Any) -> CoordinatorSettings:
        values: dict[str, Any] = dict(
            broker_url=self.broker_url, topic_prefix=self.topic_prefix, data_dir=self.folder / "coordinator",
            replan_debounce_s=0.3, placement_mix=False, expected_output_tokens=40, stall_first_token_s=6.0,
            stall_between_chunks_s=3.0, admission_wait_s=10.0, cooldown_s=1.0, max_failovers=3,
            mqtt_keepalive=self.keepalive_s,
        )
        values.update(overrides)
        return CoordinatorSettings(**values)

    async def start_coordinator(self, **overrides: Any) -> Coordinator:
        coordinator = Coordinator(self.coordinator_settings(**overrides))
        await coordinator.start()
        if not await coordinator.wait_connected(20):
            raise RuntimeError(f"coordinator did not connect to {self.broker_url}")
        self.coordinator = coordinator
        return coordinator

    def ready_agents(self) -> list[str]:
        """Agents the coordinator sees online with the model ready."""
        assert self.coordinator is not None
        return sorted(agent.id for agent in self.coordinator.snapshot().agents
                      if agent.online and agent.model_state == "ready" and agent.model == MODEL)

    def is_online(self, agent_id: str) -> bool:
        assert self.coordinator is not None
        return any(agent.id == agent_id and agent.online for agent in self.coordinator.snapshot().agents)

    async def wait_ready(self, count: int, timeout: float = 60.0, agent_ids: set[str] | None = None) -> None:
        def enough() -> bool:
            ready = set(self.ready_agents())
            return (agent_ids <= ready) if agent_ids is not None else len(ready) >= count

        await wait_until_async(enough, timeout, f"{count} ready agent(s)", self.describe, interval=POLL_S)

    def describe(self) -> str:
        """Who is alive and what the coordinator sees, plus the agents' log tails (for failure messages)."""
        lines = []
        if self.coordinator is not None:
            for agent in self.coordinator.snapshot().agents:
                lines.append(f"  {agent.id}: online={agent.online} model={agent.model} state={agent.model_state}")
        for handle in self.agents.values():
            lines.append(f"--- {handle.agent_id} alive={handle.alive()}\n{handle.log(1500)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ queries

    def request(self, prompt: str, *, timeout_s: float | None = None, mode: str = "auto") -> QueryRequest:
        return QueryRequest(messages=[ChatMessage(role="user", content=prompt)], mode=mode, timeout_s=timeout_s)

    def expected(self, prompt: str) -> str:
        return reply_text(prompt, self.double.config.reply_tokens)

    async def run_query(self, request: QueryRequest, on_event: Callable[[QueryOutcome], Any] | None = None,
                        ) -> QueryOutcome:
        """Stream one query to its end; ``on_event`` sees the outcome after each event (may await)."""
        assert self.coordinator is not None
        outcome = QueryOutcome(request, self.expected(request.messages[-1].content), time.monotonic())
        async for event in self.coordinator.query(request):
            outcome.events.append(event)
            if on_event is not None:
                result = on_event(outcome)
                if asyncio.iscoroutine(result):
                    await result
        outcome.ended_at = time.monotonic()
        return outcome

    # ------------------------------------------------------------------ teardown

    async def close(self) -> None:
        if self.coordinator is not None:
            # A coordinator that fails to stop must not keep the agents below running; the report has the findings.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.coordinator.stop(), 15)
            self.coordinator = None
        for handle in [*self.agents.values(), *self.retired]:
            if handle.alive():
                handle.stop()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")

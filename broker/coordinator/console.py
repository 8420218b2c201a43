"""The original design's server console: type a prompt and watch the cluster answer.

Commands: ``reassign``, ``plan`` (what-if), ``stats``, ``mode`` (a routing
mode or a model name), ``aggregation`` (how mode ``all`` combines answers),
``help``, ``quit``; :data:`HELP` lists them with their choices. Anything else
is a prompt. Standard input is read by a daemon thread with ``os.read`` (never
on the event loop, and no buffered-stdin lock at exit); at end of input the
console goes quiet and the coordinator keeps running until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import TextIO

from broker.coordinator.contract import (
    AGGREGATIONS,
    ROUTING_MODES,
    AgentFinished,
    AgentSwitched,
    AgentView,
    Aggregation,
    AnswerRestarted,
    ClusterSnapshot,
    PlanView,
    QueryFailed,
    QueryFinished,
    QueryRequest,
    QueryStarted,
    RoutingMode,
    TextDelta,
)
from broker.coordinator.runtime import Coordinator
from broker.protocol import ChatMessage

logger = logging.getLogger(__name__)

HELP = f"""commands:
  <prompt>                  ask the cluster
  mode {'|'.join(ROUTING_MODES)}|M   how to route the next prompts (M: a model name)
  aggregation {'|'.join(AGGREGATIONS)}   how '{RoutingMode.ALL}' combines answers
  reassign                  re-plan model placement now
  plan                      show what a re-plan would do, without doing it
  stats                     agents, models, load and counters
  quit                      stop the coordinator"""


async def stdin_lines(fd: int = 0) -> AsyncIterator[str]:
    """Lines from ``fd`` without blocking the loop; ends at end of input or when the fd is closed."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, data or None)
            except RuntimeError:  # loop closed
                return
            if not data:
                return

    threading.Thread(target=reader, name="console-stdin", daemon=True).start()
    pending = b""
    while (data := await queue.get()) is not None:
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", errors="replace")


class Console:
    """Reads commands and prompts; writes answers to ``out`` (the only place the broker prints)."""

    def __init__(self, coordinator: Coordinator, stop: asyncio.Event, out: TextIO = sys.stdout,
                 interactive: bool = False) -> None:
        self.coordinator = coordinator
        self.stop = stop
        self.out = out
        self.interactive = interactive
        self.mode: str = RoutingMode.AUTO.value
        self.aggregation = Aggregation.CONSENSUS

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def prompt(self) -> None:
        if self.interactive:
            self.write(f"[{self.mode}]> ")

    async def run(self, lines: AsyncIterator[str]) -> None:
        self.prompt()
        async for line in lines:
            if self.stop.is_set():
                return
            try:
                await self.handle(line.strip())
            except Exception:  # noqa: BLE001 - a console bug must not stop the coordinator
                logger.exception("console command failed")
            if self.stop.is_set():
                return
            self.prompt()
        logger.info("standard input closed; the coordinator keeps running until SIGTERM or SIGINT")

    async def handle(self, line: str) -> None:
        if not line:
            return
        command, _, argument = line.partition(" ")
        command = command.lower()
        if command in ("quit", "exit"):
            self.stop.set()
        elif command == "help":
            self.write(HELP + "\n")
        elif command == "reassign":
            self.write(format_plan(await self.coordinator.reassign()))
        elif command == "plan":
            self.write(format_plan(self.coordinator.plan()))
        elif command == "stats":
            self.write(format_stats(self.coordinator.snapshot(), self.coordinator))
        elif command == "mode" and argument.strip():
            self.mode = argument.strip()
            known = ROUTING_MODES + tuple(self.coordinator.model_names())
            note = "" if self.mode in known else " (no agent serves that model right now)"
            self.write(f"mode: {self.mode}{note}\n")
        elif command == "aggregation" and argument.strip() in AGGREGATIONS:
            self.aggregation = Aggregation(argument.strip())
            self.write(f"aggregation: {self.aggregation}\n")
        else:
            await self.ask(line)

    async def ask(self, prompt: str) -> None:
        request = QueryRequest(messages=[ChatMessage(role="user", content=prompt)], mode=self.mode,
                               aggregation=self.aggregation)
        stream = self.coordinator.query(request)
        try:
            async for event in stream:
                if self.stop.is_set():
                    break
                if isinstance(event, QueryStarted):
                    self.write(f"[{', '.join(f'{a} ({m})' for a, m in zip(event.agents, event.models, strict=False))}]"
                               f"\n")
                elif isinstance(event, TextDelta):
                    self.write(event.text)
                elif isinstance(event, AgentSwitched):
                    self.write(f"\n[{event.from_agent} failed ({event.reason}); {event.to_agent} continues]\n")
                elif isinstance(event, AnswerRestarted):
                    self.write(f"\n[{event.from_agent} failed ({event.reason}); {event.to_agent} cannot continue "
                               f"that answer and starts over: the {event.discarded_chars} characters above are "
                               f"void]\n")
                elif isinstance(event, AgentFinished):
                    answer = event.answer
                    status = f"error: {answer.error}" if answer.error else "done"
                    self.write(f"\n--- {answer.agent_id} ({answer.model}), {status}\n{answer.text}\n")
                elif isinstance(event, QueryFinished):
                    self.write(format_finished(event))
                elif isinstance(event, QueryFailed):
                    partial = f"\n(partial answer: {event.partial_text})" if event.partial_text else ""
                    self.write(f"\nerror ({event.code}): {event.error}{partial}\n")
        finally:
            await stream.aclose()


def format_finished(event: QueryFinished) -> str:
    lines = []
    if event.mode == RoutingMode.ALL:
        agreement = f", agreement {event.agreement:.2f}" if event.agreement is not None else ""
        lines.append(f"\n=== combined ({event.aggregation}{agreement}; {event.combined_by})\n{event.text}")
    stats = event.stats
    figures = [f"{event.latency_s:.2f} s" if event.latency_s is not None else ""]
    if stats is not None:
        if stats.ttft_s is not None:
            figures.append(f"first token {stats.ttft_s:.2f} s")
        if stats.output_tokens is not None:
            figures.append(f"{stats.output_tokens} tokens")
        if stats.tokens_per_s:
            figures.append(f"{stats.tokens_per_s:.1f} tok/s")
        if stats.finish_reason:
            figures.append(f"finish: {stats.finish_reason}")
    if event.failovers:
        figures.append(f"{event.failovers} failover(s)")
    lines.append(f"\n[{', '.join(f for f in figures if f)}]\n")
    return "\n".join(lines)


def format_plan(plan: PlanView) -> str:
    lines = [f"plan ({'applied' if plan.applied else 'what-if, not applied'}):"]
    for entry in plan.entries:
        arrow = "→" if entry.change else "="
        flag = " (deferred)" if entry.deferred else ""
        lines.append(f"  {entry.agent_id}: {entry.current_model or '-'} {arrow} {entry.target_model}{flag}"
                     f"  [{entry.reason}]")
    for agent_id, reason in sorted(plan.excluded.items()):
        lines.append(f"  {agent_id}: excluded  [{reason}]")
    if len(lines) == 1:
        lines.append("  (no agents)")
    return "\n".join(lines) + "\n"


def format_stats(snapshot: ClusterSnapshot, coordinator: Coordinator) -> str:
    lines = [f"broker {'connected' if snapshot.connected else 'DISCONNECTED'}; ready models: "
             f"{', '.join(snapshot.ready_models) or 'none'}; servable: {', '.join(snapshot.servable_models) or 'none'}"]
    for agent in snapshot.agents:
        speed = f"{agent.tokens_per_s:.1f} tok/s" if agent.tokens_per_s else "- tok/s"
        progress = f" {agent.model_progress:.0%}" if agent.model_state == "pulling" and agent.model_progress else ""
        lines.append(
            f"  {agent.id:<20} {'online ' if agent.online else 'offline'} score {agent.score or 0:5.1f}  "
            f"{agent.model or '-'} ({agent.model_state or '-'}{progress})  jobs {agent.jobs_running}+"
            f"{agent.jobs_queued}  {speed}{'  SIMULATED' if agent.simulated else ''}"
            f"{'  cooling down' if agent.cooling_down else ''}{trust_summary(agent)}"
            f"{runtime_summary(agent.runtime, agent.slots)}")
    totals: dict[str, float] = {}
    for metric in coordinator.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name in ("slb_queries_total", "slb_failovers_total", "slb_output_tokens_total"):
                totals[sample.name] = totals.get(sample.name, 0) + sample.value
    lines.append(f"  queries {totals.get('slb_queries_total', 0):.0f}, failovers "
                 f"{totals.get('slb_failovers_total', 0):.0f}, output tokens "
                 f"{totals.get('slb_output_tokens_total', 0):.0f}")
    return "\n".join(lines) + "\n"


def trust_summary(agent: AgentView) -> str:
    """``  QUARANTINED (280 s left): 3 strike(s) in 600 s; last: empty answer…`` or ``  1 strike(s)``."""
    if agent.quarantined:
        return f"  QUARANTINED ({agent.quarantine_left_s or 0:.0f} s left): {agent.quarantine_reason}"
    return f"  {agent.strikes} strike(s)" if agent.strikes else ""


def runtime_summary(runtime: dict[str, object], slots: int | None) -> str:
    """``  [llama-cpp-python 0.3.36, 1 slot measured, restarts on failover]`` for the stats table."""
    if not runtime:
        return ""
    prefill = {True: "continues on failover", False: "restarts on failover"}.get(runtime.get("continues_prefill"),
                                                                               "prefill not probed")
    version = f" {runtime['version']}" if runtime.get("version") else ""
    return f"  [{runtime.get('kind')}{version}, {slots} slot(s) {runtime.get('slots_source')}, {prefill}]"

"""The fault scenarios, each a coroutine returning figures and a list of problems (empty when all held).

The in-suite tests call them with a few trials and assert ``problems == []``;
``python -m tests.chaos`` calls them with many and records the figures.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from agent.agent import Agent
from agent.settings import AgentSettings
from broker.coordinator.contract import QueryFinished, TextDelta
from broker.mqtt.local_broker import RunningBroker
from broker.mqtt.settings import MqttSettings
from broker.protocol import Assign, TopicKind
from tests.chaos.harness import POLL_S, Cluster, QueryOutcome, Report, summary
from tests.ollama_double import OllamaDouble
from tests.support.loops import AgentThread
from tests.support.processes import wait_until_async
from tests.test_agent_harness import Watcher

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def prompt_for(rng: random.Random, label: str) -> str:
    return f"{label} " + " ".join(rng.sample(WORDS, 6))


def check_outcome(report: Report, outcome: QueryOutcome, label: str, limit_s: float | None = None) -> str:
    """Record a problem unless the query ended exactly right or with a clear error (in time)."""
    verdict = outcome.verdict()
    if verdict not in ("exact", "clear_error"):
        final = outcome.final
        report.problem(f"{label}: {verdict}: expected {outcome.expected!r}, streamed {outcome.streamed!r}, "
                       f"final {final!r}")
    if limit_s is not None and outcome.duration is not None and outcome.duration > limit_s:
        report.problem(f"{label}: took {outcome.duration:.2f} s, more than the {limit_s:.2f} s allowed")
    return verdict


# ---------------------------------------------------------------------------- 1. agent SIGKILL mid-stream


class _KillPlan:
    """Kill the answering agent once ``kill_after`` pieces of text have arrived; time when the coordinator knows.

    ``freeze`` stops the process (SIGSTOP) instead: a power cut or a pulled cable, where no TCP FIN reaches
    the broker and only the keepalive (1.5x) or missing telemetry can tell.
    """

    def __init__(self, cluster: Cluster, kill_after: int, freeze: bool = False) -> None:
        self.cluster = cluster
        self.kill_after = kill_after
        self.freeze = freeze
        self.victim: str | None = None
        self.killed_at = 0.0
        self.detection: asyncio.Task[float] | None = None

    async def on_event(self, outcome: QueryOutcome) -> None:
        if self.victim is not None or outcome.final is not None:
            return
        if sum(1 for event in outcome.events if isinstance(event, TextDelta)) < self.kill_after:
            return
        victim = outcome.serving
        if victim is None or victim not in self.cluster.agents:
            return
        self.victim = victim
        if self.freeze:
            self.killed_at = time.monotonic()
            self.cluster.agents[victim].signal(signal.SIGSTOP)
        else:
            self.killed_at = self.cluster.agents[victim].kill()
        self.detection = asyncio.create_task(self._seen_offline(victim))

    async def _seen_offline(self, victim: str) -> float:
        await wait_until_async(lambda: not self.cluster.is_online(victim), 3 * self.cluster.keepalive_s,
                               f"{victim} seen offline", interval=0.005)
        return time.monotonic()


async def agent_kill(cluster: Cluster, trials: int, *, seed: int = 1, reply_tokens: int = 40, freeze_every: int = 0,
                     log: Any = None) -> Report:
    """Kill the answering agent mid-answer, ``trials`` times; each query must finish elsewhere or fail clearly.

    Every ``freeze_every``-th trial freezes the agent (SIGSTOP) instead of killing it.
    """
    report = Report("agent_kill")
    rng = random.Random(seed)
    cluster.double.config.reply_tokens = reply_tokens
    assert cluster.coordinator is not None
    keepalive = cluster.keepalive_s
    detections: dict[str, list[float]] = {"sigkill": [], "freeze": []}
    durations: list[float] = []
    verdicts: dict[str, int] = {}
    failovers = 0
    not_killed = 0
    for trial in range(trials):
        await cluster.wait_ready(2, timeout=90)
        freeze = bool(freeze_every) and trial % freeze_every == freeze_every - 1
        plan = _KillPlan(cluster, kill_after=rng.randint(1, 8), freeze=freeze)
        outcome = await cluster.run_query(cluster.request(prompt_for(rng, f"trial {trial}"), timeout_s=60),
                                          plan.on_event)
        label = f"trial {trial}"
        verdict = check_outcome(report, outcome, label, limit_s=61)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        if outcome.duration is not None:
            durations.append(outcome.duration)
        final = outcome.final
        if isinstance(final, QueryFinished) and final.failovers:
            failovers += 1
        if plan.victim is None or plan.detection is None:
            not_killed += 1
            continue
        victim = plan.victim
        try:
            seen = await plan.detection - plan.killed_at
            detections["freeze" if freeze else "sigkill"].append(seen)
            if seen > 1.5 * keepalive:
                report.problem(f"{label}: the coordinator saw {victim} gone after {seen:.2f} s "
                               f"(> 1.5 x keepalive {keepalive} s)")
        except AssertionError as error:
            report.problem(f"{label}: {error}")
        if isinstance(final, QueryFinished) and final.agents and final.agents[-1] == victim:
            report.problem(f"{label}: the killed agent {victim} is named as the one that finished")
        if freeze:
            cluster.agents[victim].kill()  # SIGKILL ends a stopped process too
        cluster.spawn(victim)
        if log is not None and (trial + 1) % 10 == 0:
            log(f"agent_kill: {trial + 1}/{trials} trials, verdicts {verdicts}")
    report.figures = {
        "trials": trials,
        "killed_mid_answer": trials - not_killed,
        "finished_before_the_kill": not_killed,
        "completed_exact": verdicts.get("exact", 0),
        "clear_errors": verdicts.get("clear_error", 0),
        "other": {key: value for key, value in verdicts.items() if key not in ("exact", "clear_error")},
        "answers_with_failover": failovers,
        "frozen_instead_of_killed": sum(1 for trial in range(trials) if freeze_every
                                        and trial % freeze_every == freeze_every - 1),
        "detection_s": {kind: summary(values) for kind, values in detections.items()},
        "keepalive_s": keepalive,
        "query_s": summary(durations),
    }
    if not_killed > max(1, trials // 5):
        report.problem(f"{not_killed} of {trials} answers finished before the kill: the scenario tested too little")
    return report


# ---------------------------------------------------------------------------- 2. broker SIGKILL and restart


async def broker_restart(cluster: Cluster, broker: RunningBroker, *, queries: int = 20, outage_s: float = 1.0,
                         timeout_s: float = 30.0, rounds: int = 1, seed: int = 2, log: Any = None) -> Report:
    """Kill the broker while ``queries`` answers stream, restart it after ``outage_s``; repeat ``rounds`` times."""
    report = Report("broker_restart")
    rng = random.Random(seed)
    cluster.double.config.reply_tokens = 60
    assert cluster.coordinator is not None
    verdicts: dict[str, int] = {}
    durations: list[float] = []
    back_after: list[float] = []
    agent_ids = set(cluster.agents)
    for round_ in range(rounds):
        await cluster.wait_ready(len(agent_ids), timeout=120, agent_ids=agent_ids)
        live: list[QueryOutcome] = []

        def track(outcome: QueryOutcome, live: list[QueryOutcome] = live) -> None:
            if outcome not in live:
                live.append(outcome)

        tasks = [asyncio.create_task(cluster.run_query(
            cluster.request(prompt_for(rng, f"round {round_} query {index}"), timeout_s=timeout_s), track))
            for index in range(queries)]
        try:
            await wait_until_async(lambda live=live: sum(1 for o in live if o.streamed) >= queries * 0.6, 30,
                                   "most queries streaming", cluster.describe, interval=POLL_S)
        except AssertionError as error:
            report.problem(f"round {round_}: {error}")
        broker.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(outage_s)  # the outage itself
        await asyncio.to_thread(broker.start)
        restarted_at = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=timeout_s + 10)
        for task in pending:
            report.problem(f"round {round_}: a query was still running {timeout_s + 10:g} s after the restart")
            task.cancel()
        for index, task in enumerate(tasks):
            if task not in done or task.cancelled() or task.exception() is not None:
                if task in done and not task.cancelled() and task.exception() is not None:
                    report.problem(f"round {round_} query {index}: raised {task.exception()!r}")
                continue
            outcome = task.result()
            verdict = check_outcome(report, outcome, f"round {round_} query {index}", limit_s=timeout_s + 1)
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            if outcome.duration is not None:
                durations.append(outcome.duration)
        try:
            await wait_until_async(lambda: set(cluster.ready_agents()) >= agent_ids, 60, "every agent back and ready",
                                   cluster.describe, interval=POLL_S)
            back_after.append(time.monotonic() - restarted_at)
        except AssertionError as error:
            report.problem(f"round {round_}: {error}")
        fresh = await cluster.run_query(cluster.request(prompt_for(rng, f"after round {round_}"), timeout_s=30))
        if fresh.verdict() != "exact":
            report.problem(f"round {round_}: a query after the restart ended {fresh.verdict()}: {fresh.final!r}")
        if log is not None:
            log(f"broker_restart: round {round_ + 1}/{rounds}: outage {restarted_at - killed_at:.1f} s, "
                f"verdicts {verdicts}")
    # An agent restarted after the broker lost its retained messages must still get its model.
    victim = sorted(agent_ids)[0]
    cluster.agents[victim].stop()
    await wait_until_async(lambda: not cluster.is_online(victim), 20, f"{victim} offline", cluster.describe,
                           interval=POLL_S)
    cluster.spawn(victim)
    try:
        await cluster.wait_ready(1, timeout=60, agent_ids={victim})
    except AssertionError as error:
        report.problem(f"an agent restarted after the broker restart never got its model back: {error}")
    failed = verdicts.get("clear_error", 0)
    if failed > 0.1 * rounds * queries:
        report.problem(f"{failed} of {rounds * queries} queries failed: a {outage_s:g} s broker outage should "
                       "delay answers, not lose them (the agents keep generating)")
    report.figures = {
        "rounds": rounds,
        "queries": rounds * queries,
        "completed_exact": verdicts.get("exact", 0),
        "clear_errors": verdicts.get("clear_error", 0),
        "other": {key: value for key, value in verdicts.items() if key not in ("exact", "clear_error")},
        "outage_s": outage_s,
        "query_timeout_s": timeout_s,
        "query_s": summary(durations),
        "all_agents_ready_after_restart_s": summary(back_after),
    }
    return report


# ---------------------------------------------------------------------------- 6. backend stalls


async def backend_stall(cluster: Cluster, stuck: OllamaDouble, *, agent_stall_s: float = 2.0, seed: int = 3,
                        trials: int = 1) -> Report:
    """A backend that stalls before its first token, then one that stalls mid-answer: the stall timer fires.

    The cluster holds ``healthy`` (on ``cluster.double``) and ``stuck`` (on ``stuck``); both agents run with
    ``--stall-timeout-s agent_stall_s``. Each query that starts on ``stuck`` must fail over to ``healthy``
    and finish exactly; with only ``stuck`` left, the query fails clearly within its deadline + 1 s.
    """
    report = Report("backend_stall")
    rng = random.Random(seed)
    cluster.double.config.reply_tokens = 30
    stuck.config.reply_tokens = 30
    assert cluster.coordinator is not None
    reaction: dict[str, list[float]] = {"before_first_token": [], "mid_answer": []}
    verdicts: dict[str, int] = {}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("before_first_token", {"stall_before_first_token_s": 600.0, "stall_after_tokens": None}),
        ("mid_answer", {"stall_before_first_token_s": 0.0, "stall_after_tokens": 5, "stall_s": 600.0}),
    ]
    for trial in range(trials):
        for case, settings in cases:
            await cluster.wait_ready(2, timeout=60, agent_ids={"healthy", "stuck"})  # models warm before stalling
            for name, value in settings.items():
                setattr(stuck.config, name, value)
            outcome = None
            for attempt in range(8):  # routing decides; ask until a query starts on the stuck agent
                outcome = await cluster.run_query(
                    cluster.request(prompt_for(rng, f"{case} {trial}.{attempt}"), timeout_s=30))
                if outcome.events and getattr(outcome.events[0], "agents", [None])[0] == "stuck":
                    break
                check_outcome(report, outcome, f"{case}: query on the healthy agent")
            assert outcome is not None
            label = f"{case} trial {trial}"
            if not outcome.switches:
                report.problem(f"{label}: never started on the stuck agent, or no failover: {outcome.final!r}")
                continue
            switch = outcome.switches[0]
            if "stalled" not in switch.reason:
                report.problem(f"{label}: failover reason {switch.reason!r} does not say stalled")
            verdict = check_outcome(report, outcome, label, limit_s=30 + 1)
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            if verdict != "exact":
                report.problem(f"{label}: expected an exact answer after failover, got {verdict}")
            if outcome.duration is not None:
                reaction[case].append(outcome.duration)
                if outcome.duration > agent_stall_s + 6:
                    report.problem(f"{label}: took {outcome.duration:.1f} s; the stall timer is {agent_stall_s} s")
    # With no agent to fail over to: a clear error within the deadline + 1 s.
    stuck.config.stall_before_first_token_s = 600.0
    stuck.config.stall_after_tokens = None
    cluster.agents["healthy"].stop()
    await wait_until_async(lambda: not cluster.is_online("healthy"), 20, "healthy offline", cluster.describe,
                           interval=POLL_S)
    alone: dict[str, Any] = {}
    for case, deadline_s in (("stall_first", agent_stall_s + 1.0), ("deadline_first", agent_stall_s * 0.75)):
        outcome = await cluster.run_query(cluster.request(prompt_for(rng, f"alone {case}"), timeout_s=deadline_s))
        verdict = check_outcome(report, outcome, f"stuck agent alone, {case}", limit_s=deadline_s + 1)
        if verdict != "clear_error":
            report.problem(f"stuck agent alone, {case}: expected a clear error, got {verdict}: {outcome.final!r}")
        alone[case] = {"deadline_s": deadline_s, "took_s": round(outcome.duration or -1, 3),
                       "code": getattr(outcome.final, "code", None), "error": getattr(outcome.final, "error", None)}
    report.figures = {
        "trials": trials,
        "agent_stall_timeout_s": agent_stall_s,
        "failover_query_s": {case: summary(values) for case, values in reaction.items()},
        "verdicts": verdicts,
        "alone": alone,
    }
    return report


# ---------------------------------------------------------------------------- 7. broker unreachable for long


async def broker_outage(broker: RunningBroker, topic_prefix: str, folder: Path, *, outage_s: float = 20.0,
                        telemetry_s: float = 0.5, log: Any = None) -> Report:
    """The broker is gone for ``outage_s``: the agent's queue stays bounded, memory flat, telemetry comes back."""
    report = Report("broker_outage")
    settings = MqttSettings(broker_url=broker.url, topic_prefix=topic_prefix)
    watcher = Watcher(settings, topic_prefix)
    agent_id = f"outage-{uuid.uuid4().hex[:6]}"
    agent = Agent(AgentSettings(
        broker_url=broker.url, topic_prefix=topic_prefix, agent_id=agent_id, backend="simulated",
        data_dir=folder / agent_id, telemetry_interval_s=telemetry_s, sim_tokens_per_s=400, sim_ttft_ms=0,
        sim_pull_s=0, chunk_interval_ms=0, chunk_max_tokens=1, benchmark_tokens=0, mqtt_keepalive=2,
    ))
    runner = AgentThread(agent)
    try:
        if not await asyncio.to_thread(runner.start, 30):
            report.problem("the agent did not connect")
            return report
        watcher.publish(watcher.topics.assign(agent_id), Assign(model="llama3.2:1b", assignment_id="o1"), retain=True)
        await asyncio.to_thread(watcher.wait_for, TopicKind.MODEL, agent_id, lambda m: m.state == "ready",
                                timeout=30, what="model ready")
        connection = agent.connection
        assert connection is not None
        limit = connection._max_offline_queue
        # A job that keeps producing result chunks through the first seconds of the outage (~1 per token).
        tokens = int(400 * min(outage_s * 0.4, 10)) + limit
        watcher.send_job(agent_id, "outage-job", "talk through the outage", deadline_in=outage_s + 60,
                         options={"num_predict": tokens})
        await asyncio.to_thread(watcher.wait_for, TopicKind.RESULT, agent_id, lambda r: r.request_id == "outage-job",
                                timeout=20, what="first chunk")
        broker.kill()
        killed_at = time.monotonic()
        tracemalloc.start(1)
        longest_queue = 0
        samples: list[tuple[float, int]] = []
        while time.monotonic() - killed_at < outage_s:
            longest_queue = max(longest_queue, connection.offline_queue_length)
            if agent.jobs is not None and agent.jobs.running == 0:  # the job is over: only telemetry remains
                samples.append((time.monotonic() - killed_at, tracemalloc.get_traced_memory()[0]))
            await asyncio.sleep(0.25)
        tracemalloc.stop()
        dropped = connection.offline_dropped
        if longest_queue > limit:
            report.problem(f"offline queue reached {longest_queue} messages; its limit is {limit}")
        if dropped == 0:
            report.problem(f"the job produced {tokens} chunks during the outage yet nothing was dropped")
        growth = None
        if len(samples) >= 8:
            quarter = len(samples) // 4
            first = sum(value for _, value in samples[:quarter]) / quarter
            last = sum(value for _, value in samples[-quarter:]) / quarter
            growth = last - first
            if growth > 512 * 1024:
                report.problem(f"memory grew {growth / 1024:.0f} KiB while disconnected and idle")
        else:
            report.problem(f"too few idle samples ({len(samples)}) to judge memory: the job outlived the outage")
        since = watcher.mark()
        await asyncio.to_thread(broker.start)
        restarted_at = time.monotonic()
        reconnect_max = connection._reconnect[1]
        try:
            await asyncio.to_thread(watcher.wait_for, TopicKind.TELEMETRY, agent_id, since=since,
                                    timeout=reconnect_max + telemetry_s + 5, what="telemetry after the outage")
            resumed = time.monotonic() - restarted_at
        except AssertionError as error:
            report.problem(str(error))
            resumed = None
        if connection.offline_queue_length:
            report.problem(f"{connection.offline_queue_length} messages still queued after reconnecting")
        report.figures = {
            "outage_s": outage_s,
            "offline_queue_limit": limit,
            "offline_queue_longest": longest_queue,
            "offline_dropped_oldest": dropped,
            "idle_memory_growth_kib": None if growth is None else round(growth / 1024, 1),
            "idle_memory_samples": len(samples),
            "telemetry_resumed_after_s": None if resumed is None else round(resumed, 2),
            "reconnect_backoff_max_s": reconnect_max,
        }
        if log is not None:
            log(f"broker_outage: {report.figures}")
        return report
    finally:
        await asyncio.to_thread(runner.stop, 10)
        watcher.close()

"""Takeover: two coordinators on one Mosquitto, the leader killed with SIGKILL ten times (issue 16).

Default (``--apps``): two real ``python -m app`` instances (each its own port and data dir) and two simulated
agents. Each round, ``/v1/chat/completions`` queries go to the instance that will survive, back to back (every
other one streamed), from a second before the kill until the takeover is two seconds old; the leader is killed;
the takeover is the time from the kill to the survivor's retained leader record (seen by a test-side
subscriber). The killed one is then started again and asked a query the moment its ``/health`` answers (a
front end that has just started waits for the cluster's state rather than failing), then stands by; the next
round kills the other. Counted: takeover p50/p95/max, queries sent and lost (failed) during the rounds, their
latency, first queries to a restarted instance that failed, and assignments whose model or id changed (the new
leader only re-stamps them with its epoch).

``--console``: the same with two ``python -m broker`` console coordinators, prompts typed on the survivor's
console (the session-3 figures; writes ``takeover_console.json``).

    python -m bench.bench_takeover [--full] [--apps | --console]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchResult, bench_main, mosquitto, spread
from broker.mqtt.local_broker import RunningBroker
from broker.mqtt.settings import MqttSettings
from tests.app_support import RunningApp
from tests.support.processes import wait_until
from tests.test_app_takeover import (
    CLAIM_WINDOW_S,
    KEEPALIVE,
    NAMES,
    Feeder,
    ask,
    assignments,
    leadership,
    leads,
    placed_by,
    start_agents,
    start_instance,
)
from tests.test_leadership import Broker, Watcher, finished, start_agent

NAME = "takeover"
PROMPT_EVERY_S = 0.2


def failed(log: str) -> int:
    return len(re.findall(r"^error \(", log, flags=re.MULTILINE))


def _assignments(watcher: Watcher) -> dict[str, tuple[str, str]]:
    with watcher.lock:
        return {agent: (assign.model, assign.assignment_id) for _, agent, assign in watcher.assigns}


def _led_by(watcher: Watcher, name: str) -> bool:
    current = watcher.current_leader()
    return current is not None and current.state == "leader" and current.coordinator_id.startswith(name + ".")


def _standing_by(coordinator: Broker) -> bool:
    """Started, heard the leader record and both agents (a process start takes seconds on a loaded machine)."""
    log = coordinator.log()
    return "standing by:" in log and log.count(" joined") >= 2


def _round(index: int, watcher: Watcher, brokers: dict[str, Broker]) -> dict[str, float | int | str]:
    """Kill the leader while the other instance answers prompts; see the module docstring."""
    record = watcher.current_leader()
    assert record is not None and record.state == "leader"
    leader_name = record.coordinator_id.split(".")[0]
    survivor_name = next(name for name in brokers if name != leader_name)
    leader, survivor = brokers[leader_name], brokers[survivor_name]
    before = _assignments(watcher)
    done_before = finished(survivor.log()) + failed(survivor.log())
    counter = {"sent": 0}
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            survivor.ask(f"round {index} question {counter['sent']}")
            counter["sent"] += 1
            stop.wait(PROMPT_EVERY_S)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    time.sleep(1.0)
    killed_at = leader.process.kill()
    wait_until(lambda: _led_by(watcher, survivor_name), 4 * KEEPALIVE, "the survivor to lead")
    with watcher.lock:
        took = next(at for at, r in watcher.leaders if at >= killed_at and r.state == "leader"
                    and r.coordinator_id.startswith(survivor_name + "."))
    time.sleep(2.0)
    stop.set()
    feeder.join()
    sent = counter["sent"]
    wait_until(lambda: finished(survivor.log()) + failed(survivor.log()) - done_before >= sent, 30,
               "the survivor to answer every prompt of the round")
    answered = finished(survivor.log()) - done_before
    after = _assignments(watcher)
    leader.process.stop(timeout=5)
    return {"killed": leader_name, "takeover_s": round(took - killed_at, 3), "sent": sent, "lost": sent - answered,
            "assignments_changed": sum(1 for agent, value in after.items() if before.get(agent) != value)}


def run_consoles(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, file="takeover_console.json")
    kills = 10
    prefix = f"slbbench/takeover{uuid.uuid4().hex[:6]}/v1"
    rounds: list[dict[str, float | int | str]] = []
    with tempfile.TemporaryDirectory(prefix="slb-bench-takeover-") as name, mosquitto() as broker:
        folder = Path(name)
        settings = MqttSettings(broker_url=broker.url, topic_prefix=prefix)
        watcher = Watcher(settings)
        agents = [start_agent("gpu-desktop", "gpu-desktop", settings, folder),
                  start_agent("laptop", "laptop", settings, folder)]
        brokers = {name: Broker(name, settings, folder / f"{name}-0", KEEPALIVE) for name in ("coord-a", "coord-b")}
        try:
            wait_until(lambda: len(_assignments(watcher)) == 2 and watcher.current_leader() is not None
                       and any(_standing_by(coordinator) for coordinator in brokers.values()), 60,
                       "both agents assigned and a standby")
            time.sleep(1.0)
            for index in range(kills):
                outcome = _round(index, watcher, brokers)
                rounds.append(outcome)
                killed = str(outcome["killed"])
                brokers[killed] = restarted = Broker(killed, settings, folder / f"{killed}-{index + 1}", KEEPALIVE)
                wait_until(lambda restarted=restarted: _standing_by(restarted), 60, "the restarted one to stand by")
                time.sleep(1.0)
        finally:
            for coordinator in brokers.values():
                coordinator.process.stop(timeout=5)
            for agent in agents:
                agent.stop(timeout=5)
            watcher.close()
    takeovers = [float(outcome["takeover_s"]) for outcome in rounds]
    sent_total = sum(int(outcome["sent"]) for outcome in rounds)
    lost_total = sum(int(outcome["lost"]) for outcome in rounds)
    changed_total = sum(int(outcome["assignments_changed"]) for outcome in rounds)
    result.details = {"kills": kills, "keepalive_s": KEEPALIVE, "claim_window_s": 0.3, "takeover_s": spread(takeovers),
                      "queries_sent": sent_total, "queries_lost": lost_total,
                      "assignments_changed": changed_total, "rounds": rounds}
    result.add("takeover after kill -9, p50", result.details["takeover_s"]["p50"], "s", "<=", 2 * KEEPALIVE)
    result.add("takeover after kill -9, p95", result.details["takeover_s"]["p95"], "s", "<=", 2 * KEEPALIVE)
    result.add("queries lost during takeovers", lost_total, "", "<=", 0,
               note=f"of {sent_total} sent to the survivor")
    result.add("assignments changed by takeovers", changed_total, "", "<=", 0)
    return result


# ---------------------------------------------------------------- two python -m app


def _latest(watcher: Watcher) -> dict[str, tuple[str, str]]:
    return {agent: (model, assignment_id) for agent, model, assignment_id, _ in assignments(watcher)}


def _standing_by_app(running: RunningApp) -> bool:
    """Up, heard the leader record, knows both agents online (so it can route at once)."""
    status = running.status()
    return "standing by:" in running.app.log(None) and not status["leadership"]["leading"] \
        and status["active_clients"] >= 2


def _app_round(index: int, watcher: Watcher, apps: dict[str, RunningApp]) -> dict[str, Any]:
    """Kill the leader while the other instance answers /v1 back to back; see the module docstring."""
    record = watcher.current_leader()
    assert record is not None and record.state == "leader"
    leader_name = record.coordinator_id.split(".")[0]
    survivor_name = next(name for name in apps if name != leader_name)
    leader, survivor = apps[leader_name], apps[survivor_name]
    before = _latest(watcher)
    feeder = Feeder(survivor, f"round {index}").start()
    time.sleep(1.0)
    killed_at = leader.app.kill()
    new_record = wait_until(lambda: leads(watcher, survivor_name), 4 * KEEPALIVE, "the survivor to lead")
    with watcher.lock:
        took = next(at for at, seen in watcher.leaders if seen == new_record)
    time.sleep(2.0)
    sent, errors = feeder.stop()
    during = [(seconds, error) for at, seconds, error in feeder.outcomes if killed_at <= at <= took]
    after = _latest(watcher)
    changed = sum(1 for agent, value in after.items() if before.get(agent) != value)
    stale = sum(1 for *_, epoch in assignments(watcher, killed_at) if epoch != new_record.epoch)
    return {"killed": leader_name, "takeover_s": round(took - killed_at, 3), "sent": sent, "lost": len(errors),
            "errors": errors[:3], "sent_during_takeover": len(during),
            "lost_during_takeover": sum(1 for _, error in during if error is not None),
            "latencies_s": [round(seconds, 3) for _, seconds, _ in feeder.outcomes],
            "assignments_changed": changed, "assignments_not_from_the_new_leader": stale,
            "survivor_says_it_leads": bool(leadership(survivor)["leading"])}


def _restart(name: str, folder: Path, broker: RunningBroker, prefix: str) -> tuple[RunningApp, str | None]:
    """Start ``name`` again in a folder of its own; its first query goes out the moment /health answers."""
    running = start_instance(name, folder, broker, prefix)
    first = ask(running, "hello from a fresh front end")
    wait_until(lambda: _standing_by_app(running), 60, f"{name} to stand by", ignore=(Exception,))
    return running, first


def run_apps(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    kills = 3 if quick else 10
    prefix = f"slbbench/takeover{uuid.uuid4().hex[:6]}/v1"
    rounds: list[dict[str, Any]] = []
    fresh_failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="slb-bench-takeover-apps-") as name, mosquitto() as broker:
        folder = Path(name)
        watcher = Watcher(MqttSettings(broker_url=broker.url, topic_prefix=prefix))
        apps = {name: start_instance(name, folder / "0", broker, prefix) for name in NAMES}
        agents = start_agents(apps[NAMES[0]], folder / "agents")
        try:
            wait_until(lambda: len(_latest(watcher)) == 2 and watcher.current_leader() is not None
                       and any(_standing_by_app(running) for running in apps.values()), 90,
                       "both agents assigned and a standby", ignore=(Exception,))
            time.sleep(1.0)
            for index in range(kills):
                outcome = _app_round(index, watcher, apps)
                killed = str(outcome["killed"])
                apps[killed].app.stop(timeout=5)
                apps[killed], first = _restart(killed, folder / str(index + 1), broker, prefix)
                outcome["restarted_placed"] = placed_by(apps[killed])
                outcome["first_query_to_restarted"] = first or "answered"
                if first is not None:
                    fresh_failures.append(first)
                rounds.append(outcome)
                time.sleep(1.0)
        finally:
            for running in apps.values():
                running.app.stop(timeout=5)
            for agent in agents:
                agent.stop(timeout=5)
            watcher.close()
    takeovers = [float(outcome["takeover_s"]) for outcome in rounds]
    latencies = [seconds for outcome in rounds for seconds in outcome["latencies_s"]]
    sent_total = sum(int(outcome["sent"]) for outcome in rounds)
    lost_total = sum(int(outcome["lost"]) for outcome in rounds)
    changed_total = sum(int(outcome["assignments_changed"]) for outcome in rounds)
    for outcome in rounds:
        outcome["latencies_s"] = spread(outcome["latencies_s"])
    result.details = {
        "mode": "two python -m app", "kills": kills, "keepalive_s": KEEPALIVE, "claim_window_s": CLAIM_WINDOW_S,
        "takeover_s": spread(takeovers), "queries_sent": sent_total, "queries_lost": lost_total,
        "queries_sent_during_takeover": sum(int(outcome["sent_during_takeover"]) for outcome in rounds),
        "queries_lost_during_takeover": sum(int(outcome["lost_during_takeover"]) for outcome in rounds),
        "query_latency_s": spread(latencies), "assignments_changed": changed_total,
        "assignments_not_from_the_new_leader": sum(int(o["assignments_not_from_the_new_leader"]) for o in rounds),
        "restarted_instance_assignments": sum(int(outcome["restarted_placed"]) for outcome in rounds),
        "first_queries_to_a_restarted_instance_failed": len(fresh_failures), "rounds": rounds}
    result.add("takeover after kill -9, p50", result.details["takeover_s"]["p50"], "s", "<=", 2 * KEEPALIVE)
    result.add("takeover after kill -9, p95", result.details["takeover_s"]["p95"], "s", "<=", 2 * KEEPALIVE)
    result.add("takeover after kill -9, max", result.details["takeover_s"]["max"], "s", "<=", 2 * KEEPALIVE)
    result.add("/v1 queries lost during takeovers", lost_total, "", "<=", 0,
               note=f"of {sent_total} sent to the survivor")
    result.add("/v1 latency through the rounds, p95", result.details["query_latency_s"]["p95"], "s")
    result.add("assignments changed by takeovers", changed_total, "", "<=", 0)
    result.add("assignments by a restarted (standby) instance", result.details["restarted_instance_assignments"],
               "", "<=", 0)
    result.add("first query to a just-restarted instance failed", len(fresh_failures), "", "<=", 0,
               note=f"of {len(rounds)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)  # the mode; bench_main parses --quick / --full and --help
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--console", action="store_true")
    mode.add_argument("--apps", action="store_true")
    known, rest = parser.parse_known_args()
    bench_main(NAME, run_consoles if known.console else run_apps, __doc__, rest)


if __name__ == "__main__":
    main()

"""Takeover: two ``python -m broker`` coordinators on one Mosquitto, the leader killed with SIGKILL ten times.

Each round: the surviving instance gets prompts on its console without pause (one every ``PROMPT_EVERY_S``,
answered one after another) from a second before the kill until the takeover is two seconds old; the leader is
killed; the takeover is the time from the kill to the survivor's retained leader record (seen by a test-side
subscriber). Then the killed one is started again as the standby and the next round kills the other. Counted:
takeover time p50/p95, queries lost (sent to the survivor in the round and not finished), and assignments whose
model or id changed (the new leader only re-stamps them with its epoch).

    python -m bench.bench_takeover [--full]
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import BenchResult, bench_main, mosquitto, spread
from broker.mqtt.settings import MqttSettings
from tests.support.processes import wait_until
from tests.test_leadership import Broker, Watcher, finished, start_agent

NAME = "takeover"
KEEPALIVE = 2
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


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
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


def main() -> None:
    bench_main(NAME, run, __doc__)


if __name__ == "__main__":
    main()

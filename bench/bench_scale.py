"""Scale: 1,000 agents on real MQTT (``--agents 5000`` for more), the coordinator's CPU, lag and memory;
placement time for 1,000 and 5,000 agents.

Light agents: a few generator processes each hold 250 real MQTT connections
(one per agent id, each with its own client id and last will, driven by one
thread per process through paho's external-loop API). Every agent publishes
its retained status, hardware (a fixture machine with its numbers varied) and
ready model state, then telemetry (QoS 0) once a second, phases spread.

The coordinator runs alone in its own process (``--role coordinator``), so
its CPU share is ``time.process_time()`` over the measuring window, every
thread included; lag is ``now − telemetry.ts`` at the moment the registry has
applied the message (sender clock = same machine), and the in-process part of
it from paho's receipt. Memory is that process's RSS before and with the
agents. Placement is timed as the pure function on registry snapshots.

    python -m bench.bench_scale [--full] [--agents 5000] [--window 20] [--profile coordinator.prof] [--no-placement]

``--profile`` writes a cProfile of the coordinator's event loop (decode, registry, scoring hook: the whole
message path runs there) over the measuring window.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import selectors
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.common import BenchResult, CpuMeter, bench_main, mosquitto, spread
from tests.support.processes import REPO, ChildProcess, spawn

NAME = "scale"
AGENTS = 1000
GENERATORS = 4
AGENTS_PER_GENERATOR = 1250


WINDOW_S: float | None = None
"""``--window``: seconds of measuring (default 5 quick, 30 full)."""
PROFILE: Path | None = None
PLACEMENT = True


def set_agents(count: int) -> None:
    """``--agents N``: N agents on real MQTT, at most 1,250 connections per generator process."""
    global AGENTS, GENERATORS
    AGENTS = count
    GENERATORS = max(4, -(-count // AGENTS_PER_GENERATOR))


TELEMETRY_INTERVAL_S = 1.0
FIXTURES = REPO / "tests" / "fixtures" / "hardware"
MACHINES = ["desktop_ryzen9_rtx4090_24g", "laptop_i7_iris_16g", "raspberry_pi5_8g", "mac_m2_16g",
            "server_nogpu_64g", "desktop_i5_gtx1650_4g", "desktop_ryzen7_rx7800xt_16g"]


def varied_hardware(index: int, rng: random.Random) -> dict[str, Any]:
    """A fixture machine with its cores, clock, RAM and VRAM varied, so no two agents score alike by chance."""
    data = json.loads((FIXTURES / f"{MACHINES[index % len(MACHINES)]}.json").read_text())
    data["hostname"] = f"host-{index:04d}"
    if data.get("cpu_physical_cores"):
        data["cpu_physical_cores"] = max(2, data["cpu_physical_cores"] + rng.randint(-2, 4))
    if data.get("cpu_max_ghz"):
        data["cpu_max_ghz"] = round(data["cpu_max_ghz"] * rng.uniform(0.85, 1.1), 2)
    if data.get("ram_total_gb"):
        data["ram_total_gb"] = round(data["ram_total_gb"] * rng.choice([0.5, 1, 1, 2]), 1)
    for gpu in data.get("gpus", []):
        if gpu.get("vram_total_gb"):
            gpu["vram_total_gb"] = round(gpu["vram_total_gb"] * rng.choice([0.5, 1, 1, 1.5]), 1)
    return data


# ---------------------------------------------------------------- light agents (generator process)


def generate(broker_url: str, prefix: str, first: int, count: int, seconds: float) -> None:
    """Connect ``count`` agents, publish their retained state, then telemetry at 1 Hz for ``seconds``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from broker.mqtt.settings import parse_broker_url
    from broker.protocol import Hardware, ModelState, Status, Telemetry, Topics, encode

    address = parse_broker_url(broker_url)
    topics = Topics(prefix)
    rng = random.Random(first)
    selector = selectors.DefaultSelector()
    clients: list[tuple[str, mqtt.Client]] = []
    models = ("llama3.1:8b", "llama3.2:3b", "llama3.2:1b")
    for index in range(first, first + count):
        agent_id = f"scale-{index:04d}"
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"slb-agent-{agent_id}",
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.will_set(topics.status(agent_id), encode(Status(state="offline", agent_version="bench")), qos=1,
                        retain=True)
        client.connect(address.host, address.port, keepalive=60)
        selector.register(client.socket(), selectors.EVENT_READ, client)
        clients.append((agent_id, client))
    for _, client in clients:  # CONNACKs
        client.loop_read()
    for number, (agent_id, client) in enumerate(clients):
        hardware = Hardware(**varied_hardware(first + number, rng), declared=True)
        client.publish(topics.status(agent_id), encode(Status(state="online", agent_version="bench",
                                                              backend="simulated", simulated=True, max_parallel=2)),
                       qos=1, retain=True)
        client.publish(topics.hardware(agent_id), encode(hardware), qos=1, retain=True)
        client.publish(topics.model(agent_id), encode(ModelState(model=models[number % 3], state="ready")), qos=1,
                       retain=True)
    sys.stdout.write("CONNECTED\n")
    sys.stdout.flush()
    started = time.monotonic()
    step = TELEMETRY_INTERVAL_S / count  # phases spread evenly over the interval, one agent after the other
    sent = 0
    last_misc = started
    while time.monotonic() - started < seconds:
        now = time.monotonic()
        while started + sent * step <= now:
            agent_id, client = clients[sent % count]
            sent += 1
            telemetry = Telemetry(cpu_percent=rng.uniform(0, 100), ram_used_gb=4.0, ram_free_gb=8.0,
                                  jobs_running=rng.randint(0, 2), jobs_queued=0, max_parallel=2,
                                  tokens_per_s=40.0, simulated=True, interval_s=TELEMETRY_INTERVAL_S,
                                  backend_reachable=True)
            client.publish(topics.telemetry(agent_id), encode(telemetry), qos=0)  # writes at once (no thread)
            if client.want_write():
                client.loop_write()
        for key, _ in selector.select(timeout=max(0.0, min(0.01, started + sent * step - time.monotonic()))):
            key.data.loop_read()
        if now - last_misc > 1.0:
            last_misc = now
            for _, client in clients:
                client.loop_misc()
    for _, client in clients:
        client.disconnect()


# ---------------------------------------------------------------- the coordinator alone (coordinator process)


async def host(broker_url: str, prefix: str, expected: int, window_s: float, folder: Path,
               profile: Path | None = None) -> dict[str, Any]:
    from broker.coordinator.runtime import Coordinator
    from broker.coordinator.settings import CoordinatorSettings

    process = psutil.Process()
    coordinator = Coordinator(CoordinatorSettings(broker_url=broker_url, topic_prefix=prefix, data_dir=folder,
                                                  log_level="WARNING"))
    lags: list[float] = []
    inside: list[float] = []
    recording = [False]
    original = coordinator._on_message  # noqa: SLF001 - measuring when a message has been applied

    def measured(message: Any) -> None:
        original(message)
        if recording[0] and message.topic.endswith("/telemetry"):
            record = coordinator._state.agents.get(message.topic.rsplit("/", 2)[-2])  # noqa: SLF001
            if record is not None and record.telemetry is not None:
                lags.append((time.time() - record.telemetry.ts) * 1000)
                inside.append((time.monotonic() - message.received_at) * 1000)

    coordinator._on_message = measured  # type: ignore[method-assign]  # noqa: SLF001
    await coordinator.start()
    await coordinator.wait_connected(10)
    await asyncio.sleep(1.0)
    rss_idle = process.memory_info().rss
    cpu_idle_before, wall_idle = time.process_time(), time.perf_counter()
    await asyncio.sleep(1.0)
    idle_share = (time.process_time() - cpu_idle_before) / (time.perf_counter() - wall_idle)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    deadline = time.monotonic() + 120
    while sum(1 for record in coordinator._state.agents.values() if record.online) < expected:  # noqa: SLF001
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    joined_s = 120 - (deadline - time.monotonic())
    await asyncio.sleep(coordinator.settings.replan_debounce_s + 1.0)  # the join re-plan and its assignments
    recording[0] = True
    profiler = cProfile.Profile() if profile is not None else None
    load_before = os.getloadavg()
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await asyncio.sleep(window_s)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(profile))
    cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - wall_before
    recording[0] = False
    state = coordinator._state  # noqa: SLF001
    result = {
        "agents_online": sum(1 for record in state.agents.values() if record.online),
        "agents_with_telemetry": sum(1 for record in state.agents.values() if record.telemetry is not None),
        "seconds_to_see_all": round(joined_s, 1),
        "window_s": round(wall, 1),
        "cpu_share": round(cpu / wall, 4),
        "idle_cpu_share": round(idle_share, 4),
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "profiled": profile is not None,
        "telemetry_applied_per_s": round(len(lags) / wall, 1),
        "lag_ms": spread(lags),
        "lag_inside_coordinator_ms": spread(inside),
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_with_agents_mb": round(process.memory_info().rss / 2**20, 1),
        "replans": {labels["trigger"]: value for labels, value in _samples(coordinator, "slb_replans_total")},
        "assignments": sum(value for _, value in _samples(coordinator, "slb_assignments_total")),
    }
    await coordinator.stop()
    return result


def _samples(coordinator: Any, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for metric in coordinator.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                found.append((sample.labels, sample.value))
    return found


# ---------------------------------------------------------------- placement as a pure function


def placement_timing(repeats: int, sizes: tuple[int, ...] = (1000, 5000)) -> dict[str, Any]:
    """Placement as a pure function on registry snapshots of ``sizes`` agents.

    Three figures per size: ``cold`` (a fresh catalog, so every agent is scored inside the plan), ``events``
    (every agent scored beforehand with ``agent_score``, as the coordinator does when an agent's hardware or
    measured speed changes: what a real plan costs, and the goal figure), ``warm`` (the same plan again).
    """
    from broker.protocol import Hardware, ModelState, Status, Telemetry
    from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
    from broker.scheduling.estimates import agent_score
    from broker.scheduling.placement import PlacementSettings, plan_placement
    from broker.scheduling.registry import (
        ClusterState,
        HardwareReceived,
        ModelStateReceived,
        StatusReceived,
        TelemetryReceived,
        apply,
    )

    def cluster(count: int, distinct: bool) -> ClusterState:
        rng = random.Random(3)
        state = ClusterState()
        for index in range(count):
            agent_id = f"agent{index:05d}"
            data = varied_hardware(index, rng) if distinct else json.loads(
                (FIXTURES / f"{MACHINES[index % len(MACHINES)]}.json").read_text())
            state = apply(state, StatusReceived(agent_id, Status(state="online", max_parallel=2)), 0.0)
            state = apply(state, HardwareReceived(agent_id, Hardware(**data)), 0.0)
            state = apply(state, TelemetryReceived(agent_id, Telemetry(ram_free_gb=6.0, interval_s=1.0)), 0.0)
            state = apply(state, ModelStateReceived(agent_id, ModelState(model="llama3.2:1b", state="ready")), 0.0)
        return state

    settings = PlacementSettings()
    figures: dict[str, Any] = {}
    cases = [(f"distinct_{count}", count, True) for count in sizes] + [("seven_machine_kinds", sizes[0], False)]
    for label, count, distinct in cases:
        state = cluster(count, distinct)
        times: dict[str, list[float]] = {key: [] for key in ("cold", "events", "warm", "score_per_event")}
        cpu: dict[str, list[float]] = {key: [] for key in times}

        def timed(key: str, function: Any, per: int = 1, times: dict[str, list[float]] = times,
                  cpu: dict[str, list[float]] = cpu) -> Any:
            wall, process = time.perf_counter(), time.process_time()
            value = function()
            times[key].append((time.perf_counter() - wall) * 1000 / per)
            cpu[key].append((time.process_time() - process) * 1000 / per)
            return value

        for _ in range(repeats):
            catalog = load_catalog(DEFAULT_CATALOG)  # a fresh catalog: empty score memo
            plan = timed("cold", lambda: plan_placement(state, catalog, settings, 1.0))  # noqa: B023
            catalog = load_catalog(DEFAULT_CATALOG)
            # what the coordinator does on hardware / speed events, one agent at a time
            timed("score_per_event", lambda: [agent_score(record, catalog) for record in state.agents.values()],  # noqa: B023
                  per=count)
            timed("events", lambda: plan_placement(state, catalog, settings, 1.0))  # noqa: B023
            timed("warm", lambda: plan_placement(state, catalog, settings, 1.0))  # noqa: B023
        figures[label] = {"agents": count, **{f"{key}_ms": spread(values) for key, values in times.items()},
                          **{f"{key}_cpu_ms": spread(values) for key, values in cpu.items()},
                          "entries": len(plan.entries), "changes": len(plan.changes), "excluded": len(plan.excluded)}
    return figures


# ---------------------------------------------------------------- orchestration


def _wait_line(child: ChildProcess, word: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if word in child.log(100_000):
            return
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.log()}")
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} did not say {word} within {timeout:g} s:\n{child.log()}")


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    window = WINDOW_S or (5.0 if quick else 30.0)
    prefix = f"slbbench/scale{uuid.uuid4().hex[:6]}/v1"
    with tempfile.TemporaryDirectory(prefix="slb-bench-scale-") as name, mosquitto() as broker:
        folder = Path(name)
        output = folder / "coordinator.json"
        procs: list[ChildProcess] = []
        try:
            coordinator = spawn("coordinator", ["-m", "bench.bench_scale", "--role", "coordinator",
                                                "--agents", str(AGENTS), "--broker-url",
                                                broker.url, "--prefix", prefix, "--window", str(window),
                                                "--output", str(output), "--folder", str(folder),
                                                *(["--profile", str(PROFILE)] if PROFILE else [])], folder)
            procs.append(coordinator)
            _wait_line(coordinator, "READY", 60)
            lifetime = window + 120
            per = AGENTS // GENERATORS
            started = time.perf_counter()
            for number in range(GENERATORS):
                procs.append(spawn(f"generator-{number}", [
                    "-m", "bench.bench_scale", "--role", "generator", "--agents", str(AGENTS),
                    "--broker-url", broker.url, "--prefix", prefix,
                    "--first", str(number * per), "--count", str(per), "--seconds", str(lifetime)], folder))
            for child in procs[1:]:
                _wait_line(child, "CONNECTED", 60)
            connect_s = time.perf_counter() - started
            meter = CpuMeter([broker.process.pid, *(child.pid for child in procs[1:])])
            meter.start()
            coordinator.process.wait(lifetime + 60)
            others = meter.stop()
            measured = json.loads(output.read_text())
            broker_cpu = round(others[f"pid_{broker.process.pid}_share"], 3)
            generators_cpu = round(sum(others[f"pid_{child.pid}_share"] for child in procs[1:]), 3)
        finally:
            for child in procs:
                child.stop()
    placement = placement_timing(2 if quick else 10) if PLACEMENT else None
    result.details = {"agents": AGENTS, "generator_processes": GENERATORS,
                      "connections": "one MQTT connection per agent (own client id and will)",
                      "telemetry_interval_s": TELEMETRY_INTERVAL_S, "connect_all_s": round(connect_s, 1),
                      "coordinator": measured, "placement": placement, "mosquitto_cpu_share": broker_cpu,
                      "generators_cpu_share": generators_cpu}
    result.add(f"coordinator CPU with {AGENTS:,} agents at 1 Hz", measured["cpu_share"] * 100, "% core", "<=",
               50 if AGENTS <= 1000 else 100, note=f"load average {measured['load_average_1min']}"
               + (" (profiled: cProfile slows it)" if measured["profiled"] else ""))
    result.add("telemetry lag (ts → applied) p50", measured["lag_ms"].get("p50", float("nan")), "ms")
    result.add("telemetry lag p99", measured["lag_ms"].get("p99", float("nan")), "ms")
    result.add("agents online / with telemetry", measured["agents_online"], "", ">=", AGENTS,
               note=f"{measured['agents_with_telemetry']} with telemetry")
    result.add(f"coordinator RSS with {AGENTS:,} agents", measured["rss_with_agents_mb"], "MB",
               note=f"idle {measured['rss_idle_mb']} MB")
    if placement is None:
        return result
    for count, goal in ((1000, 50), (5000, 150)):
        figure = placement[f"distinct_{count}"]
        # CPU time is the goal figure: on a shared machine the wall time also holds waits for a core.
        result.add(f"placement of {count:,} distinct agents, scored on events, CPU p50", figure["events_cpu_ms"]["p50"],
                   "ms", "<=", goal, note=f"wall p50 {figure['events_ms']['p50']:.0f} ms; cold (scored in the plan) "
                                          f"CPU p50 {figure['cold_cpu_ms']['p50']:.0f} ms")
    result.add("scoring one agent on an event (CPU)", placement["distinct_1000"]["score_per_event_cpu_ms"]["p50"], "ms")
    result.add("placement, 7 machine kinds (warm memo) p50", placement["seven_machine_kinds"]["warm_ms"]["p50"], "ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--role", choices=("generator", "coordinator"))
    parser.add_argument("--agents", type=int, default=AGENTS, help="agents on real MQTT (default 1,000)")
    parser.add_argument("--window", type=float, default=None)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--no-placement", action="store_true")
    known, rest = parser.parse_known_args()
    set_agents(known.agents)
    global WINDOW_S, PROFILE, PLACEMENT
    WINDOW_S, PROFILE, PLACEMENT = known.window, known.profile, not known.no_placement
    if known.role is None:
        bench_main(NAME, run, __doc__, rest)
        return
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    if args.role == "generator":
        generate(args.broker_url, args.prefix, args.first, args.count, args.seconds)
    else:
        measured = asyncio.run(host(args.broker_url, args.prefix, args.agents, known.window or 10.0, args.folder,
                                    known.profile))
        args.output.write_text(json.dumps(measured))


if __name__ == "__main__":
    main()

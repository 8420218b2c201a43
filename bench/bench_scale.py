"""Scale: 1,000 agents on real MQTT, the coordinator's CPU, lag and memory; placement time for 1,000 agents.

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

    python -m bench.bench_scale [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def host(broker_url: str, prefix: str, expected: int, window_s: float, folder: Path) -> dict[str, Any]:
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
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.sleep(window_s)
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


def placement_timing(repeats: int) -> dict[str, Any]:
    from broker.protocol import Hardware, ModelState, Status, Telemetry
    from broker.scheduling.catalog import DEFAULT_CATALOG, load_catalog
    from broker.scheduling.placement import PlacementSettings, plan_placement
    from broker.scheduling.registry import (
        ClusterState,
        HardwareReceived,
        ModelStateReceived,
        StatusReceived,
        TelemetryReceived,
        apply,
    )

    def cluster(distinct: bool) -> ClusterState:
        rng = random.Random(3)
        state = ClusterState()
        for index in range(AGENTS):
            agent_id = f"agent{index:04d}"
            data = varied_hardware(index, rng) if distinct else json.loads(
                (FIXTURES / f"{MACHINES[index % len(MACHINES)]}.json").read_text())
            state = apply(state, StatusReceived(agent_id, Status(state="online", max_parallel=2)), 0.0)
            state = apply(state, HardwareReceived(agent_id, Hardware(**data)), 0.0)
            state = apply(state, TelemetryReceived(agent_id, Telemetry(ram_free_gb=6.0, interval_s=1.0)), 0.0)
            state = apply(state, ModelStateReceived(agent_id, ModelState(model="llama3.2:1b", state="ready")), 0.0)
        return state

    settings = PlacementSettings()
    figures: dict[str, Any] = {}
    for label, distinct in (("distinct_machines", True), ("seven_machine_kinds", False)):
        state = cluster(distinct)
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(repeats):
            catalog = load_catalog(DEFAULT_CATALOG)  # a fresh catalog: empty score memo
            started = time.perf_counter()
            plan = plan_placement(state, catalog, settings, 1.0)
            cold.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            plan_placement(state, catalog, settings, 1.0)
            warm.append((time.perf_counter() - started) * 1000)
        figures[label] = {"cold_ms": spread(cold), "warm_ms": spread(warm), "entries": len(plan.entries),
                          "changes": len(plan.changes), "excluded": len(plan.excluded)}
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
    window = 5.0 if quick else 30.0
    prefix = f"slbbench/scale{uuid.uuid4().hex[:6]}/v1"
    with tempfile.TemporaryDirectory(prefix="slb-bench-scale-") as name, mosquitto() as broker:
        folder = Path(name)
        output = folder / "coordinator.json"
        procs: list[ChildProcess] = []
        try:
            coordinator = spawn("coordinator", ["-m", "bench.bench_scale", "--role", "coordinator", "--broker-url",
                                                broker.url, "--prefix", prefix, "--window", str(window),
                                                "--output", str(output), "--folder", str(folder)], folder)
            procs.append(coordinator)
            _wait_line(coordinator, "READY", 60)
            lifetime = window + 60
            per = AGENTS // GENERATORS
            started = time.perf_counter()
            for number in range(GENERATORS):
                procs.append(spawn(f"generator-{number}", [
                    "-m", "bench.bench_scale", "--role", "generator", "--broker-url", broker.url, "--prefix", prefix,
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
    placement = placement_timing(2 if quick else 10)
    result.details = {"agents": AGENTS, "generator_processes": GENERATORS,
                      "connections": "one MQTT connection per agent (own client id and will)",
                      "telemetry_interval_s": TELEMETRY_INTERVAL_S, "connect_all_s": round(connect_s, 1),
                      "coordinator": measured, "placement": placement, "mosquitto_cpu_share": broker_cpu,
                      "generators_cpu_share": generators_cpu}
    result.add("coordinator CPU with 1,000 agents at 1 Hz", measured["cpu_share"] * 100, "% core", "<=", 50)
    result.add("telemetry lag (ts → applied) p50", measured["lag_ms"].get("p50", float("nan")), "ms")
    result.add("telemetry lag p99", measured["lag_ms"].get("p99", float("nan")), "ms")
    result.add("agents online / with telemetry", measured["agents_online"], "", ">=", AGENTS,
               note=f"{measured['agents_with_telemetry']} with telemetry")
    result.add("coordinator RSS with 1,000 agents", measured["rss_with_agents_mb"], "MB",
               note=f"idle {measured['rss_idle_mb']} MB")
    result.add("placement of 1,000 distinct agents (cold) p50",
               placement["distinct_machines"]["cold_ms"]["p50"], "ms", "<=", 50)
    result.add("placement of 1,000 distinct agents (cold) max",
               placement["distinct_machines"]["cold_ms"]["max"], "ms")
    result.add("placement, 7 machine kinds (warm memo) p50", placement["seven_machine_kinds"]["warm_ms"]["p50"], "ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--role", choices=("generator", "coordinator"))
    known, rest = parser.parse_known_args()
    if known.role is None:
        bench_main(NAME, run, __doc__, rest)
        return
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--window", type=float, default=10)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    if args.role == "generator":
        generate(args.broker_url, args.prefix, args.first, args.count, args.seconds)
    else:
        measured = asyncio.run(host(args.broker_url, args.prefix, AGENTS, args.window, args.folder))
        args.output.write_text(json.dumps(measured))


if __name__ == "__main__":
    main()

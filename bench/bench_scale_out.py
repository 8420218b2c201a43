"""Scale-out limits (docs/scale-out.md): a 10,000-agent coordinator on recorded telemetry, and messages per second
through one Mosquitto, directly and across a bridge.

1. **Recorded telemetry.** Three real agent processes (simulated backend; desktop, laptop, Raspberry Pi profiles)
   join a real coordinator on a real Mosquitto; a plain subscriber records what they publish (status, hardware,
   model, telemetry) for a few seconds.
2. **10,000 agents.** A coordinator without a broker is fed 10,000 synthetic agents derived from those recordings
   (agent id, hostname and memory varied) through its own message handler — decoding, registry, scoring, load —
   then whole rounds of 10,000 telemetry messages (one second of a 10,000-agent cluster at 1 Hz). Figures: CPU
   seconds per round (= share of a core at 1 Hz), placement of the 10,000-agent registry (CPU), and routing one
   query over them (CPU).
3. **Broker.** QoS 1 publishers (``bench/raw_mqtt.py``, one process each) as fast as acknowledgements allow into
   one Mosquitto, one subscriber counting what is delivered; then the same with the publishers on a second
   Mosquitto bridged to the first by ``mosquitto/bridge.conf.example``.

The box is shared: the 1-minute load average is kept with every figure.

    python -m bench.bench_scale_out [--full]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchResult, agent_args, bench_main, children, mosquitto
from tests.support.processes import REPO, spawn

NAME = "scale_out"
PROFILES = ("gpu-desktop", "laptop", "raspberry-pi")
BRIDGE_EXAMPLE = REPO / "mosquitto" / "bridge.conf.example"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- 1. recording real agents


def record(seconds: float) -> dict[str, dict[str, list[bytes]]]:
    """What three real agents publish, per agent and topic kind (retained state and telemetry)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from broker.coordinator.runtime import Coordinator
    from broker.coordinator.settings import CoordinatorSettings

    prefix = f"slbbench/{uuid.uuid4().hex[:8]}/v1"
    recorded: dict[str, dict[str, list[bytes]]] = {}
    with mosquitto() as broker, children() as started, tempfile.TemporaryDirectory() as folder:
        for index, profile in enumerate(PROFILES):
            started.append(spawn(f"rec-{index}", agent_args(broker.url, prefix, f"rec-{index}", Path(folder),
                                                            profile=profile), Path(folder)))
        listener = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex}")

        def on_message(_client: Any, _data: Any, message: Any) -> None:
            _, agent_id, kind = message.topic.rsplit("/", 2)
            recorded.setdefault(agent_id, {}).setdefault(kind, []).append(bytes(message.payload))

        listener.on_message = on_message
        listener.connect(broker.host, broker.port)
        listener.subscribe(f"{prefix}/agent/+/+", qos=1)
        listener.loop_start()

        async def coordinate() -> None:
            coordinator = Coordinator(CoordinatorSettings(broker_url=broker.url, topic_prefix=prefix,
                                                          data_dir=Path(folder) / "coordinator",
                                                          replan_debounce_s=0.3))
            await coordinator.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ready = [a for a in coordinator.snapshot().agents if a.online and a.model_state == "ready"]
                if len(ready) == len(PROFILES):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(seconds)
            await coordinator.stop()

        asyncio.run(coordinate())
        listener.loop_stop()
        listener.disconnect()
    return recorded


# ---------------------------------------------------------------- 2. 10,000 agents from the recordings


class _Recording:
    """Stands in for the MQTT connection of a coordinator fed straight through its message handler."""

    connected = True

    def publish(self, topic: str, payload: object, **_: object) -> None:
        return None


def _varied(kind: str, payload: bytes, index: int, rng: random.Random) -> bytes:
    data = json.loads(payload)
    data["ts"] = time.time()
    if kind == "hardware":
        data["hostname"] = f"host-{index:05d}"
        if data.get("ram_total_gb"):
            data["ram_total_gb"] = round(data["ram_total_gb"] * rng.choice([0.5, 1, 1, 2]), 1)
    if kind == "status":
        data["hostname"] = f"host-{index:05d}"
    return json.dumps(data).encode()


async def replay(recorded: dict[str, dict[str, list[bytes]]], agents: int, rounds: int) -> dict[str, Any]:
    from broker.coordinator.contract import QueryRequest
    from broker.coordinator.runtime import Coordinator
    from broker.coordinator.settings import CoordinatorSettings
    from broker.mqtt.client import InboundMessage
    from broker.protocol import ChatMessage, Topics
    from broker.scheduling.placement import PlacementSettings, plan_placement

    prefix = "slb/v1"
    with tempfile.TemporaryDirectory() as folder:
        coordinator = Coordinator(CoordinatorSettings(topic_prefix=prefix, data_dir=Path(folder),
                                                      replan_debounce_s=3600, replan_interval_s=3600))
        coordinator._loop = asyncio.get_running_loop()
        coordinator._connection = _Recording()  # type: ignore[assignment]
        topics = Topics(prefix)
        templates = [recorded[agent_id] for agent_id in sorted(recorded)]
        rng = random.Random(5)
        builders = {"status": topics.status, "hardware": topics.hardware, "model": topics.model,
                    "telemetry": topics.telemetry}
        joined_cpu = time.process_time()
        for index in range(agents):
            template = templates[index % len(templates)]
            agent_id = f"sim{index:05d}"
            for kind in ("status", "hardware", "model", "telemetry"):
                if template.get(kind):
                    coordinator._on_message(InboundMessage(builders[kind](agent_id),
                                                           _varied(kind, template[kind][-1], index, rng), 1, True))
        joined_cpu = time.process_time() - joined_cpu
        online = sum(1 for record in coordinator._state.agents.values() if record.online)
        round_cpu: list[float] = []
        for turn in range(rounds):
            messages = []
            for index in range(agents):
                telemetry = templates[index % len(templates)]["telemetry"]
                payload = json.loads(telemetry[turn % len(telemetry)])
                payload["ts"] = time.time()
                messages.append(InboundMessage(topics.telemetry(f"sim{index:05d}"), json.dumps(payload).encode(),
                                               0, False))
            started = time.process_time()
            for message in messages:
                coordinator._on_message(message)
            round_cpu.append(time.process_time() - started)
            await asyncio.sleep(0)
        state = coordinator._state
        catalog = coordinator.catalog
        started = time.process_time()
        plan = plan_placement(state, catalog, PlacementSettings(), time.monotonic())
        plan_cpu = time.process_time() - started
        started = time.process_time()
        plan_placement(state, catalog, PlacementSettings(), time.monotonic())
        plan_warm_cpu = time.process_time() - started
        request = QueryRequest(messages=[ChatMessage(role="user", content="hello")])
        started = time.process_time()
        candidates = coordinator._execution.candidates(None, frozenset(), request)
        route = coordinator._execution.router.choose(candidates, 256) if candidates else None
        route_cpu = time.process_time() - started
    return {
        "agents": agents, "online": online, "templates": sorted(recorded),
        "join_cpu_s": round(joined_cpu, 3),
        "telemetry_round_cpu_s": [round(value, 3) for value in round_cpu],
        "core_share_at_1hz": round(min(round_cpu), 3),
        "plan_cpu_s": round(plan_cpu, 3), "plan_warm_cpu_s": round(plan_warm_cpu, 3),
        "plan_entries": len(plan.entries), "plan_excluded": len(plan.excluded),
        "route_cpu_ms": round(route_cpu * 1000, 1), "route_candidates": len(candidates),
        "routed_to": route.candidate.agent_id if route else None,
    }


# ---------------------------------------------------------------- 3. messages per second through a broker


def _count_deliveries(host: str, port: int, topic: str, counter: list[int], ready: threading.Event) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    subscriber = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex}")

    def on_message(*_: Any) -> None:
        counter[0] += 1

    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *_: ready.set()
    subscriber.connect(host, port)
    subscriber.subscribe(topic, qos=1)
    subscriber.loop_start()
    return subscriber


def broker_throughput(publishers: int, seconds: float, bridged: bool) -> dict[str, Any]:
    """Delivered messages/s (QoS 1, 300-byte telemetry-sized payloads) to one subscriber on the main broker."""
    from broker.mqtt.local_broker import free_port, start_broker

    prefix = f"slbbench/{uuid.uuid4().hex[:8]}/v1"
    topic = f"{prefix}/agent/load/result"
    with tempfile.TemporaryDirectory() as folder, mosquitto() as main, children() as started:
        entry = main
        site = None
        if bridged:
            config = BRIDGE_EXAMPLE.read_text().replace("slb/v1/", f"{prefix}/")
            config = "\n".join(f"address 127.0.0.1:{main.port}" if line.startswith("address ") else line
                               for line in config.splitlines()) + "\n"
            site = start_broker(Path(folder) / "site", port=free_port(), prefer="mosquitto",
                                overrides={"persistence": "false", "connection_messages": "false"},
                                extra_config=config)
            entry = site
        try:
            payload_file = Path(folder) / "payload"
            payload_file.write_bytes(b"x" * 300)
            counter = [0]
            ready = threading.Event()
            subscriber = _count_deliveries(main.host, main.port, topic, counter, ready)
            ready.wait(10)
            time.sleep(1.0 if bridged else 0.2)  # the bridge connects and subscribes
            begin = counter[0]
            at = time.monotonic()
            for index in range(publishers):
                started.append(spawn(f"pub-{index}", ["-m", "bench.raw_mqtt", entry.host, str(entry.port), topic,
                                                      str(payload_file), str(seconds)], Path(folder)))
            for child in started:
                child.process.wait(seconds + 30)
            time.sleep(0.5)
            elapsed = time.monotonic() - at
            delivered = counter[0] - begin
            sent = sum(int(line.split()[1]) for child in started for line in child.log().splitlines()
                       if line.startswith("SENT "))
            subscriber.loop_stop()
            subscriber.disconnect()
        finally:
            if site is not None:
                site.stop()
    return {"publishers": publishers, "bridged": bridged, "sent": sent, "delivered": delivered,
            "delivered_per_s": round(delivered / max(elapsed, 1e-9)), "load_average": load_average()}


# ---------------------------------------------------------------- orchestration


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    agents = 10_000
    rounds = 3 if quick else 10
    load_before = load_average()
    recorded = record(4.0 if quick else 10.0)
    if len(recorded) < len(PROFILES) or any("telemetry" not in kinds for kinds in recorded.values()):
        raise RuntimeError(f"recording incomplete: {sorted((a, sorted(k)) for a, k in recorded.items())}")
    replayed = asyncio.run(replay(recorded, agents, rounds))
    replayed["load_average"] = load_average()
    share = replayed["core_share_at_1hz"]
    result.add("10k agents: coordinator CPU per telemetry round", share, "s",
               note=f"= {share:.0%} of a core at 1 Hz; load {replayed['load_average']}")
    result.add("agents per core at 1 Hz telemetry", agents / share if share else float("nan"), "agents")
    result.add("10k agents: placement (scored on events)", replayed["plan_cpu_s"], "s CPU")
    result.add("10k agents: route one query", replayed["route_cpu_ms"], "ms CPU")
    direct = broker_throughput(2, 3.0 if quick else 10.0, bridged=False)
    result.add("Mosquitto: QoS 1 delivered to one subscriber", direct["delivered_per_s"], "msg/s",
               note=f"2 publishers; load {direct['load_average']}")
    bridged = broker_throughput(2, 3.0 if quick else 10.0, bridged=True)
    result.add("across a bridge: QoS 1 delivered", bridged["delivered_per_s"], "msg/s",
               note=f"2 publishers on the second site; load {bridged['load_average']}")
    result.details = {"load_average_before": load_before, "replay": replayed, "broker_direct": direct,
                      "broker_bridged": bridged, "recorded_messages": {a: {k: len(v) for k, v in kinds.items()}
                                                                        for a, kinds in recorded.items()}}
    return result


def main() -> None:
    bench_main(NAME, run, __doc__.split("\n\n")[0] if __doc__ else None, sys.argv[1:])


if __name__ == "__main__":
    main()

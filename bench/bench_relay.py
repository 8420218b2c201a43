"""Token relay: answer tokens/s streamed through one coordinator vs raw paho on the same broker.

Project path: real agent processes (``--backend simulated``, fast streams,
default chunk batching) answer many concurrent queries (closed loop: each
client asks again as soon as its answer ends) through one Coordinator hosted
in this process; tokens are counted from the text the query streams deliver,
MQTT result messages from what the coordinator received.

Raw baseline, same broker, same number of publishing processes: plain paho
clients publish QoS 1 messages shaped like the project's result chunks (same
JSON, the same tokens per message the project achieved) as fast as they can,
and one plain paho subscriber counts them. That is what broker + paho could
carry for this traffic; the ratio is what the coordinator and agents keep of
it. A raw run with one token per message (naive streaming) is shown too.

    python -m bench.bench_relay [--full]
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench import raw_mqtt
from bench.common import BenchResult, agent_args, bench_main, mosquitto
from broker.coordinator.contract import QueryFinished, QueryRequest, TextDelta
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.protocol import ChatMessage, Result, encode
from tests.support.processes import ChildProcess, spawn

NAME = "relay"
AGENTS = 4
PARALLEL = 8
STREAM_TOKENS_PER_S = 1000.0
ANSWER_TOKENS = 400
RAW_TOKENS_PER_MESSAGE = 15
"""What the agents' batching gives at these speeds (16 tokens or 30 ms per message): ~0.067 messages per token."""


# ---------------------------------------------------------------- project path


async def _relay(broker_url: str, prefix: str, streams: int, seconds: float) -> dict[str, Any]:
    settings = CoordinatorSettings(broker_url=broker_url, topic_prefix=prefix, replan_debounce_s=0.3,
                                   data_dir=Path(tempfile.gettempdir()), agent_queue_limit=PARALLEL,
                                   admission_wait_s=60)
    coordinator = Coordinator(settings)
    received = [0]
    original = coordinator._on_result  # noqa: SLF001 - counting what arrives, nothing else changes

    def counting(agent_id: str, result: Result) -> None:
        received[0] += 1
        original(agent_id, result)

    coordinator._on_result = counting  # type: ignore[method-assign]  # noqa: SLF001
    await coordinator.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for a in coordinator.snapshot().agents if a.online and a.model_state == "ready") < AGENTS:
            if time.monotonic() > deadline:
                raise TimeoutError("agents not ready within 60 s")
            await asyncio.sleep(0.2)
        window = {"open": False, "tokens": 0, "answers": 0}
        stop_at = [float("inf")]

        async def client(number: int) -> None:
            turn = 0
            while time.monotonic() < stop_at[0]:
                turn += 1
                request = QueryRequest(messages=[ChatMessage(role="user", content=f"stream {number} turn {turn}")],
                                       options={"num_predict": ANSWER_TOKENS}, timeout_s=120)
                async for event in coordinator.query(request):
                    if isinstance(event, TextDelta) and window["open"]:
                        window["tokens"] += len(event.text.split())
                    elif isinstance(event, QueryFinished) and window["open"]:
                        window["answers"] += 1

        tasks = [asyncio.create_task(client(number)) for number in range(streams)]
        await asyncio.sleep(1.0)  # every stream running
        messages_before = received[0]
        cpu_before, started = time.process_time(), time.perf_counter()
        window["open"] = True
        await asyncio.sleep(seconds)
        window["open"] = False
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        messages = received[0] - messages_before
        stop_at[0] = time.monotonic()
        await asyncio.wait(tasks, timeout=30)
        return {"tokens": window["tokens"], "answers": window["answers"], "messages": messages,
                "seconds": round(elapsed, 2), "tokens_per_s": round(window["tokens"] / elapsed, 1),
                "messages_per_token": round(messages / max(1, window["tokens"]), 4),
                "coordinator_process_cpu_share": round(cpu / elapsed, 3)}
    finally:
        await coordinator.stop()


# ---------------------------------------------------------------- raw paho baseline


def _raw(host: str, port: int, publishers: int, tokens_per_message: int, seconds: float,
         folder: Path) -> dict[str, Any]:
    words = " ".join(["token"] * tokens_per_message)
    payload = encode(Result(request_id="raw" + "0" * 29 + ".1", seq=123, delta=" " + words, agent_id="raw-agent-1",
                            model="llama3.1:8b"))
    payload_file = folder / f"payload-{tokens_per_message}.json"
    payload_file.write_bytes(payload)
    topic_root = f"rawbench/{uuid.uuid4().hex[:6]}"
    counted = [0]
    window = {"open": False}
    subscriber = raw_mqtt.client("raw-sub")
    subscribed = threading.Event()

    def on_message(client: Any, userdata: object, message: Any) -> None:
        if window["open"]:
            counted[0] += 1

    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.on_connect = lambda client, *args: client.subscribe(f"{topic_root}/+/result", qos=1)
    subscriber.connect(host, port)
    subscriber.loop_start()
    subscribed.wait(10)
    workers = [spawn(f"raw-{tokens_per_message}-{index}", ["-m", "bench.raw_mqtt", host, str(port),
                                                            f"{topic_root}/{index}/result", str(payload_file),
                                                            str(seconds + 1.5)], folder)
               for index in range(publishers)]
    time.sleep(1.0)  # publishers started and streaming
    window["open"] = True
    started = time.perf_counter()
    time.sleep(seconds)
    window["open"] = False
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.process.wait(30)
    subscriber.disconnect()
    subscriber.loop_stop()
    messages = counted[0]
    return {"tokens_per_message": tokens_per_message, "payload_bytes": len(payload), "messages": messages,
            "seconds": round(elapsed, 2), "messages_per_s": round(messages / elapsed, 1),
            "tokens_per_s": round(messages * tokens_per_message / elapsed, 1)}


# ---------------------------------------------------------------- the benchmark


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    seconds = 3.0 if quick else 20.0
    raw_seconds = 2.0 if quick else 10.0
    streams = AGENTS * PARALLEL
    prefix = f"slbbench/relay{uuid.uuid4().hex[:6]}/v1"
    with tempfile.TemporaryDirectory(prefix="slb-bench-relay-") as name, mosquitto() as broker:
        folder = Path(name)
        # Raw before and after the project's run, averaged: the machine's other load drifts meanwhile.
        raw_before = _raw(broker.host, broker.port, AGENTS, RAW_TOKENS_PER_MESSAGE, raw_seconds, folder)
        procs: list[ChildProcess] = []
        try:
            for index in range(AGENTS):
                agent_id = f"relay-{index}"
                procs.append(spawn(agent_id, agent_args(broker.url, prefix, agent_id, folder,
                                                        tokens_per_s=STREAM_TOKENS_PER_S, ttft_ms=5,
                                                        max_parallel=PARALLEL, extra=["--max-queue", "64"]), folder))
            project = asyncio.run(_relay(broker.url, prefix, streams, seconds))
        finally:
            for child in procs:
                child.stop()
        raw_after = _raw(broker.host, broker.port, AGENTS, RAW_TOKENS_PER_MESSAGE, raw_seconds, folder)
        raw_single = _raw(broker.host, broker.port, AGENTS, 1, raw_seconds, folder)
    raw_tokens_per_s = (raw_before["tokens_per_s"] + raw_after["tokens_per_s"]) / 2
    ratio = project["tokens_per_s"] / raw_tokens_per_s if raw_tokens_per_s else 0.0
    result.details = {"agents": AGENTS, "parallel_per_agent": PARALLEL, "concurrent_streams": streams,
                      "stream_tokens_per_s": STREAM_TOKENS_PER_S, "answer_tokens": ANSWER_TOKENS,
                      "project": project, "raw_before": raw_before, "raw_after": raw_after,
                      "raw_one_token_per_message": raw_single}
    result.add("tokens/s through one coordinator", project["tokens_per_s"], "tok/s", ">=", 5000)
    result.add(f"÷ raw paho, {RAW_TOKENS_PER_MESSAGE} tokens per message", ratio, "×", ">=", 0.5,
               note=f"raw {raw_tokens_per_s:.0f} tok/s (before {raw_before['tokens_per_s']:.0f}, "
                    f"after {raw_after['tokens_per_s']:.0f})")
    result.add("÷ raw paho, one token per message", project["tokens_per_s"] / max(1.0, raw_single["tokens_per_s"]),
               "×", note=f"raw {raw_single['tokens_per_s']:.0f} tok/s")
    result.add("MQTT messages per token", project["messages_per_token"], "", "<=", 0.25)
    result.add("coordinator process CPU while relaying", project["coordinator_process_cpu_share"] * 100, "% core")
    return result


def main() -> None:
    bench_main(NAME, run, __doc__)


if __name__ == "__main__":
    main()

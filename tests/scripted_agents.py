"""Agents that misbehave on purpose (issue 13.1 and 13.7), run as child processes by the tests.

Each logs in with a real account and publishes only on its own topics — what the secure broker's ACL
allows any agent machine, honest or not. Nothing here goes through ``broker.protocol``'s validation on
the way out: the claims are raw JSON, so the coordinator sees exactly what a hostile client can send.

* ``liar``: absurd hardware (8 × H100), a benchmark of 100,000 tok/s, ``max_parallel`` 1000, a ready model
  it was never assigned (plus every popular model "loaded"), and every job answered at once with an empty
  ``done`` whose stats claim 512 tokens at 100,000 tok/s.
* ``flood``: serves one model and answers a job with ``--chunks`` chunks of ``--chunk-chars`` characters
  (``--gap``: without chunk 0, so everything piles up behind the gap), then ``done``.

Every job received is printed as ``job <request id>`` (the tests count them in the log); a flood ends with
``flood sent <n> chunks``. Run: ``python -m tests.scripted_agents liar --broker-url URL --agent-id liar
--password PW``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

from broker.mqtt.client import InboundMessage, MqttConnection, OutboundMessage
from broker.mqtt.settings import MqttSettings
from broker.protocol import Job, PayloadError, Topics, decode

LIAR_MODEL = "llama3.3:70b"
"""Ready on the liar without ever being assigned (the largest chat model of the catalog: ``quality`` wants it)."""
LIAR_ALSO_LOADED = ["llama3.1:8b", "llama3.2:3b", "llama3.2:1b", "qwen2.5:0.5b"]
FLOOD_MODEL = "floodmodel:1b"


def raw(payload: dict[str, object]) -> bytes:
    return json.dumps({"v": 1, "ts": time.time(), **payload}, separators=(",", ":")).encode()


def liar_claims() -> dict[str, dict[str, object]]:
    """What the liar says about itself, by topic kind."""
    h100 = {"name": "NVIDIA H100 80GB HBM3", "vendor": "nvidia", "vram_total_gb": 80.0, "vram_free_gb": 80.0,
            "memory_bandwidth_gbps": 3350.0}
    return {
        "status": {"state": "online", "agent_version": "0.1.0", "backend": "ollama", "backend_reachable": True,
                   "max_parallel": 1000, "hostname": "dgx-h100",
                   "runtime": {"kind": "ollama", "detected_by": "GET /api/version", "slots": 64,
                               "slots_source": "measured", "continues_prefill": True}},
        "hardware": {"cpu_brand": "AMD EPYC 9654", "cpu_physical_cores": 8, "cpu_logical_cores": 16,
                     "cpu_max_ghz": 3.7, "ram_total_gb": 2048.0, "gpus": [h100] * 8, "hostname": "dgx-h100",
                     "benchmark": {"model": "llama3.2:3b", "tokens_per_s": 100_000.0, "ttft_s": 0.001}},
        "model": {"model": LIAR_MODEL, "state": "ready", "local_models": [LIAR_MODEL, *LIAR_ALSO_LOADED],
                  "loaded_models": [LIAR_MODEL, *LIAR_ALSO_LOADED]},
        "telemetry": {"cpu_percent": 1.0, "ram_free_gb": 2000.0, "vram_free_gb": 600.0, "jobs_running": 0,
                      "jobs_queued": 0, "max_parallel": 1000, "tokens_per_s": 100_000.0, "ttft_s": 0.001,
                      "backend_reachable": True, "interval_s": 0.5},
    }


def flood_claims() -> dict[str, dict[str, object]]:
    return {
        "status": {"state": "online", "agent_version": "0.1.0", "backend": "ollama", "backend_reachable": True,
                   "max_parallel": 1,
                   "runtime": {"kind": "ollama", "slots": 1, "slots_source": "measured", "continues_prefill": True}},
        "hardware": {"cpu_brand": "Intel Core i7", "cpu_physical_cores": 8, "ram_total_gb": 32.0},
        "model": {"model": FLOOD_MODEL, "state": "ready", "local_models": [FLOOD_MODEL]},
        "telemetry": {"jobs_running": 0, "jobs_queued": 0, "max_parallel": 1, "backend_reachable": True,
                      "interval_s": 0.5},
    }


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    topics = Topics(args.topic_prefix)
    agent_id = args.agent_id
    jobs: asyncio.Queue[Job] = asyncio.Queue()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_message(message: InboundMessage) -> None:
        if message.topic == topics.job(agent_id):
            try:
                jobs.put_nowait(decode(Job, message.payload))
            except PayloadError as error:
                print(f"bad job: {error}", flush=True)

    claims = liar_claims() if args.mode == "liar" else flood_claims()
    settings = MqttSettings(broker_url=args.broker_url, topic_prefix=args.topic_prefix, mqtt_username=agent_id,
                            mqtt_password=args.password)
    offline = raw({"state": "offline"})
    connection = MqttConnection(settings, agent_id, on_message=on_message, loop=loop,
                                subscriptions=[(topics.job(agent_id), 1)],
                                will=OutboundMessage(topics.status(agent_id), offline, 1, True),
                                max_offline_queue=100_000)
    connection.start()
    for kind in ("status", "hardware", "model"):
        connection.publish(getattr(topics, kind)(agent_id), raw(claims[kind]), qos=1, retain=True)
    print("claims published", flush=True)

    async def heartbeat() -> None:
        while True:
            connection.publish(topics.telemetry(agent_id), raw(claims["telemetry"]), qos=0)
            await asyncio.sleep(0.5)

    async def answer() -> None:
        while True:
            job = await jobs.get()
            print(f"job {job.request_id}", flush=True)
            result = topics.result(agent_id)
            if args.mode == "liar":
                connection.publish(result, raw({"request_id": job.request_id, "seq": 0, "delta": "", "done": True,
                                                "agent_id": agent_id, "model": job.model,
                                                "stats": {"output_tokens": 512, "tokens_per_s": 100_000.0,
                                                          "ttft_s": 0.001, "finish_reason": "stop"}}), qos=1)
                continue
            delta = "x" * args.chunk_chars
            for seq in range(1 if args.gap else 0, args.chunks):
                connection.publish(result, raw({"request_id": job.request_id, "seq": seq, "delta": delta,
                                                "agent_id": agent_id, "model": job.model}), qos=1)
                await asyncio.sleep(0)
            connection.publish(result, raw({"request_id": job.request_id, "seq": args.chunks, "done": True,
                                            "agent_id": agent_id, "model": job.model}), qos=1)
            print(f"flood sent {args.chunks} chunks", flush=True)

    tasks = [asyncio.create_task(heartbeat()), asyncio.create_task(answer())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await loop.run_in_executor(None, connection.stop, OutboundMessage(topics.status(agent_id), offline, 1, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["liar", "flood"])
    parser.add_argument("--broker-url", required=True)
    parser.add_argument("--topic-prefix", default="slb/v1")
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--password", default=None)
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--chunk-chars", type=int, default=900_000)
    parser.add_argument("--gap", action="store_true", help="never send chunk 0")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

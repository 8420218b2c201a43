"""Conversation-aware routing: time to first token of follow-up turns, affinity on vs off, on the same stand-ins.

Four Ollama-like stand-ins (``bench/standins.py``: the Ollama double as a process behind a real
``python -m agent --backend ollama``) on CPU-box speeds — 20, 30, 45 and 60 tokens/s, prompt reading 8× that
(160–480 tokens/s), two parallel generations each, and a prompt cache per slot that keeps the last prompt plus its
answer (a cache hit reads only the new part). Several conversations run at once, each ≥ 6 turns with a growing
history (a shared system prompt, a long first message, then shorter follow-ups), the user reading each answer for a
moment before the next turn. Every turn sends the whole history, as an OpenAI-API caller does, with no
conversation id: the coordinator matches the history's prefix.

The same workload runs through a Coordinator with ``conversation_affinity`` on and then one with it off (each
run with its own words, so neither finds the other's prompts in a cache); the figure is the p50 TTFT of
follow-up turns (turn 2 on), on ÷ off.

    python -m bench.bench_affinity [--full]
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import BenchResult, bench_main, spread
from bench.standins import Standin, standin_cluster
from broker.coordinator.contract import QueryFailed, QueryFinished, QueryRequest, QueryStarted, TextDelta
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.protocol import ChatMessage

NAME = "affinity"
MACHINES = [
    Standin(f"cpu-{speed}", speed, 0.15, profile, prefill_tokens_per_s=speed * 8, num_parallel=2,
            announced_parallel=2)
    for speed, profile in ((20, "raspberry-pi"), (30, "laptop"), (45, "laptop"), (60, "gpu-desktop"))
]
SYSTEM_WORDS = 150
FIRST_WORDS = 250
FOLLOW_UP_WORDS = 100
ANSWER_TOKENS = 32


def _words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(count))


async def _conversation(coordinator: Coordinator, index: int, turns: int, think_s: float, salt: int,
                        results: list[dict[str, Any]], delay_s: float) -> None:
    rng = random.Random(salt * 1000 + index)
    shared = random.Random(salt)  # every conversation of a run shares its system prompt
    messages = [ChatMessage(role="system", content=_words(shared, SYSTEM_WORDS))]
    await asyncio.sleep(delay_s)
    for turn in range(1, turns + 1):
        words = FIRST_WORDS if turn == 1 else FOLLOW_UP_WORDS
        messages.append(ChatMessage(role="user", content=f"[[reply:{ANSWER_TOKENS}]] {_words(rng, words)}"))
        started = time.monotonic()
        first = None
        agent, affinity, text, error = "", False, "", None
        async for event in coordinator.query(QueryRequest(messages=list(messages), timeout_s=300)):
            if isinstance(event, QueryStarted):
                agent, affinity = event.agents[0], event.affinity
            elif isinstance(event, TextDelta) and first is None:
                first = time.monotonic()
            elif isinstance(event, QueryFinished):
                text = event.text
            elif isinstance(event, QueryFailed):
                error = event.error
        ended = time.monotonic()
        results.append({"conversation": index, "turn": turn, "agent": agent, "affinity": affinity,
                        "ttft_s": (first or ended) - started, "total_s": ended - started, "error": error,
                        "prompt_words": sum(len(m.content.split()) for m in messages)})
        if error is not None:
            return
        messages.append(ChatMessage(role="assistant", content=text))
        await asyncio.sleep(think_s)


async def _run(cluster_broker: str, prefix: str, folder: Path, affinity: bool, conversations: int, turns: int,
               think_s: float, salt: int) -> list[dict[str, Any]]:
    settings = CoordinatorSettings(broker_url=cluster_broker, topic_prefix=prefix, conversation_affinity=affinity,
                                   data_dir=folder / f"coordinator-{affinity}", replan_debounce_s=0.3,
                                   admission_wait_s=300, default_deadline_s=300)
    coordinator = Coordinator(settings)
    await coordinator.start()
    try:
        deadline = time.monotonic() + 240
        while True:
            views = coordinator.snapshot().agents
            ready = [v for v in views if v.online and v.model_state == "ready"
                     and (v.runtime or {}).get("slots_source") in ("measured", "reported")]
            if len(ready) == len(MACHINES):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(ready)} stand-ins ready after 240 s")
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.5)  # a round of telemetry
        results: list[dict[str, Any]] = []
        await asyncio.gather(*(_conversation(coordinator, index, turns, think_s, salt, results, index * 0.7)
                               for index in range(conversations)))
        return results
    finally:
        await coordinator.stop()


def _summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    follow = [r for r in results if r["turn"] > 1 and r["error"] is None]
    first = [r for r in results if r["turn"] == 1 and r["error"] is None]
    return {"follow_up_ttft_s": spread([r["ttft_s"] for r in follow]),
            "follow_up_total_s": spread([r["total_s"] for r in follow]),
            "first_turn_ttft_s": spread([r["ttft_s"] for r in first]),
            "follow_ups_kept_on_their_machine": sum(1 for r in follow if r["affinity"]),
            "follow_ups": len(follow), "failed": sum(1 for r in results if r["error"] is not None),
            "errors": sorted({r["error"] for r in results if r["error"]})[:3],
            "share": dict(sorted(Counter(r["agent"] for r in results).items()))}


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    conversations, turns, think_s = (5, 6, 1.0) if quick else (8, 8, 2.0)
    with tempfile.TemporaryDirectory(prefix="slb-bench-affinity-") as name:
        folder = Path(name)
        with standin_cluster(MACHINES, folder, with_app=False) as cluster:
            runs = {}
            for salt, affinity in enumerate((True, False), start=1):
                runs[affinity] = asyncio.run(_run(cluster.broker_url, cluster.prefix, folder, affinity,
                                                  conversations, turns, think_s, salt))
    on, off = _summary(runs[True]), _summary(runs[False])
    result.details = {"machines": [spec.__dict__ for spec in MACHINES], "conversations": conversations,
                      "turns": turns, "think_s": think_s, "affinity_on": on, "affinity_off": off,
                      "turns_on": runs[True], "turns_off": runs[False]}
    ratio = on["follow_up_ttft_s"]["p50"] / off["follow_up_ttft_s"]["p50"]
    result.add("follow-up TTFT p50, affinity on ÷ off", ratio, "×", "<=", 0.5,
               note=f"{on['follow_up_ttft_s']['p50']:.2f} s vs {off['follow_up_ttft_s']['p50']:.2f} s")
    result.add("follow-up TTFT p95, affinity on", on["follow_up_ttft_s"]["p95"], "s",
               note=f"off: {off['follow_up_ttft_s']['p95']:.2f} s")
    result.add("follow-ups kept on their machine (affinity on)", on["follow_ups_kept_on_their_machine"],
               f"of {on['follow_ups']}")
    result.add("follow-up total time p50, affinity on ÷ off",
               on["follow_up_total_s"]["p50"] / off["follow_up_total_s"]["p50"], "×")
    return result


def main() -> None:
    bench_main(NAME, run, __doc__)


if __name__ == "__main__":
    main()

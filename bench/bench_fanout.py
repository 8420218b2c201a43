"""Fan-out: total time of mode ``all`` (every agent answers, consensus) vs the slowest agent answering alone.

Three real agent processes (``--backend simulated``: a GPU desktop, a laptop
and a Raspberry Pi profile, so placement gives each its own model) and a real
Coordinator on Mosquitto. Each round asks the same question twice, in turns:
``all`` and the slowest agent's model by name (only that agent serves it).
The ratio per round is ``all ÷ alone``; the goal is ≤ 1.1×.

    python -m bench.bench_fanout [--full]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchResult, agent_args, bench_main, mosquitto, spread
from broker.coordinator.contract import QueryFailed, QueryFinished, QueryRequest
from broker.coordinator.runtime import Coordinator
from broker.coordinator.settings import CoordinatorSettings
from broker.protocol import ChatMessage
from tests.support.processes import ChildProcess, spawn

NAME = "fanout"
AGENTS = (("fan-gpu", "gpu-desktop", 200.0, 80.0), ("fan-laptop", "laptop", 60.0, 200.0),
          ("fan-pi", "raspberry-pi", 30.0, 300.0))
"""(agent id, hardware profile, tokens/s, time to first token in ms)."""
ANSWER_TOKENS = 30


async def _ask(coordinator: Coordinator, mode: str, text: str) -> tuple[float, QueryFinished]:
    request = QueryRequest(messages=[ChatMessage(role="user", content=text)], mode=mode,
                           options={"num_predict": ANSWER_TOKENS}, timeout_s=60)
    started = time.perf_counter()
    async for event in coordinator.query(request):
        if isinstance(event, QueryFinished):
            return time.perf_counter() - started, event
        if isinstance(event, QueryFailed):
            raise RuntimeError(f"{mode} failed: {event.code}: {event.error}")
    raise RuntimeError(f"{mode}: the stream ended without an answer")


async def _measure(broker_url: str, prefix: str, folder: Path, rounds: int) -> dict[str, Any]:
    coordinator = Coordinator(CoordinatorSettings(broker_url=broker_url, topic_prefix=prefix, data_dir=folder,
                                                  replan_debounce_s=0.3))
    await coordinator.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            views = {v.id: v for v in coordinator.snapshot().agents if v.online and v.model_state == "ready"}
            if len(views) == len(AGENTS):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(views)} agents ready after 60 s")
            await asyncio.sleep(0.2)
        slowest = min(AGENTS, key=lambda agent: agent[2])[0]
        model = views[slowest].model
        assert model is not None
        if sum(1 for view in views.values() if view.model == model) != 1:
            raise RuntimeError(f"placement gave {model} to more than the slowest agent; cannot ask it alone")
        await _ask(coordinator, "all", "warm-up question")
        await _ask(coordinator, model, "warm-up question")
        alone: list[float] = []
        together: list[float] = []
        agreement: list[float] = []
        for index in range(rounds):
            text = f"round {index}: which machine should answer this question?"
            order = ("all", model) if index % 2 == 0 else (model, "all")
            for mode in order:
                seconds, finished = await _ask(coordinator, mode, text)
                if mode == "all":
                    together.append(seconds)
                    agreement.append(finished.agreement or 0.0)
                    if len(finished.answers) != len(AGENTS):
                        raise RuntimeError(f"fan-out answered with {len(finished.answers)} agents")
                else:
                    alone.append(seconds)
        return {"slowest_agent": slowest, "slowest_model": model, "all_s": together, "alone_s": alone,
                "agreement": agreement}
    finally:
        await coordinator.stop()


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    rounds = 3 if quick else 20
    prefix = f"slbbench/fanout{uuid.uuid4().hex[:6]}/v1"
    with tempfile.TemporaryDirectory(prefix="slb-bench-fanout-") as name, mosquitto() as broker:
        folder = Path(name)
        procs: list[ChildProcess] = []
        try:
            for agent_id, profile, speed, ttft_ms in AGENTS:
                procs.append(spawn(agent_id, agent_args(broker.url, prefix, agent_id, folder, profile=profile,
                                                        tokens_per_s=speed, ttft_ms=ttft_ms), folder))
            measured = asyncio.run(_measure(broker.url, prefix, folder, rounds))
        finally:
            for child in procs:
                child.stop()
    ratios = [a / b for a, b in zip(measured["all_s"], measured["alone_s"], strict=True)]
    result.details = {
        "agents": [dict(zip(("id", "profile", "tokens_per_s", "ttft_ms"), agent, strict=True)) for agent in AGENTS],
        "answer_tokens": ANSWER_TOKENS, "rounds": rounds, "aggregation": "consensus",
        "slowest_agent": measured["slowest_agent"], "slowest_model": measured["slowest_model"],
        "all_s": spread(measured["all_s"]), "alone_s": spread(measured["alone_s"]), "ratio": spread(ratios),
        "added_ms": spread([(a - b) * 1000 for a, b in zip(measured["all_s"], measured["alone_s"], strict=True)]),
    }
    result.add("mode all ÷ slowest agent alone, p50", result.details["ratio"]["p50"], "×", "<=", 1.1)
    result.add("mode all ÷ slowest agent alone, max", result.details["ratio"]["max"], "×")
    result.add("time added by fan-out + consensus, p50", result.details["added_ms"]["p50"], "ms")
    result.add("slowest agent alone, p50", result.details["alone_s"]["p50"], "s")
    return result


def main() -> None:
    bench_main(NAME, run, __doc__)


if __name__ == "__main__":
    main()

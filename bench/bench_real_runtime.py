"""A real runtime, direct vs through the cluster: what the cluster adds to an answer from llama-cpp-python.

llama-cpp-python's OpenAI-compatible server on its default settings (one slot) serves SmolLM2-135M
(tests/support/llama_runtime.py); a real Mosquitto, ``python -m app`` and ``python -m agent --backend openai``
sit in front of it. The same streamed request (temperature 0, ``max_tokens`` 48) goes alternately straight to
the runtime and through the cluster's ``/v1/chat/completions``, in pairs whose order alternates, so the
machine's other load hits both sides alike. Before each request a one-token answer to another question resets
the runtime's context: llama-cpp-python reuses the evaluated prompt of the previous request, so the second
request of a pair would otherwise skip its prompt evaluation and look faster whichever way it went.
Per request: TTFT (first content piece) and total (end of stream).
The table gives p50/p95 of each side and of the paired difference; the texts must be identical in every pair.
A pair whose direct answer was cut short (llama-cpp-python ends a running answer when any other request reaches
its /v1, e.g. an agent re-reading the model list) is asked again and counted apart: the comparison is about the
cluster's overhead, the count about the agent disturbing other users of its runtime.

Not part of ``python -m bench`` (starting the runtime and the app costs more than the quick suite's budget):

    python -m bench.bench_real_runtime [--full]     # quick: 30 pairs; full: 100 pairs
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import BenchResult, bench_main, mosquitto
from tests.app_support import start_agent, start_app, wait_for_app
from tests.support.llama_runtime import MODEL_ALIAS, start_llama_server
from tests.support.openai_chat import ChatAnswer, ask, chat_body
from tests.support.processes import percentile

NAME = "real_runtime"
AGENT_ID = "bench-llama"
MAX_TOKENS = 48
WARM_UP_PAIRS = 3
RESET = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "Reply with one word: ok"}],
         "max_tokens": 1, "temperature": 0}
"""A request whose prompt differs from every measured one (see the module docstring)."""
PROMPTS = ["Say hello.", "Name one color.", "Explain MQTT in one sentence.", "Describe a tree.",
           "Write one sentence about rain.", "What is Python?", "List three fruits.", "Count to five."]
CPU_BOX = {
    "description": "benchmark box", "cpu_brand": "bench CPU", "cpu_physical_cores": 2, "cpu_logical_cores": 2,
    "cpu_max_ghz": 3.0, "ram_total_gb": 8, "os": "Linux", "arch": "x86_64", "gpus": [],
}


def _row(label: str, values: list[float]) -> str:
    return f"{label:<28} {percentile(values, 0.5):>8.1f} {percentile(values, 0.95):>8.1f}"


def print_comparison(samples: dict[str, list[float]], pairs: int) -> None:
    """The same-run comparison as a table (ms)."""
    title = f"real runtime, direct vs through the cluster: {pairs} alternating pairs, streamed, max_tokens {MAX_TOKENS}"
    print(f"\n{title}")  # a benchmark prints figures
    print(f"{'':<28} {'p50 ms':>8} {'p95 ms':>8}")  # a benchmark prints figures
    for key, label in (("direct_ttft", "TTFT direct"), ("cluster_ttft", "TTFT through the cluster"),
                       ("added_ttft", "TTFT added (paired)"), ("direct_total", "total direct"),
                       ("cluster_total", "total through the cluster"), ("added_total", "total added (paired)")):
        print(_row(label, samples[key]))  # a benchmark prints figures


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick)
    pairs = 30 if quick else 100
    with tempfile.TemporaryDirectory(prefix="slb-bench-real-") as name, mosquitto() as broker:
        folder = Path(name)
        runtime = start_llama_server(folder, name="llama-server")
        app = None
        try:
            app = start_app(folder, broker, topic_prefix=f"slbbench/real{uuid.uuid4().hex[:6]}/v1",
                            extra=["--no-rag-warm-up"])
            start_agent(app, folder, AGENT_ID, backend="openai", backend_url=runtime.url, profile=CPU_BOX)

            def listed() -> bool:
                models = httpx.get(f"{app.url}/v1/models", timeout=5).json()["data"]
                return any(model["id"] == MODEL_ALIAS for model in models)

            wait_for_app(listed, 120, f"{MODEL_ALIAS} in the cluster's /v1/models", app)

            def measured() -> dict | None:  # the agent's warm-up probes use the runtime: wait until they are done
                agent = next((agent for agent in app.status()["agents"] if agent["id"] == AGENT_ID), {})
                runtime = agent.get("runtime") or {}
                return runtime if runtime.get("continues_prefill") is not None else None

            profile = wait_for_app(measured, 120, "the agent's measured runtime profile", app)
            samples: dict[str, list[float]] = {key: [] for key in (
                "direct_ttft", "cluster_ttft", "added_ttft", "direct_total", "cluster_total", "added_total")}
            mismatches: list[str] = []
            failures: list[str] = []
            direct_cut_short = 0
            with httpx.Client() as direct_client, httpx.Client() as cluster_client:
                index = 0
                while index < WARM_UP_PAIRS + pairs:
                    body = chat_body(MODEL_ALIAS, PROMPTS[index % len(PROMPTS)], max_tokens=MAX_TOKENS, stream=True)
                    sides = ["direct", "cluster"] if index % 2 == 0 else ["cluster", "direct"]
                    answers: dict[str, ChatAnswer] = {}
                    for side in sides:
                        direct_client.post(f"{runtime.url}/chat/completions", json=RESET, timeout=60)
                        if side == "direct":
                            answers[side] = ask(direct_client, runtime.url, body)
                        else:
                            answers[side] = ask(cluster_client, f"{app.url}/v1", body)
                    direct, cluster = answers["direct"], answers["cluster"]
                    if direct.error is None and direct.finish_reason is None:
                        direct_cut_short += 1  # someone else's request ended it: ask the pair again
                        continue
                    index += 1
                    if index <= WARM_UP_PAIRS:
                        continue
                    if direct.error or cluster.error or direct.ttft_s is None or cluster.ttft_s is None:
                        failures.append(f"pair {index}: direct {direct.brief()} / cluster {cluster.brief()}")
                        continue
                    if (direct.text, direct.finish_reason) != (cluster.text, cluster.finish_reason):
                        mismatches.append(f"pair {index}: direct {direct.brief()} / cluster {cluster.brief()}")
                    samples["direct_ttft"].append(direct.ttft_s * 1000)
                    samples["cluster_ttft"].append(cluster.ttft_s * 1000)
                    samples["added_ttft"].append((cluster.ttft_s - direct.ttft_s) * 1000)
                    samples["direct_total"].append(direct.total_s * 1000)
                    samples["cluster_total"].append(cluster.total_s * 1000)
                    samples["added_total"].append((cluster.total_s - direct.total_s) * 1000)
        finally:
            if app is not None:
                app.stop()
            runtime.stop()
    print_comparison(samples, len(samples["direct_total"]))
    print(f"runtime profile the agent published: {profile}")  # a benchmark prints figures
    if direct_cut_short:
        note = f"{direct_cut_short} direct answer(s) were cut short by another request and asked again"
        print(note)  # a benchmark prints figures
    result.details = {
        "pairs": len(samples["direct_total"]), "max_tokens": MAX_TOKENS, "runtime": profile,
        "text_mismatches": mismatches, "failures": failures, "direct_answers_cut_short": direct_cut_short,
        **{key: {"p50": round(percentile(values, 0.5), 1), "p95": round(percentile(values, 0.95), 1)}
           for key, values in samples.items()},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for key, label in (("ttft", "TTFT"), ("total", "total")):
        result.add(f"{label} direct p50", percentile(samples[f"direct_{key}"], 0.5), "ms")
        result.add(f"{label} through the cluster p50", percentile(samples[f"cluster_{key}"], 0.5), "ms")
        result.add(f"{label} added p50 (paired)", percentile(samples[f"added_{key}"], 0.5), "ms")
        result.add(f"{label} added p95 (paired)", percentile(samples[f"added_{key}"], 0.95), "ms")
    result.add("pairs whose texts differ", len(mismatches), "", "<=", 0)
    result.add("failed requests", len(failures), "", "<=", 0)
    result.add("direct answers cut short by another request (asked again)", direct_cut_short, "", "<=", 0)
    return result


def main() -> None:
    bench_main(NAME, run, __doc__)


if __name__ == "__main__":
    main()

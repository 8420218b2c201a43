"""``python -m bench``: every benchmark's quick mode, then one table of every figure with its goal.

    python -m bench                 # quick mode of all (< 2 minutes on 2 cores)
    python -m bench --full          # the long runs behind docs/benchmarks.md
    python -m bench --only routing,scale
    python -m bench --bench relay   # one benchmark in this process (what the runner calls)

Each benchmark runs in its own process (a clean interpreter, its own broker
and children) and writes its JSON; this runner reads them back, prints one
table and writes ``summary.json`` — full mode in ``bench/results/`` (the
figures docs/benchmarks.md quotes), quick mode in ``bench/results/quick/``.
A failed or missed figure never changes the exit code: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BenchResult,
    Figure,
    machine_info,
    print_table,
    results_folder,
    stop_on_sigterm,
    timed_run,
    write_result,
)
from tests.support.processes import child_env

ORDER = ("overhead", "relay", "routing", "affinity", "fanout", "scale", "rag")
FILES = {"rag": "rag_suite.json"}
"""bench/bench_rag.py writes rag.json itself (its own format); the suite's RAG figures go next to it."""
TIMEOUT_S = {"quick": 240, "full": 1800}


def rag_run(quick: bool) -> BenchResult:
    """RAG figures through bench/bench_rag.py's own functions (ingestion, recall, latency at scale)."""
    from app.store.embedding import Embedder
    from app.store.rag import RagStore
    from bench import bench_rag
    from tests.support.rag_corpus import load_corpus

    result = BenchResult("rag", quick)
    rng = random.Random(20240601)
    chunks = 2000 if quick else 20_000
    with tempfile.TemporaryDirectory(prefix="slb-bench-rag-") as name:
        work = Path(name)
        started = time.perf_counter()
        Embedder().warm_up()
        load_s = time.perf_counter() - started
        ingestion = bench_rag.bench_ingestion(work, bench_rag.make_sentences(400, rng), 1 if quick else 10, rng)
        labelled = RagStore(work / "labelled")
        load_corpus(labelled)
        recall = bench_rag.bench_recall(labelled)
        large, sentences, large_load_s = bench_rag.build_large_store(work, chunks, 200 if quick else 3000, rng)
        queries = [" ".join(s.split()[:8]) + "?" for s in rng.sample(sentences, 15 if quick else 200)]
        queries += ["how much did the bakery pay for flour", "who repaired the thermostat before the storm"]
        latency = bench_rag.bench_search(large, queries)
    ratio = ingestion["ingest_chunks_per_s"] / ingestion["raw_encode_chunks_per_s"]
    result.details = {"model_load_s": round(load_s, 1), "ingestion": ingestion, "recall_labelled_corpus": recall,
                      "large_corpus": {"chunks": large.chunk_count(), "load_s": round(large_load_s, 1)},
                      "search_latency_ms": latency, "queries": len(queries)}
    result.add("ingestion chunks/s ÷ raw model encode", ratio, "×", ">=", 0.8,
               note=f"{ingestion['ingest_chunks_per_s']} vs {ingestion['raw_encode_chunks_per_s']} chunks/s")
    label = f"{large.chunk_count():,} chunks"
    result.add(f"hybrid search p95 incl. query embedding, {label}", latency["hybrid"]["p95_ms"], "ms", "<=", 30)
    result.add(f"hybrid search p50, {label}", latency["hybrid"]["p50_ms"], "ms")
    result.add(f"vector search p95 incl. query embedding, {label}", latency["vector"]["p95_ms"], "ms", "<=", 30)
    result.add("query embedding alone p95", latency["query_embedding_only"]["p95_ms"], "ms")
    result.add("recall@5 hybrid (labelled corpus)", recall["hybrid"]["recall_at_5"], "")  # type: ignore[arg-type]
    result.add("recall@5 vector (labelled corpus)", recall["vector"]["recall_at_5"], "")  # type: ignore[arg-type]
    return result


def run_one(name: str, quick: bool) -> BenchResult:
    """Run one benchmark in this process and write its JSON."""
    if name == "rag":
        runner = rag_run
    else:
        module = __import__(f"bench.bench_{name}", fromlist=["run"])
        runner = module.run
    result = timed_run(name, runner, quick=quick)
    result.file = FILES.get(name)
    write_result(result)
    return result


def groups(names: list[str], quick: bool) -> list[list[str]]:
    """Quick mode runs routing and fan-out side by side: both measure seconds-long answers of mostly idle agents,
    which a few ms of CPU contention cannot move; everything measured in ms or CPU share runs alone."""
    together = {"routing", "fanout"} if quick else set()
    paired = [name for name in names if name in together]
    result: list[list[str]] = []
    for name in names:
        if name in together:
            if name == paired[0]:
                result.append(paired)
        else:
            result.append([name])
    return result


def result_path(name: str, quick: bool) -> Path:
    return results_folder(quick) / FILES.get(name, f"{name}.json")


def load(name: str, quick: bool) -> dict | None:
    path = result_path(name, quick)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="long runs (docs/benchmarks.md)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(ORDER)}")
    parser.add_argument("--bench", choices=ORDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = not args.full
    stop_on_sigterm()
    if args.bench:
        result = run_one(args.bench, quick)
        print_table(result.figures, title=f"{args.bench}: {result.seconds:.0f} s")  # a benchmark prints figures
        return
    names = [name for name in ORDER if not args.only or name in args.only.split(",")]
    mode = "quick" if quick else "full"
    machine = machine_info()
    print(f"python -m bench ({mode}): {machine['nproc']} × {machine['cpu_model']}, {machine['ram_gb']} GB RAM, "
          f"load average {machine['load_average']}")
    started = time.perf_counter()
    rows: list[tuple[str, Figure]] = []
    summary: dict[str, object] = {"mode": mode, "machine": machine, "benches": {}}
    for group in groups(names, quick):
        launched = []
        for name in group:
            log = results_folder(quick) / f".{name}.log"
            handle = log.open("wb")
            process = subprocess.Popen([sys.executable, "-m", "bench", "--bench", name, *([] if quick else ["--full"])],
                                       stdout=handle, stderr=subprocess.STDOUT, env=child_env())
            launched.append((name, process, handle, log, time.time()))
        print(f"  {' + '.join(group)} ...", end="", flush=True)
        for name, process, handle, log, began in launched:
            try:
                code = process.wait(TIMEOUT_S[mode])
            except (subprocess.TimeoutExpired, KeyboardInterrupt) as stopped:
                for _, other, *_ in launched:  # SIGINT: each benchmark stops its own children and broker
                    if other.poll() is None:
                        other.send_signal(signal.SIGINT)
                for _, other, *_ in launched:
                    try:
                        other.wait(30)
                    except subprocess.TimeoutExpired:
                        other.kill()
                if isinstance(stopped, KeyboardInterrupt):
                    raise
                code = process.wait()
            handle.close()
            data = load(name, quick)
            fresh = data is not None and data.get("mode") == mode and \
                os.path.getmtime(result_path(name, quick)) >= began - 1
            if not fresh or data is None or data.get("error") or code != 0:
                why = (data or {}).get("error") if fresh else f"exit code {code}"
                print(f" {name} FAILED ({why}; log {log})", end="")
                rows.append((name, Figure("benchmark did not finish", float("nan"), note=str(why))))
                summary["benches"][name] = {"error": why}  # type: ignore[index]
                continue
            log.unlink(missing_ok=True)
            others = data["machine"].get("busy_cores_during_run", {}).get("others")
            print(f" {name} {data['seconds']:.0f} s (other work kept {others} cores busy)", end="")
            for figure in data["figures"]:
                rows.append((name, Figure(figure["name"], figure["value"], figure["unit"], figure["op"],
                                          figure["limit"], figure.get("note", ""))))
            summary["benches"][name] = {"seconds": data["seconds"], "figures": data["figures"],  # type: ignore[index]
                                        "others_busy_cores": others}
        print()
    total = time.perf_counter() - started
    summary["seconds"] = round(total, 1)
    (results_folder(quick) / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print()
    print_table(rows)
    goals = [figure for _, figure in rows if figure.passed is not None]
    met = sum(1 for figure in goals if figure.passed)
    folder = results_folder(quick)
    print(f"\n{met} of {len(goals)} goals met; {total:.0f} s in all; JSON in {folder}/")  # a benchmark prints figures


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; every benchmark stopped its children")  # a benchmark prints figures
        sys.exit(130)

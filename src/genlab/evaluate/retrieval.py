"""Retrieval quality: recall@k, MRR@10 and nDCG@10 over sources (files), from a qrels file.

A qrels file is JSONL: {"query": "...", "relevant": ["path or path suffix", ...]}. Chunks are
ranked by the retriever; a source counts at the rank of its first chunk.
"""

from __future__ import annotations

import math
from pathlib import Path

from genlab.data.readers import iter_jsonl
from genlab.errors import DataError

KS = (1, 5, 10)


def read_qrels(path: str | Path) -> list[tuple[str, list[str]]]:
    out = []
    for n, record in iter_jsonl(Path(path)):
        query, relevant = record.get("query"), record.get("relevant")
        if isinstance(relevant, str):
            relevant = [relevant]
        if not isinstance(query, str) or not query.strip() or not isinstance(relevant, list) or not relevant:
            raise DataError(f"{path}:{n}: expected {{\"query\": text, \"relevant\": [source, ...]}}")
        out.append((query, [str(r) for r in relevant]))
    if not out:
        raise DataError(f"{path}: no queries")
    return out


def judged(ranked_paths: list[str], relevant: list[str], matches) -> list[bool]:
    """Relevance of each distinct source in ranked order (first occurrence counts)."""
    seen, out = set(), []
    for p in ranked_paths:
        if p not in seen:
            seen.add(p)
            out.append(any(matches(p, r) for r in relevant))
    return out


def scores(flags: list[bool], n_relevant: int) -> dict[str, float]:
    found = [i for i, f in enumerate(flags) if f]
    out = {f"recall@{k}": sum(1 for i in found if i < k) / n_relevant for k in KS}
    out["mrr@10"] = next((1.0 / (i + 1) for i in found if i < 10), 0.0)
    dcg = sum(1.0 / math.log2(i + 2) for i in found if i < 10)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(n_relevant, 10)))
    out["ndcg@10"] = dcg / ideal
    return out


def evaluate_retrieval(retriever, qrels: list[tuple[str, list[str]]], methods=("dense", "bm25", "hybrid"),
                       depth: int = 50) -> dict[str, dict[str, float]]:
    """Mean metrics per method over the queries (each retrieves `depth` chunks)."""
    from genlab.rag.retrieve import matches

    results = {}
    for method in methods:
        totals: dict[str, float] = {}
        for query, relevant in qrels:
            hits = retriever.search(query, k=depth, method=method)
            for key, value in scores(judged([h.path for h in hits], relevant, matches), len(relevant)).items():
                totals[key] = totals.get(key, 0.0) + value
        results[method] = {key: value / len(qrels) for key, value in totals.items()}
    return results

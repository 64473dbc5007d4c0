"""Retrieval: dense (FAISS), BM25 (SQLite FTS5) and hybrid (reciprocal rank fusion), with
metadata filters and optional cross-encoder re-ranking."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from genlab.errors import InvalidParameterError
from genlab.rag.embed import Embedder
from genlab.rag.store import Store

METHODS = ("hybrid", "dense", "bm25")
RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion


@dataclass
class Hit:
    id: int
    score: float
    path: str
    title: str
    heading: str
    page: int | None
    start: int
    end: int
    text: str
    kind: str

    @property
    def source(self) -> str:
        where = f"{self.path}" + (f" p.{self.page}" if self.page else "")
        return where + (f" § {self.heading}" if self.heading else "")


class Retriever:
    def __init__(self, store: str | Path | Store, embedder: Embedder | str | None = None, reranker: str | None = None):
        self.store = store if isinstance(store, Store) else Store(store)
        self.embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        if self.store.embedder_id not in (None, self.embedder.id):
            raise InvalidParameterError(f"{self.store.folder}: built with embedder {self.store.embedder_id}, but "
                                        f"queries would use {self.embedder.id}; pass the same --embedder")
        self.reranker = None
        if reranker:
            from sentence_transformers import CrossEncoder

            self.reranker = CrossEncoder(reranker, device="cpu", local_files_only=True)

    @staticmethod
    def _filter(path_glob: str | None, kinds: list[str] | None) -> tuple[str, list]:
        where, args = [], []
        if path_glob:
            where.append("path GLOB ?")
            args.append(path_glob if path_glob.startswith(("/", "*")) else f"*{path_glob}")
        if kinds:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args += [k.lstrip(".").lower() for k in kinds]
        return " AND ".join(where), args

    def dense(self, query: str, k: int, where: str = "", args: list | None = None) -> list[tuple[int, float]]:
        vector = self.embedder.encode([query])[0]
        fetch = k if not where else 10 * k
        while True:
            found = self.store.dense(vector, fetch)
            keep = set(self.store.filtered_ids([i for i, _ in found], where, args or []))
            hits = [(i, s) for i, s in found if i in keep]
            if len(hits) >= k or len(found) < fetch:  # enough, or the whole index was searched
                return hits[:k]
            fetch *= 4

    def search(self, query: str, k: int = 5, method: str = "hybrid", path_glob: str | None = None,
               kinds: list[str] | None = None, candidates: int | None = None) -> list[Hit]:
        """The `k` best chunks for `query`. Hybrid fuses the top `candidates` of each retriever."""
        if method not in METHODS:
            raise InvalidParameterError(f"unknown retrieval method {method!r}; use one of {', '.join(METHODS)}")
        if k < 1:
            raise InvalidParameterError("k must be >= 1")
        where, args = self._filter(path_glob, kinds)
        n = candidates or max(4 * k, 20)
        if method == "dense":
            ranked = self.dense(query, n if self.reranker else k, where, args)
        elif method == "bm25":
            ranked = self.store.bm25(query, n if self.reranker else k, where, args)
        else:
            fused: dict[int, float] = {}
            for results in (self.dense(query, n, where, args), self.store.bm25(query, n, where, args)):
                for rank, (i, _) in enumerate(results):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
            ranked = sorted(fused.items(), key=lambda x: -x[1])
        rows = self.store.chunks([i for i, _ in ranked])
        hits = [Hit(score=s, **{k2: v for k2, v in rows[i].items()}) for i, s in ranked if i in rows]
        if self.reranker and hits:
            scores = self.reranker.predict([(query, h.text) for h in hits])
            for h, s in zip(hits, scores):
                h.score = float(s)
            hits.sort(key=lambda h: -h.score)
        return hits[:k]


def matches(hit_path: str, relevant: str) -> bool:
    """Whether a retrieved chunk's source is the relevant source named in a qrels file (a path,
    a path suffix such as 'docs/intro.md', or a glob)."""
    return hit_path == relevant or hit_path.endswith("/" + relevant.lstrip("/")) or fnmatch.fnmatch(hit_path, relevant)

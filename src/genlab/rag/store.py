"""The chunk store: one SQLite database (files, chunks with their vectors, FTS5 for BM25) plus a
FAISS index persisted beside it.

SQLite is the source of truth and every index run is one transaction, so an interrupted run
leaves the previous store intact. The FAISS file records the database generation it was built
from; a file that does not match (missing, stale after a crash) is rebuilt from the vectors in
SQLite. Below EXACT_MAX chunks the index is exact (flat inner product), above it HNSW.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from genlab.errors import GenlabError

EXACT_MAX = 50_000
PRUNE_MIN_CHUNKS = 20_000  # BM25 query pruning starts at this store size (below, every word is searched)
COMMON_FRACTION = 0.05  # ... and then leaves out words found in more than this fraction of the chunks
HNSW_EF_SEARCH = 256  # candidates HNSW keeps while searching (recall vs ~0.1 ms per query here)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, kind TEXT NOT NULL, title TEXT NOT NULL,
                                 chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY, path TEXT NOT NULL, kind TEXT NOT NULL, title TEXT NOT NULL,
                                  heading TEXT NOT NULL, page INTEGER, char_start INTEGER NOT NULL, char_end INTEGER NOT NULL,
                                  text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_path ON chunks(path);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, heading, title, content='chunks', content_rowid='id',
                                                         tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts(rowid, text, heading, title) VALUES (new.id, new.text, new.heading, new.title);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts(chunks_fts, rowid, text, heading, title) VALUES ('delete', old.id, old.text, old.heading, old.title);
END;
"""
COLUMNS = "id, path, kind, title, heading, page, char_start, char_end, text"
NAMES = ["id", "path", "kind", "title", "heading", "page", "start", "end", "text"]


class StoreError(GenlabError):
    pass


class Store:
    def __init__(self, folder: str | Path, embedder_id: str | None = None, dim: int | None = None, create: bool = False):
        self.folder = Path(folder)
        db = self.folder / "store.db"
        if not db.exists() and not create:
            raise StoreError(f"{self.folder}: no store here (build one with genlab index DOCS --store {self.folder})")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{db}: not a genlab store ({e})") from None
        meta = self.meta()
        if embedder_id is not None:
            if meta.get("embedder") not in (None, embedder_id):
                raise StoreError(f"{self.folder}: built with embedder {meta['embedder']}, but this run uses "
                                 f"{embedder_id}; pass the same --embedder or use a new --store")
            if "embedder" not in meta:
                self._set({"embedder": embedder_id, "dim": str(dim), "generation": "0"})
        self.embedder_id = self.meta().get("embedder")
        self.dim = int(self.meta().get("dim", dim or 0))
        self._index = None
        self._df, self._df_generation, self._count = {}, None, 0  # word -> matching chunks, per generation

    # --- metadata ------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def _set(self, values: dict[str, str]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))

    @property
    def generation(self) -> int:
        return int(self.meta().get("generation", 0))

    # --- writes (inside transaction()) ---------------------------------------------------
    @contextmanager
    def transaction(self):
        """All writes of an index run, committed together (and the generation bumped) or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self._set({"generation": str(self.generation + 1)})
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._index = None

    def files(self) -> dict[str, str]:
        """path -> content hash of every indexed file."""
        return dict(self.db.execute("SELECT path, sha256 FROM files"))

    def remove_file(self, path: str) -> None:
        self.db.execute("DELETE FROM chunks WHERE path = ?", (path,))
        self.db.execute("DELETE FROM files WHERE path = ?", (path,))

    def put_file(self, path: str, sha256: str, kind: str, title: str, chunks: list[dict], vectors: np.ndarray) -> None:
        """Replace everything stored for `path` with these chunks (dicts of heading, page, start, end, text)."""
        self.remove_file(path)
        self.db.execute("INSERT INTO files(path, sha256, kind, title, chunks) VALUES (?, ?, ?, ?, ?)",
                        (path, sha256, kind, title, len(chunks)))
        self.db.executemany(
            "INSERT INTO chunks(path, kind, title, heading, page, char_start, char_end, text, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(path, kind, title, c["heading"], c["page"], c["start"], c["end"], c["text"], v.astype(np.float32).tobytes())
             for c, v in zip(chunks, vectors)])

    # --- reads ---------------------------------------------------------------------------
    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def chunks(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        rows = self.db.execute(f"SELECT {COLUMNS} FROM chunks WHERE id IN ({','.join('?' * len(ids))})", ids)
        return {r[0]: dict(zip(NAMES, r)) for r in rows}

    def filtered_ids(self, ids: list[int], where: str, args: list) -> list[int]:
        """The subset of `ids` whose chunk satisfies the SQL condition `where`, in the given order."""
        if not where:
            return ids
        keep = {r[0] for r in self.db.execute(f"SELECT id FROM chunks WHERE {where} AND id IN ({','.join('?' * len(ids))})",
                                              [*args, *ids])}
        return [i for i in ids if i in keep]

    def bm25(self, query: str, k: int, where: str = "", args: list | None = None) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the best `k` FTS5 matches; any word may match (OR).

        In a large store, words found in more than COMMON_FRACTION of the chunks are left out of
        the OR query (the rarest three are kept if nothing else is left): their posting lists
        are most of a query's cost, and their near-zero IDF hardly moves the ranking.
        """
        words = self.query_words(query)
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in words)
        sql = ("SELECT chunks_fts.rowid, -bm25(chunks_fts) AS s FROM chunks_fts "
               + ("JOIN chunks ON chunks.id = chunks_fts.rowid " if where else "")
               + "WHERE chunks_fts MATCH ? " + (f"AND {where} " if where else "") + "ORDER BY bm25(chunks_fts) LIMIT ?")
        return [(int(i), float(s)) for i, s in self.db.execute(sql, [match, *(args or []), k])]

    def query_words(self, query: str) -> list[str]:
        words = _words(query)
        n = self.count_cached()
        if n < PRUNE_MIN_CHUNKS or len(words) <= 3:
            return words
        df = {w: self.doc_frequency(w) for w in words}
        kept = [w for w in words if df[w] <= COMMON_FRACTION * n]
        return kept or sorted(words, key=df.get)[:3]

    def count_cached(self) -> int:
        gen = self.generation
        if self._df_generation != gen:  # the store changed: counts start over
            self._df, self._df_generation, self._count = {}, gen, self.count()
        return self._count

    def doc_frequency(self, word: str) -> int:
        """Chunks matching `word` (as FTS5 matches it: stemmed), counted once per store generation."""
        self.count_cached()
        if word not in self._df:
            self._df[word] = self.db.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?",
                                             (f'"{word}"',)).fetchone()[0]
        return self._df[word]

    # --- vectors -------------------------------------------------------------------------
    def vector_index(self):
        """The FAISS index of the current generation (loaded, or rebuilt and saved)."""
        if self._index is not None:
            return self._index
        import faiss

        info_file, index_file = self.folder / "vectors.json", self.folder / "vectors.faiss"
        gen = self.generation
        try:
            info = json.loads(info_file.read_text())
            if info["generation"] == gen:
                self._index = faiss.read_index(str(index_file))
                if info.get("kind") == "hnsw":  # a store built by an older genlab keeps its own setting otherwise
                    faiss.downcast_index(self._index.index).hnsw.efSearch = HNSW_EF_SEARCH
                return self._index
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # missing, stale or unreadable: rebuild from SQLite
        self._index, kind = self._build()
        tmp = index_file.with_suffix(".faiss.tmp")
        faiss.write_index(self._index, str(tmp))
        tmp.replace(index_file)
        tmp_info = info_file.with_suffix(".json.tmp")
        tmp_info.write_text(json.dumps({"generation": gen, "kind": kind, "vectors": self._index.ntotal}))
        tmp_info.replace(info_file)
        return self._index

    def _build(self):
        import faiss

        rows = self.db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        if len(rows) <= EXACT_MAX:
            index, kind = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim)), "exact"
        else:
            hnsw = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 80, HNSW_EF_SEARCH
            index, kind = faiss.IndexIDMap2(hnsw), "hnsw"
        if len(rows):
            index.add_with_ids(vectors, ids)
        return index, kind

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        index = self.vector_index()
        if index.ntotal == 0:
            return []
        scores, ids = index.search(vector.reshape(1, -1).astype(np.float32), min(k, index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def close(self) -> None:
        self.db.close()


def _words(text: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\w+", text.lower())))

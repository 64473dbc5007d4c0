"""Cleaning a corpus: Unicode normalisation, length filters, exact and near-duplicate removal."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

WORD = re.compile(r"\w+", re.UNICODE)
MERSENNE = (1 << 61) - 1


@dataclass
class CleanStats:
    documents_in: int = 0
    empty: int = 0
    too_short: int = 0
    too_long: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    documents_out: int = 0


class MinHashIndex:
    """Near-duplicate detection: MinHash signatures over word 5-grams + LSH banding.

    Two documents whose shingle sets have Jaccard similarity >= ~threshold land in a shared band
    bucket with high probability; a candidate is confirmed by its estimated similarity.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 16, shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, MERSENNE, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE, num_perm, dtype=np.uint64)
        self.threshold, self.bands, self.rows, self.shingle = threshold, bands, num_perm // bands, shingle
        self.buckets: list[dict] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = WORD.findall(text.lower())
        grams = {" ".join(words[i : i + self.shingle]) for i in range(max(1, len(words) - self.shingle + 1))}
        hashes = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=7).digest(), "little") for g in grams],
                          dtype=np.uint64)
        # (a * h + b) mod p per permutation; uint64 wrap-around is fine for a hash family.
        return ((hashes[:, None] * self.a + self.b) % np.uint64(MERSENNE)).min(axis=0)

    def add_if_new(self, text: str) -> bool:
        """Index `text` and return True, or return False if a near-duplicate is already indexed."""
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        for band, key in enumerate(keys):
            for other in self.buckets[band].get(key, ()):
                if float((self.signatures[other] == sig).mean()) >= self.threshold:
                    return False
        idx = len(self.signatures)
        self.signatures.append(sig)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(idx)
        return True


def clean_documents(texts, min_chars: int = 1, max_chars: int | None = None, near_dedup: float | None = None,
                    stats: CleanStats | None = None):
    """Yield normalised (NFC), length-filtered, de-duplicated documents; counts go to `stats`."""
    stats = stats if stats is not None else CleanStats()
    seen: set[bytes] = set()
    index = MinHashIndex(threshold=near_dedup) if near_dedup else None
    for text in texts:
        stats.documents_in += 1
        text = unicodedata.normalize("NFC", text).strip()
        if not text:
            stats.empty += 1
            continue
        if len(text) < min_chars:
            stats.too_short += 1
            continue
        if max_chars and len(text) > max_chars:
            stats.too_long += 1
            continue
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            stats.exact_duplicates += 1
            continue
        seen.add(digest)
        if index is not None and not index.add_if_new(text):
            stats.near_duplicates += 1
            continue
        stats.documents_out += 1
        yield text

"""Tokenize a corpus once into memory-mapped token files.

A data folder holds `train.bin` / `val.bin` (the token stream: each document as
[bos] ids [eos], uint16 when the vocabulary fits, else uint32), `train_docs.npy` (document start
offsets) and `meta.json` (counts, dtype, and the cache key). The held-out split is by document
(a stable hash), so a document never straddles it. Re-running on unchanged input and tokenizer
reuses the folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from genlab.data.clean import CleanStats, clean_documents
from genlab.data.readers import iter_texts, list_files
from genlab.errors import DataError
from genlab.fsutil import atomic_dir, write_json

FORMAT_VERSION = 1


@dataclass
class TokenData:
    folder: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        """The token stream of `split` ("train" or "val") as a read-only memory map."""
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def _cache_key(sources, texts, tokenizer, options: dict) -> str:
    h = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, **options}, sort_keys=True).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    if texts is not None:
        for t in texts:
            h.update(hashlib.blake2b(t.encode(), digest_size=16).digest())
    else:
        for source in sources:
            for f in list_files(source, options["glob"]):
                st = f.stat()
                h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def in_heldout_split(doc: str, val_fraction: float) -> bool:
    """Whether a document (or record key) falls in the held-out split: a stable hash, so a
    document keeps its side of the split across runs, machines and corpus changes."""
    bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little") % 1_000_000
    return bucket < val_fraction * 1_000_000


def prepare_tokens(out_dir: str | Path, tokenizer, sources: Iterable | None = None, texts: list[str] | None = None,
                   val_fraction: float = 0.02, min_chars: int = 1, max_chars: int | None = None,
                   near_dedup: float | None = None, field: str = "text", glob: str = "**/*",
                   batch_size: int = 256, log=print) -> TokenData:
    """Clean, tokenize and split a corpus into `out_dir`, or reuse it if nothing changed."""
    out_dir = Path(out_dir)
    if (sources is None) == (texts is None):
        raise DataError("give either sources (paths) or texts")
    options = dict(val_fraction=val_fraction, min_chars=min_chars, max_chars=max_chars, near_dedup=near_dedup,
                   field=field, glob=glob)
    key = _cache_key(sources, texts, tokenizer, options)
    meta_file = out_dir / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            log(f"reusing tokenized data in {out_dir} ({meta['train_tokens']:,} train tokens)")
            return TokenData(out_dir, meta)

    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    eos = tokenizer.eos_token_id
    stats = CleanStats()
    docs = clean_documents(iter_texts(sources, field=field, glob=glob) if texts is None else texts,
                           min_chars=min_chars, max_chars=max_chars, near_dedup=near_dedup, stats=stats)
    start = time.perf_counter()
    counts = {"train": 0, "val": 0}
    doc_starts: list[int] = []
    with atomic_dir(out_dir) as tmp, open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        files = {"train": ftrain, "val": fval}

        def flush(batch: list[str]):
            # A batch call: the Rust tokenizer encodes the documents in parallel threads.
            for doc, ids in zip(batch, tokenizer(batch)["input_ids"]):
                ids = ids + [eos] if eos is not None else ids
                split = "val" if in_heldout_split(doc, val_fraction) else "train"
                if split == "train":
                    doc_starts.append(counts["train"])
                files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                counts[split] += len(ids)

        batch: list[str] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        ftrain.flush()
        fval.flush()
        if stats.documents_out == 0:
            raise DataError("the corpus is empty: no document left after reading and cleaning")
        if counts["val"] == 0 or counts["train"] == 0:
            # Too few documents for a document-level split: hold out the stream's tail instead.
            _split_tail(tmp, dtype, counts, max(val_fraction, 0.05))
            doc_starts = [s for s in doc_starts if s < counts["train"]] or [0]
        np.save(tmp / "train_docs.npy", np.asarray(doc_starts, dtype=np.int64))
        meta = dict(key=key, format=FORMAT_VERSION, dtype=np.dtype(dtype).name, vocab_size=vocab,
                    train_tokens=counts["train"], val_tokens=counts["val"], documents=stats.documents_out,
                    train_documents=len(doc_starts), cleaning=asdict(stats),
                    seconds=round(time.perf_counter() - start, 2))
        write_json(tmp / "meta.json", meta)
    log(f"tokenized {stats.documents_out:,} documents -> {counts['train']:,} train + {counts['val']:,} val tokens "
        f"({stats.exact_duplicates} exact and {stats.near_duplicates} near duplicates, {stats.empty} empty, "
        f"{stats.too_short + stats.too_long} out of length bounds dropped) in {meta['seconds']}s")
    return TokenData(out_dir, meta)


def _split_tail(folder: Path, dtype, counts: dict, fraction: float) -> None:
    stream = np.concatenate([np.fromfile(folder / "train.bin", dtype=dtype), np.fromfile(folder / "val.bin", dtype=dtype)])
    cut = len(stream) - max(1, int(len(stream) * fraction))
    stream[:cut].tofile(folder / "train.bin")
    stream[cut:].tofile(folder / "val.bin")
    counts["train"], counts["val"] = cut, len(stream) - cut

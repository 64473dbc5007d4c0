"""Data pipeline: readers, cleaning, de-duplication, memory-mapped token files and their cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from genlab.data.clean import CleanStats, MinHashIndex, clean_documents
from genlab.data.readers import iter_texts
from genlab.data.tokens import prepare_tokens
from genlab.errors import DataError

LONG = ("Sea surface temperature anomalies in the eastern Pacific drive the El Nino cycle, which in turn "
        "shifts rainfall over South America, Australia and Indonesia, and modulates global mean temperature. ") * 3


def test_csv_and_parquet_columns(tmp_path):
    pd.DataFrame({"id": [1, 2], "body": ["first row", "second row"]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"body": ["from parquet"]}).to_parquet(tmp_path / "t.parquet")
    assert list(iter_texts(tmp_path, field="body")) == ["first row", "second row", "from parquet"]
    with pytest.raises(DataError, match=r"t\.csv: no column 'text' \(columns: id, body\)"):
        list(iter_texts(tmp_path / "t.csv"))


def test_glob_selects_files(tmp_path):
    (tmp_path / "a.md").write_text("markdown")
    (tmp_path / "b.txt").write_text("text")
    assert list(iter_texts(tmp_path, glob="*.md")) == ["markdown"]


def test_cleaning_normalises_filters_and_deduplicates():
    docs = ["caf\u00e9 au lait", "cafe\u0301 au lait", "  ", "short", LONG, LONG.replace("Indonesia", "Borneo"),
            "An unrelated document about protein folding and the structure of enzymes in the cell. " * 3]
    stats = CleanStats()
    out = list(clean_documents(docs, min_chars=6, near_dedup=0.7, stats=stats))
    assert out == ["café au lait", LONG.strip(), docs[-1].strip()]
    assert (stats.exact_duplicates, stats.near_duplicates, stats.empty, stats.too_short) == (1, 1, 1, 1)
    assert stats.documents_in == 7 and stats.documents_out == 3


def test_minhash_similarity_tracks_jaccard():
    index = MinHashIndex(threshold=0.5)
    words = [f"w{i}" for i in range(400)]
    a, b = " ".join(words), " ".join(words[:200] + [f"x{i}" for i in range(200)])
    estimate = float((index.signature(a) == index.signature(b)).mean())
    grams = lambda ws: {" ".join(ws[i:i + 5]) for i in range(len(ws) - 4)}  # noqa: E731
    true = len(grams(a.split()) & grams(b.split())) / len(grams(a.split()) | grams(b.split()))
    assert abs(estimate - true) < 0.12


def test_token_files_layout_split_and_cache(tmp_path, tokenizer):
    corpus = tmp_path / "c.jsonl"
    docs = [f"Document number {i} talks about topic {i % 7}." for i in range(300)]
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    logs = []
    data = prepare_tokens(tmp_path / "data", tokenizer, sources=[corpus], val_fraction=0.1, log=logs.append)
    train, val = data.tokens("train"), data.tokens("val")
    assert train.dtype == np.uint16 and data.meta["documents"] == 300
    assert 0 < data.meta["val_tokens"] < data.meta["train_tokens"] and len(val) == data.meta["val_tokens"]
    starts = np.load(tmp_path / "data" / "train_docs.npy")
    first = train[starts[0]:starts[1]].tolist()
    assert first[0] == tokenizer.bos_token_id and first[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(first, skip_special_tokens=True) in docs
    # held-out documents never appear in training
    held = {tokenizer.decode(seq, skip_special_tokens=True) for seq in _split_docs(val.tolist(), tokenizer.eos_token_id)}
    trained = {tokenizer.decode(train[a:b].tolist(), skip_special_tokens=True) for a, b in zip(starts, list(starts[1:]) + [len(train)])}
    assert held and not held & trained and held | trained == set(docs)

    again = prepare_tokens(tmp_path / "data", tokenizer, sources=[corpus], val_fraction=0.1, log=logs.append)
    assert again.meta == data.meta and logs[-1].startswith("reusing tokenized data")
    corpus.write_text(corpus.read_text() + "\n" + json.dumps({"text": "one more document"}))
    changed = prepare_tokens(tmp_path / "data", tokenizer, sources=[corpus], val_fraction=0.1, log=logs.append)
    assert changed.meta["documents"] == 301 and changed.meta["key"] != data.meta["key"]


def _split_docs(ids, eos):
    doc = []
    for t in ids:
        doc.append(t)
        if t == eos:
            yield doc
            doc = []


def test_a_single_document_is_split_by_tail(tmp_path, tokenizer):
    data = prepare_tokens(tmp_path / "d", tokenizer, texts=[LONG], val_fraction=0.05)
    assert data.meta["val_tokens"] >= 1 and data.meta["train_tokens"] > data.meta["val_tokens"]


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path, tokenizer):
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_tokens(tmp_path / "d", tokenizer, texts=["", "   "])
    assert list(tmp_path.iterdir()) == []


def test_bundled_domain_corpus_is_identical_in_every_process():
    """scipy builds some docstrings with example output drawn at import time; the corpus (and
    with it the tokenized-data cache key and the held-out split) must not depend on that."""
    import subprocess
    import sys

    code = ("import hashlib, json; from genlab.data.corpus import statistics_corpus, statistics_instructions; "
            "c = statistics_corpus(); print(len(c), hashlib.sha256(json.dumps([c, statistics_instructions()]).encode()).hexdigest())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and int(runs[0].stdout.split()[0]) > 300

"""Text table models: the row constraint over a real byte-level BPE (every row parses, masks are
exact), fine-tuning a foundation model on GReaT text, constrained sampling, bad input."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import genlab
from genlab.codecs.table import ColumnSpec, TableSchema, _split_fields, parse_row
from genlab.errors import DataError, InvalidParameterError, ModelLoadError
from genlab.generate.constrain import accepted_tokens, token_bytes
from genlab.generate.sampling import SamplingParams
from genlab.synth.text_table import RowLanguage, TextTableModel, fit_text_table

CITIES = ["a, b", "back\\slash", "missing", "café", "東京", "x is y", "line\nbreak", "a"]
SCHEMA = TableSchema([
    ColumnSpec("age", "integer", min=18, max=90),
    ColumnSpec("city", "categorical", categories=CITIES),
    ColumnSpec("bmi", "numeric", min=15.0, max=45.5, decimals=1, missing=True),
    ColumnSpec("smoker", "boolean"),
    ColumnSpec("visits", "integer", min=0, max=12, levels=["0", "1", "2", "12"]),
    ColumnSpec("seen", "datetime", min="2020-01-30", max="2021-03-01", fmt="%Y-%m-%d"),
])
WHERE = ["city=café", "age=40..60", "bmi=..20"]
HARD_PREFIXES = ["city is caf".encode() + "é".encode()[:1], "seen is 2020-12-31, city is ".encode() + "東".encode()[:2],
                 b"city is a\\", b"city is a", b"bmi is mis", b"city is \\mis", b"smoker is true,", b"visits is 1",
                 b"age is 1", b"seen is 2021-02-2", b"city is x is", b"city is line\\nb", b"city is a, age is 90, bmi is 45.5"]


def oracle(text: str, specs: dict, first: set) -> bool:
    """Independent check: is `text` a prefix of a valid row (every column once, `first` columns
    before the others)? Built on the parser's field split and ColumnSpec.is_prefix/is_complete."""
    *whole, last = _split_fields(text)
    names = []
    for f in whole:
        name, sep, value = f.partition(" is ")
        if not sep or name not in specs or name in names or not specs[name].is_complete(value):
            return False
        names.append(name)

    def may_follow(name, before):
        return name in specs and name not in before and (name in first or first <= set(before))

    if not all(may_follow(n, names[:k]) for k, n in enumerate(names)):
        return False
    if last.endswith(","):  # a complete field and the separator's first half
        name, sep, value = last[:-1].partition(" is ")
        if sep and may_follow(name, names) and specs[name].is_complete(value) and len(names) + 1 < len(specs):
            return True
    if any(may_follow(n, names) and f"{n} is ".startswith(last) for n in specs):
        return True
    name, sep, value = last.partition(" is ")
    return bool(sep) and may_follow(name, names) and specs[name].is_prefix(value)


def oracle_bytes(data: bytes, specs: dict, first: set) -> bool:
    try:
        return oracle(data.decode(), specs, first)
    except UnicodeDecodeError as e:  # cut inside a character: does one of the table's characters fit?
        if e.end != len(data):
            return False
        head, tail = data[:e.start].decode(), data[e.start:]
        chars = {c for t in CITIES for c in t}
        return any(c.encode().startswith(tail) and oracle(head + c, specs, first) for c in chars)


def oracle_complete(data: bytes, specs: dict, first: set) -> bool:
    try:
        parse_row(data.decode(), TableSchema(list(specs.values())))
    except (DataError, UnicodeDecodeError):
        return False
    return oracle(data.decode(), specs, first)


def conditioned_specs() -> tuple[dict, set]:
    specs = {s.name: s for s in SCHEMA.columns}
    specs["city"] = ColumnSpec("city", "categorical", categories=["café"])
    specs["age"] = replace(specs["age"], min=40, max=60)
    specs["bmi"] = replace(specs["bmi"], max=20.0, missing=False)
    return specs, {"city", "age", "bmi"}


def random_walk(lang: RowLanguage, rng, stop_at: int | None = None):
    """Drive a constraint by a uniformly random choice among the tokens its mask allows."""
    c = lang.constraint()
    vocab = len(lang.token_data)
    steps = 0
    while not c.complete and steps != stop_at:
        allowed = torch.isfinite(c.mask(torch.zeros(vocab))).nonzero()[:, 0].tolist()
        token = int(rng.choice(allowed))
        if token in lang.eos:
            break
        c.advance(token)
        steps += 1
        assert steps < lang.max_tokens, "a row longer than any valid row"
    return c


def test_accepted_tokens_walks_the_vocabulary_exactly(tokenizer):
    """The sorted-vocabulary walk equals a token-by-token check, for any byte automaton."""
    data = token_bytes(tokenizer)

    def step(state, byte):  # at most `state` more bytes, each a lowercase letter or a space
        return state - 1 if state > 0 and (0x61 <= byte <= 0x7A or byte == 0x20) else None

    letters = set(b" abcdefghijklmnopqrstuvwxyz")
    for budget in (0, 1, 2, 5):
        expected = [t for t, b in enumerate(data) if b and len(b) <= budget and set(b) <= letters]
        assert sorted(accepted_tokens(tokenizer, step, budget)) == expected
        assert budget < 2 or len(expected) > 50


@pytest.mark.parametrize("where", [None, WHERE], ids=["free", "conditioned"])
def test_random_walks_write_only_valid_rows(tokenizer, where):
    lang = RowLanguage(SCHEMA, tokenizer, [tokenizer.eos_token_id], where)
    rng = np.random.default_rng(0)
    texts = [random_walk(lang, rng).text() for _ in range(300)]
    rows = [parse_row(t, SCHEMA) for t in texts]  # raises on anything invalid
    assert all(18 <= r["age"] <= 90 and (r["bmi"] is None or 15 <= r["bmi"] <= 45.5) for r in rows)
    assert all(r["visits"] in (0, 1, 2, 12) and r["seen"] <= pd.Timestamp("2021-03-01") for r in rows)
    if where is None:
        assert {r["city"] for r in rows} == set(CITIES)  # every category, escapes included
        assert all(any(escape in t for t in texts) for escape in ("\\,", "\\missing", "\\n", "\\\\"))
        assert any(r["bmi"] is None for r in rows) and len({t.split(" is ")[0] for t in texts}) == 6  # any first column
    else:
        assert all(r["city"] == "café" and 40 <= r["age"] <= 60 and r["bmi"] is not None and r["bmi"] <= 20
                   for r in rows)
        assert all(t.startswith("city is café, ") for t in texts) and lang.prefix_text == "city is café,"
        assert len({r["age"] for r in rows}) > 10


@pytest.mark.parametrize("where", [None, WHERE], ids=["free", "conditioned"])
def test_allowed_and_mask_agree_with_brute_force(tokenizer, where):
    lang = RowLanguage(SCHEMA, tokenizer, [tokenizer.eos_token_id], where)
    specs, first = (conditioned_specs() if where else ({s.name: s for s in SCHEMA.columns}, set()))
    data = token_bytes(tokenizer)
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(1)
    states = [random_walk(lang, rng, stop_at=None if i % 4 == 0 else int(rng.integers(0, 40)))  # some walk to the end
              for i in range(40)]
    single = {b[0]: t for t, b in enumerate(data) if len(b) == 1}
    for text in HARD_PREFIXES if where is None else []:  # inside a character, an escape, "missing" ...
        states.append(lang.constraint())
        for byte in text:
            states[-1].advance(single[byte])
    for c in states:
        written = lang.prefix_text.encode() + bytes(c.data)
        mask = torch.isfinite(c.mask(torch.zeros(len(data)))).tolist()
        for t in range(len(data)):
            if t == eos:
                expected = oracle_complete(written, specs, first)
            else:
                expected = bool(data[t]) and oracle_bytes(written + data[t], specs, first)
            assert c.allowed(t) == expected == mask[t], (written, data[t], expected)
        assert c.complete == (mask[eos] and sum(mask) == 1)  # complete: nothing but EOS may follow
        parse_row(c.text(), SCHEMA)  # closing() completes any state


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: "▁" marks spaces, a dummy space before each text, byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["The quick brown fox jumps over the lazy dog.", "Le café coûte 3 euros.", "age is 42, city is Paris"] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens are ordinary vocabulary entries, as in Llama's
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_rows_start_with_its_dummy_space():
    tok = sentencepiece_style_tokenizer()
    lang = RowLanguage(SCHEMA, tok, [tok.eos_token_id])
    assert lang.lead and lang.prompt_ids() == [tok.bos_token_id]  # "▁age" is how a training row starts
    rng = np.random.default_rng(2)
    walks = [random_walk(lang, rng) for _ in range(60)]
    assert all(w.data.startswith(b" ") for w in walks)  # the dummy space is written, then dropped
    assert {parse_row(w.text(), SCHEMA)["city"] for w in walks} >= {"café", "東京"}  # byte-fallback pieces
    conditioned = RowLanguage(SCHEMA, tok, [tok.eos_token_id], WHERE)
    assert not conditioned.lead and tok.convert_ids_to_tokens(conditioned.prompt_ids())[-1] == ","
    assert all(parse_row(random_walk(conditioned, rng).text(), SCHEMA)["city"] == "café" for _ in range(20))


def test_rows_cut_short_by_the_token_limit_are_completed(hf_folder, tokenizer):
    folder, _ = hf_folder("llama")
    model = genlab.load(folder)
    lang = RowLanguage(SCHEMA, tokenizer, [tokenizer.eos_token_id], ["smoker=true"])
    rows = [lang.constraint() for _ in range(4)]
    outs = model.engine.generate([lang.prompt_ids()], SamplingParams(max_new_tokens=5, n=4, seed=0), constraints=rows)
    assert [o.finish_reason for o in outs] == ["length"] * 4
    assert all(parse_row(r.text(), SCHEMA)["smoker"] is True for r in rows)
    with pytest.raises(InvalidParameterError, match="constraints for 4 completions"):
        model.engine.generate([lang.prompt_ids()], SamplingParams(n=4), constraints=rows[:1])


def small_table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    color = rng.choice(["red", "green", "blue"], n)
    return pd.DataFrame({"color": color, "size": (rng.normal(10, 2, n) + (color == "red") * 3).round(1),
                         "count": rng.integers(0, 5, n)})


def test_fit_a_foundation_model_and_sample_conditionally(hf_folder, tmp_path, one_torch_thread):
    folder, _ = hf_folder("llama")
    fit = fit_text_table(small_table(), folder, tmp_path / "run", max_steps=30, batch_size=4, lr=1e-2,
                         warmup_steps=3, eval_every=15, checkpoint_every=30, log_every=5)
    assert fit.model_dir.name == "adapter" and (fit.model_dir / "table_schema.json").exists()
    assert fit.finetune.domain_loss_after < fit.finetune.domain_loss_before
    table = json.loads((fit.model_dir / "genlab.json").read_text())["provenance"]["table"]
    assert table["rows"] == 60 and table["permutations"] == 3 and table["base"] == str(folder.resolve())
    assert table["columns"] == ["color", "size", "count"] and not (fit.out / "data").exists()

    model = TextTableModel.load(fit.out)  # the run folder finds its adapter
    start = time.perf_counter()
    rows = model.sample(20, where=["color=red", "size=8..12"], seed=3, batch_size=10)
    rate = 20 / (time.perf_counter() - start)
    assert len(rows) == 20 and (rows["color"] == "red").all() and rows["size"].between(8, 12).all()
    assert list(rows.columns) == ["color", "size", "count"] and rows["count"].between(0, 4).all()
    assert rows.equals(model.sample(20, where=["color=red", "size=8..12"], seed=3, batch_size=7))  # batch-independent
    free = model.sample(30, seed=0, batch_size=30)
    assert set(free["color"]) <= {"red", "green", "blue"} and len(free) == 30
    print(f"sampling: {rate:.0f} rows/s (tiny llama, batch 10)")


def test_bad_input_is_one_clear_error(hf_folder, tmp_path):
    folder, _ = hf_folder("llama")
    table_model = tmp_path / "table-model"
    table_model.mkdir()
    (table_model / "config.json").write_text("{}")
    (table_model / "genlab.json").write_text(json.dumps({"codec": {"type": "table"}}))
    with pytest.raises(ModelLoadError, match="a table model, not a text model"):
        fit_text_table(small_table(), table_model, tmp_path / "out1")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        fit_text_table(small_table(), tmp_path, tmp_path / "out2")
    with pytest.raises(DataError, match="0 rows"):
        fit_text_table(small_table().iloc[:0], folder, tmp_path / "out3")
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))  # nothing half-written
    with pytest.raises(ModelLoadError, match="not a text table model"):
        TextTableModel.load(folder)


def test_cli_fit_with_base_and_sample(hf_folder, tmp_path):
    from typer.testing import CliRunner

    from genlab.cli import app

    folder, _ = hf_folder("llama")
    csv = tmp_path / "t.csv"
    small_table().to_csv(csv, index=False)
    runner = CliRunner()
    fit = runner.invoke(app, ["synth", "fit", str(csv), "--base", str(folder), "--out", str(tmp_path / "run"),
                              "--max-steps", "4", "--batch-size", "4"])
    assert fit.exit_code == 0, fit.output
    sample = runner.invoke(app, ["synth", "sample", str(tmp_path / "run"), "-n", "6", "--where", "color=blue",
                                 "--out", str(tmp_path / "s.csv")])
    assert sample.exit_code == 0, sample.output
    rows = pd.read_csv(tmp_path / "s.csv")
    assert len(rows) == 6 and (rows["color"] == "blue").all()
    refused = runner.invoke(app, ["synth", "sample", str(tmp_path / "run"), "-n", "6", "--no-copies-of", str(csv)])
    assert isinstance(refused.exception, InvalidParameterError)  # main() turns it into one line, exit code 2
    assert "table models fitted from scratch" in str(refused.exception)

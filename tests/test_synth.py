"""Table models: the row grammar (every sampled row valid, conditions honoured), fitting into a
model folder, sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from genlab.codecs.table import ColumnSpec, TableSchema, parse_row
from genlab.errors import InvalidParameterError
from genlab.synth.grammar import BOS, EOS, RowGrammar, TableTokenizer

SCHEMA = TableSchema([
    ColumnSpec("age", "integer", min=18, max=90),
    ColumnSpec("sex", "categorical", categories=["F", "M"]),
    ColumnSpec("bmi", "numeric", min=15.0, max=45.5, decimals=1, missing=True),
    ColumnSpec("smoker", "boolean"),
    ColumnSpec("visits", "integer", min=0, max=12, levels=["0", "1", "2", "3", "12"]),
])


def random_rows(grammar: RowGrammar, n: int, seed: int = 0) -> list[list[int]]:
    """Rows written by a uniformly random 'model' through the grammar's masks."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        state, ids = grammar.start(), grammar.prefix_ids()
        while not state.finished:
            allowed = np.flatnonzero(grammar.masks([state])[0].numpy())
            token = int(rng.choice(allowed))
            grammar.advance(state, token)
            ids.append(token)
        rows.append(ids)
    return rows


def as_text(tok: TableTokenizer, ids: list[int]) -> str:
    values = tok.decode(ids)
    return ", ".join(f"{name} is {values[name]}" for name in tok.schema.names())


def test_tokenizer_round_trip_and_vocabulary():
    tok = TableTokenizer(SCHEMA)
    row = {"age": "42", "sex": "F", "bmi": "missing", "smoker": "true", "visits": "12"}
    ids = tok.encode(row, ["bmi", "sex", "age", "visits", "smoker"])
    assert ids[0] == BOS and ids[-1] == EOS
    assert len(ids) == 1 + 5 + len(row["age"]) + 4 + 1  # BOS, column tokens, "42" spelled, 4 one-token values, EOS
    assert tok.decode(ids) == row
    assert len(tok) == 4 + 5 + 2 + 2 + 5 + 12  # specials, columns, categories, boolean, levels, 0-9 - .


def test_every_row_through_the_grammar_is_valid():
    """Even a model that picks uniformly among allowed tokens writes only valid rows."""
    tok = TableTokenizer(SCHEMA)
    grammar = RowGrammar(tok)
    for ids in random_rows(grammar, 300):
        parsed = parse_row(as_text(tok, ids), SCHEMA)  # raises on anything invalid
        assert 18 <= parsed["age"] <= 90 and parsed["sex"] in ("F", "M")
        assert parsed["bmi"] is None or 15.0 <= parsed["bmi"] <= 45.5
        assert parsed["visits"] in (0, 1, 2, 3, 12)  # a levels column writes only its levels
        assert len(ids) <= len(grammar.prefix_ids()) + grammar.max_length()


def test_conditions_fix_values_and_narrow_ranges():
    tok = TableTokenizer(SCHEMA)
    grammar = RowGrammar(tok, fixed={"sex": "M"}, ranges={"age": (40, 60), "bmi": (None, 20), "visits": (2, 20)})
    rows = [parse_row(as_text(tok, ids), SCHEMA) for ids in random_rows(grammar, 200, seed=1)]
    assert all(r["sex"] == "M" and 40 <= r["age"] <= 60 and r["bmi"] is not None and r["bmi"] <= 20 for r in rows)
    assert len({r["age"] for r in rows}) > 10  # the range is explored, not a single value
    assert {r["visits"] for r in rows} == {2, 3, 12}  # the levels inside the range, all of them
    with pytest.raises(InvalidParameterError, match="not a valid value"):
        RowGrammar(tok, fixed={"visits": "5"})  # inside min..max but not a level
    with pytest.raises(InvalidParameterError, match="unknown column"):
        RowGrammar(tok, fixed={"height": "1"})
    with pytest.raises(InvalidParameterError, match="not a valid value"):
        RowGrammar(tok, fixed={"sex": "X"})
    with pytest.raises(InvalidParameterError, match="no value"):
        RowGrammar(tok, ranges={"age": (95, 99)})


@pytest.fixture(scope="module")
def wine_model(tmp_path_factory):
    from genlab.data.tables import bundled_table
    from genlab.synth.model import fit_table

    df = bundled_table("wine")
    run = fit_table(df, out=str(tmp_path_factory.mktemp("synth") / "wine"), max_steps=60, eval_every=30,
                    log_every=10, checkpoint_every=60)
    assert run.result.val_loss < run.val_loss_before - 0.5
    return run, df


def test_fitted_model_samples_valid_rows_and_honours_conditions(wine_model):
    from genlab.model import io
    from genlab.synth.model import TableModel

    run, real = wine_model
    assert isinstance(io.load(run.model_dir).tokenizer, TableTokenizer)
    model = TableModel.load(run.model_dir)
    rows = model.sample(200, seed=1, batch_size=64)
    assert list(rows.columns) == list(real.columns) and len(rows) == 200
    for spec in run.schema.columns:
        column = rows[spec.name]
        if spec.kind == "categorical":
            assert set(column) <= set(spec.categories)
        else:
            assert column.between(spec.min, spec.max).all()
    assert rows["cultivar"].nunique() == 3  # every class appears
    # the model learnt something: sampled alcohol has roughly the real spread, not uniform noise over its range
    assert abs(rows["alcohol"].mean() - real["alcohol"].mean()) < 0.5
    assert model.sample(200, seed=1, batch_size=64).equals(rows)  # seeded
    picked = model.sample(40, where=["cultivar=class_2", "alcohol=12.5..13.5"], seed=2)
    assert (picked["cultivar"] == "class_2").all() and picked["alcohol"].between(12.5, 13.5).all()


def test_sampling_is_batched_with_the_kv_cache(wine_model):
    from genlab.synth.model import TableModel

    model = TableModel.load(wine_model[0].model_dir)
    calls = []
    forward = model.module.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return forward(*args, **kwargs)

    model.module.forward = counting
    with torch.inference_mode():
        model.sample(100, seed=0, batch_size=100)
    assert calls[0][0] == 100 and all(shape == (100, 1) for shape in calls[1:])  # one prefill, then one token per row
    assert len(calls) <= RowGrammar(model.tok).max_length() + 1


def test_cli_fit_and_sample(tmp_path):
    import subprocess
    import sys

    data = pd.DataFrame({"patient_id": [f"P{i:05d}" for i in range(60)], "age": np.arange(60) % 50 + 20,
                         "group": ["a", "b", "c"] * 20})
    csv = tmp_path / "patients.csv"
    data.to_csv(csv, index=False)
    run = subprocess.run([sys.executable, "-m", "genlab.cli", "synth", "fit", str(csv), "--out", str(tmp_path / "m"),
                          "--max-steps", "10"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "patient_id" in run.stderr and "identifier" in run.stderr  # excluded, with a warning
    run = subprocess.run([sys.executable, "-m", "genlab.cli", "synth", "sample", str(tmp_path / "m" / "model"),
                          "-n", "30", "--out", str(tmp_path / "s.csv"), "--where", "group=b"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    sampled = pd.read_csv(tmp_path / "s.csv")
    assert list(sampled.columns) == ["age", "group"] and (sampled["group"] == "b").all() and len(sampled) == 30
    assert sampled["age"].between(20, 69).all()
    run = subprocess.run([sys.executable, "-m", "genlab.cli", "synth", "sample", str(tmp_path / "m" / "model"),
                          "-n", "30", "--out", str(tmp_path / "s2.csv"), "--where", "group=b", "--no-copies-of", str(csv)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    fresh = pd.read_csv(tmp_path / "s2.csv")
    seen = set(zip(data["age"], data["group"]))
    assert len(fresh) == 30 and not any((a, g) in seen for a, g in zip(fresh["age"], fresh["group"]))
    assert "dropped" in run.stderr and "drawn rows equal to a row of" in run.stderr


def test_no_copies_filter_refuses_when_every_possible_row_is_a_copy(tmp_path):
    from genlab.errors import DataError
    from genlab.synth.model import TableModel, fit_table

    data = pd.DataFrame({"x": [0, 1] * 20, "y": ["a", "a", "b", "b"] * 10})  # all 4 possible rows occur
    run = fit_table(data, out=str(tmp_path / "m"), max_steps=3, eval_every=10)
    assert run.schema.columns[0].levels == ["0", "1"]
    model = TableModel.load(run.model_dir)
    assert len(set(model.row_texts(data))) == 4 and model.row_texts(data.assign(x=7))[0] is None  # 7: not a level
    assert model.sample(50, seed=0).attrs["copies_dropped"] == 0
    with pytest.raises(DataError, match="only 0 of 5 rows differ"):
        model.sample(5, no_copies_of=data, batch_size=64)

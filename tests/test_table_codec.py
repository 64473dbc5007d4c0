"""Table schema and GReaT text codec: inference, exact round trips on the bundled real tables,
exclusions, errors, and brute-force checks of the per-column prefix tests a constrained decoder uses."""

from __future__ import annotations

import itertools
import logging
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from genlab.codecs.table import (
    ColumnSpec,
    TableSchema,
    decode_rows,
    encode_table,
    infer_schema,
    parse_row,
    serialize_row,
)
from genlab.data.tables import BUNDLED_TABLES, bundled_table, read_table
from genlab.errors import DataError


def _bundled(name: str) -> pd.DataFrame:
    frame = bundled_table(name)
    return frame.head(2000) if name == "randhie" else frame


def _assert_round_trip(original: pd.DataFrame, decoded: pd.DataFrame, schema: TableSchema) -> None:
    assert list(decoded.columns) == schema.names()
    for spec in schema.columns:
        got, want = decoded[spec.name], original[spec.name]
        assert got.isna().tolist() == want.isna().tolist(), spec.name
        got, want = got[want.notna()], want[want.notna()]
        if spec.kind == "numeric":
            x = got.to_numpy(float)
            # within half a unit of the last kept decimal, and written with exactly that many
            assert np.all(np.abs(x - want.to_numpy(float)) <= 0.5 * 10.0**-spec.decimals + 1e-9), spec.name
            np.testing.assert_allclose(x, np.round(x, spec.decimals), rtol=0, atol=1e-12)
        elif spec.kind == "integer":
            assert got.astype("int64").tolist() == want.astype("int64").tolist(), spec.name
        elif spec.kind == "datetime":
            assert got.tolist() == pd.to_datetime(want).tolist(), spec.name
        else:
            assert got.astype(object).tolist() == want.astype(object).tolist(), spec.name


@pytest.mark.parametrize("name", BUNDLED_TABLES)
def test_bundled_tables_round_trip(name):
    frame = _bundled(name)
    warnings = []
    schema = infer_schema(frame, warn=warnings.append)
    assert warnings == [] and schema.excluded == {}  # real tables: every column is usable
    assert schema.names() == [str(c) for c in frame.columns]
    texts = encode_table(frame, schema, rng=np.random.default_rng(0))
    assert len(texts) == len(frame)
    decoded = decode_rows(texts, schema)
    _assert_round_trip(frame, decoded, schema)
    # dtypes come back by kind: 0/1 and whole-number columns are integers, targets categories
    kinds = {s.name: s.kind for s in schema.columns}
    for column, kind in kinds.items():
        dtype = decoded[column].dtype
        expected = {"numeric": "float64", "integer": "int64", "categorical": "category"}[kind]
        assert str(dtype) == expected, column
    if name == "wine":
        assert schema.column("cultivar").categories == ["class_0", "class_1", "class_2"]
        assert kinds["magnesium"] == "integer" and kinds["alcohol"] == "numeric"
    if name == "breast_cancer":
        assert schema.column("diagnosis").categories == ["benign", "malignant"]
    if name == "heart":
        assert kinds == {"survival": "integer", "censors": "integer", "age": "numeric"}
        assert schema.column("age").decimals == 1 and schema.column("censors").max == 1


def _mixed_frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    stamps = pd.Timestamp("2021-03-01 08:00:00") + pd.to_timedelta(rng.integers(0, 10**6, n), unit="s")
    frame = pd.DataFrame({
        "age": rng.integers(18, 90, n).astype(float),
        "weight kg": np.round(rng.normal(70, 12, n), 2),
        "city": rng.choice(["Paris", "Lyon, Rhône", "missing", "back\\slash", "new\nline"], n),
        "smoker": rng.random(n) < 0.3,
        "visit": stamps,
        "day": pd.to_datetime("2020-01-01") + pd.to_timedelta(rng.integers(0, 400, n), unit="D"),
        "flag": rng.integers(0, 2, n),
        "code": rng.choice(["007", "042", "100"], n),
    })
    frame["smoker"] = frame["smoker"].astype(object)
    for column, rows in {"age": [3, 7], "weight kg": [0], "city": [5], "smoker": [2, 9], "visit": [4], "day": [1]}.items():
        frame.loc[rows, column] = None
    frame["smoker"] = frame["smoker"].astype("boolean")
    return frame


def test_all_kinds_missing_and_escapes_round_trip(tmp_path):
    frame = _mixed_frame()
    schema = infer_schema(frame, warn=lambda m: pytest.fail(m))
    kinds = {s.name: s.kind for s in schema.columns}
    assert kinds == {"age": "integer", "weight kg": "numeric", "city": "categorical", "smoker": "boolean",
                     "visit": "datetime", "day": "datetime", "flag": "integer", "code": "categorical"}
    assert schema.column("visit").fmt == "%Y-%m-%d %H:%M:%S" and schema.column("day").fmt == "%Y-%m-%d"
    assert [s.missing for s in schema.columns] == [True] * 6 + [False] * 2
    assert schema.column("code").categories == ["007", "042", "100"]  # codes keep leading zeros
    texts = encode_table(frame, schema)
    # the category "missing" is escaped, so a real missing value stays distinguishable
    assert any("city is \\missing" in t for t in texts) and any("city is missing" in t for t in texts)
    assert any("city is Lyon\\, Rhône" in t for t in texts)
    assert all("\n" not in t for t in texts)
    decoded = decode_rows(texts, schema)
    _assert_round_trip(frame, decoded, schema)
    assert str(decoded["age"].dtype) == "Int64" and str(decoded["smoker"].dtype) == "boolean"
    assert str(decoded["flag"].dtype) == "int64" and str(decoded["visit"].dtype).startswith("datetime64")
    # the schema file round trips exactly
    schema.save(tmp_path / "schema.json")
    loaded = TableSchema.load(tmp_path / "schema.json")
    assert loaded == schema and decode_rows(texts, loaded).equals(decoded)


def test_random_column_order_parses_the_same():
    frame = _bundled("wine").head(30)
    schema = infer_schema(frame)
    plain = encode_table(frame, schema)
    shuffled = encode_table(frame, schema, rng=np.random.default_rng(7))
    orders = {tuple(f.split(" is ")[0] for f in t.split(", ")) for t in shuffled}
    assert len(orders) == 30  # every row its own order (14 columns)
    assert plain[0].startswith("alcohol is 14.23, malic_acid is 1.71")
    for a, b in zip(plain, shuffled):
        assert a != b and sorted(a.split(", ")) == sorted(b.split(", "))
        assert parse_row(a, schema) == parse_row(b, schema)
    row = frame.iloc[3]
    assert serialize_row(row, schema) == plain[3]
    assert parse_row(serialize_row(row.to_dict(), schema, np.random.default_rng(1)), schema) == parse_row(plain[3], schema)


def test_identifiers_free_text_and_mixed_types_are_excluded(caplog):
    n = 100
    rng = np.random.default_rng(2)
    words = ["fever", "cough", "rash", "pain", "nausea", "fatigue", "dizzy", "chills"]
    sentences = [" ".join(rng.choice(words, 6)) + f" for {k} days" for k in range(70)]
    frame = pd.DataFrame({
        "row_id": np.arange(n),  # sequential integers
        "patient": [f"P{rng.integers(10**6):07d}-{i}" for i in range(n)],  # unique strings
        "record_no": np.sort(rng.choice(10**6, n, replace=False)),  # unique, monotone, not sequential
        "notes": [sentences[i % 70] for i in range(n)],  # 70 distinct texts: not categories, not ids
        "dose": [str(v) for v in rng.integers(1, 500, n)],
        "bmi": rng.normal(25, 3, n).round(1),
        "sex": rng.choice(["f", "m"], n),
    })
    frame["dose"] = frame["dose"].astype(object)
    frame.loc[[4, 17], "dose"] = ["n/a", "see chart"]
    warnings = []
    schema = infer_schema(frame, warn=warnings.append)
    assert schema.names() == ["bmi", "sex"]
    assert set(schema.excluded) == {"row_id", "patient", "record_no", "notes", "dose"}
    assert schema.excluded["row_id"].startswith("identifier: 100 unique values of 100")
    assert schema.excluded["record_no"].startswith("identifier")
    assert schema.excluded["patient"].startswith("identifier")
    assert schema.excluded["notes"].startswith("free text")
    reason = schema.excluded["dose"]
    assert reason.startswith("mixed types") and "'n/a'" in reason and "'see chart'" in reason
    assert len(warnings) == 5 and all(any(repr(c) in w for w in warnings) for c in schema.excluded)
    # never serialised: neither the names nor any of their values reach the text
    texts = encode_table(frame, schema, rng=np.random.default_rng(0))
    for text in texts:
        assert text.count(" is ") == 2
        for column in schema.excluded:
            assert f"{column} is" not in text
        assert not any(p in text for p in frame["patient"])
    with pytest.raises(DataError, match="unknown column 'patient' \\(excluded"):
        parse_row(texts[0] + ", patient is P1", schema)
    # the default warning goes to the genlab.table logger
    with caplog.at_level(logging.WARNING, logger="genlab.table"):
        infer_schema(frame)
    assert "'dose' is excluded" in caplog.text


def test_tiny_and_malformed_tables_are_refused():
    with pytest.raises(DataError, match="too small.*5 rows"):
        infer_schema(pd.DataFrame({"a": range(5), "b": range(5)}))
    with pytest.raises(DataError, match="1 usable column"):
        infer_schema(pd.DataFrame({"a": np.arange(20) % 3, "id": [f"u{i}" for i in range(20)]}), warn=lambda m: None)
    with pytest.raises(DataError, match="empty name"):
        infer_schema(pd.DataFrame({"": np.arange(20) % 3, "b": np.arange(20) % 4}))
    with pytest.raises(DataError, match="duplicate column names: 'a'"):
        infer_schema(pd.DataFrame([[1, 2, 3]] * 20, columns=["a", "b", "a"]))
    for bad in ("x, y", "x is y", "x is", "a\\b"):
        with pytest.raises(DataError, match="rename the column"):
            infer_schema(pd.DataFrame({bad: np.arange(20) % 3, "b": np.arange(20) % 4}))
    # an excluded column's name is never written, so it may hold separators
    notes = [f"note number {i}" for i in range(20)]
    schema = infer_schema(pd.DataFrame({"a": np.arange(20) % 3, "b": np.arange(20) % 4, "x, is y": notes}),
                          warn=lambda m: None)
    assert schema.names() == ["a", "b"] and list(schema.excluded) == ["x, is y"]


def _schema() -> TableSchema:
    return TableSchema([
        ColumnSpec("age", "integer", min=0, max=120),
        ColumnSpec("bmi", "numeric", min=12.5, max=60.0, decimals=1, missing=True),
        ColumnSpec("sex", "categorical", categories=["f", "m"]),
        ColumnSpec("smoker", "boolean"),
        ColumnSpec("seen", "datetime", min="2020-01-01", max="2020-12-31", fmt="%Y-%m-%d"),
    ])


def test_parse_row_validates_and_names_the_column():
    schema = _schema()
    good = "sex is m, age is 44, bmi is missing, smoker is true, seen is 2020-02-29"
    assert parse_row(good, schema) == {"age": 44, "bmi": None, "sex": "m", "smoker": True,
                                       "seen": pd.Timestamp("2020-02-29")}
    cases = {
        "age is 121": "column 'age': bad value '121' \\(expected an integer in \\[0, 120\\]\\)",
        "age is 044": "column 'age': bad value '044'",
        "age is 4.0": "column 'age': bad value '4.0'",
        "bmi is 22.55": "column 'bmi': bad value '22.55' \\(expected a number with 1 decimals",
        "bmi is 12.4": "column 'bmi': bad value '12.4'",
        "sex is x": "column 'sex': bad value 'x' \\(expected one of 'f', 'm'\\)",
        "sex is missing": "column 'sex': bad value 'missing'",
        "smoker is yes": "column 'smoker': bad value 'yes'",
        "seen is 2021-02-29": "column 'seen': bad value '2021-02-29'",
        "seen is 2021-01-01": "column 'seen': bad value '2021-01-01'",
    }
    for field, message in cases.items():
        name = field.split(" is ")[0]
        text = ", ".join(field if f.startswith(name + " is") else f for f in good.split(", "))
        with pytest.raises(DataError, match=message):
            parse_row(text, schema)
    with pytest.raises(DataError, match="column 'age' appears twice"):
        parse_row(good + ", age is 3", schema)
    with pytest.raises(DataError, match="no value for column\\(s\\) 'seen'"):
        parse_row(good.replace(", seen is 2020-02-29", ""), schema)
    with pytest.raises(DataError, match="unknown column 'height'"):
        parse_row(good + ", height is 3", schema)
    with pytest.raises(DataError, match="row 1: column 'age'"):
        decode_rows([good, good.replace("age is 44", "age is -1")], schema)
    with pytest.raises(DataError, match="row 0: column 'sex': value 'x' is not one of"):
        encode_table(pd.DataFrame({"age": [1], "bmi": [20.0], "sex": ["x"], "smoker": [True],
                                   "seen": ["2020-05-05"]}), schema)


def test_spec_format_and_parse():
    price = ColumnSpec("price", "numeric", min=-10, max=10, decimals=2)
    assert price.format(3.14159) == "3.14" and price.format(-0.001) == "0.00" and price.format(2) == "2.00"
    assert price.parse("-9.50") == -9.5 and price.parse("10.00") == 10.0
    with pytest.raises(DataError, match="column 'price': value '10.01' is not a number with 2 decimals in \\[-10, 10\\]"):
        price.format(10.01)
    with pytest.raises(DataError, match="missing value"):
        price.format(float("nan"))
    count = ColumnSpec("n", "integer", min=-5, max=5, missing=True)
    assert count.format(np.int64(-5)) == "-5" and count.format(3.0) == "3" and count.format(pd.NA) == "missing"
    with pytest.raises(DataError):
        count.format(2.5)
    flag = ColumnSpec("flag", "boolean")
    assert flag.categories == ["false", "true"] and flag.format(np.bool_(False)) == "false" and flag.parse("true") is True
    place = ColumnSpec("place", "categorical", categories=["missing", "a, b", "c\\d"])
    assert [place.format(c) for c in place.categories] == ["\\missing", "a\\, b", "c\\\\d"]
    assert [place.parse(place.format(c)) for c in place.categories] == place.categories
    stamp = ColumnSpec("t", "datetime", min="2020-01-01 00:00:00", max="2020-01-02 00:00:00", fmt="%Y-%m-%d %H:%M:%S")
    assert stamp.format(pd.Timestamp("2020-01-01 12:30:05", tz="Europe/Paris")) == "2020-01-01 11:30:05"
    assert stamp.parse("2020-01-01 23:59:59") == pd.Timestamp("2020-01-01 23:59:59")


def _check_prefixes(spec: ColumnSpec, valid: set[str], candidates) -> None:
    prefixes = {v[:i] for v in valid for i in range(len(v) + 1)}
    for text in candidates:
        assert spec.is_prefix(text) == (text in prefixes), (spec, text)
        assert spec.is_complete(text) == (text in valid), (spec, text)


def _all_strings(alphabet: str, length: int):
    for n in range(length + 1):
        for chars in itertools.product(alphabet, repeat=n):
            yield "".join(chars)


def _numbers(lo: int, hi: int, decimals: int) -> set[str]:
    """Canonical texts of the scaled integers lo..hi, written independently of the codec."""
    texts = set()
    for n in range(lo, hi + 1):
        sign = "-" if n < 0 else ""
        whole, frac = divmod(abs(n), 10**decimals)
        texts.add(sign + str(whole) + (f".{frac:0{decimals}d}" if decimals else ""))
    return texts


def test_is_prefix_brute_force_fixed_specs():
    integer = ColumnSpec("n", "integer", min=-5, max=120)
    _check_prefixes(integer, _numbers(-5, 120, 0), _all_strings("-.01259m", 4))
    assert integer.is_prefix("1") and integer.is_prefix("12") and not integer.is_prefix("121")
    assert not integer.is_prefix("-6") and not integer.is_prefix("-0") and not integer.is_prefix("m")
    above = ColumnSpec("n", "integer", min=-3)  # no max: any long enough completion fits
    assert [above.is_prefix(t) for t in ("-", "-3", "-4", "-0", "0", "00", "98765432109876543210")] == [
        True, True, False, False, True, False, True]
    numeric = ColumnSpec("x", "numeric", min=-2.5, max=3.5, decimals=1)
    _check_prefixes(numeric, _numbers(-25, 35, 1), _all_strings("-.012359", 4))
    assert numeric.is_prefix("3.") and numeric.is_prefix("-0") and not numeric.is_prefix("3.6")
    with_missing = ColumnSpec("x", "numeric", min=-2.5, max=3.5, decimals=1, missing=True)
    _check_prefixes(with_missing, _numbers(-25, 35, 1) | {"missing"}, _all_strings("-.03mis", 4))
    assert with_missing.is_prefix("missin") and with_missing.is_complete("missing")
    categories = ["a", "ab", "b, c", "missing", "b"]
    for missing in (False, True):
        spec = ColumnSpec("c", "categorical", categories=categories, missing=missing)
        valid = {spec.format(c) for c in categories} | ({"missing"} if missing else set())
        _check_prefixes(spec, valid, _all_strings("ab,\\ cm", 4))
        assert spec.is_prefix("\\m") and spec.is_prefix("m") == missing


def test_is_prefix_brute_force_random_ranges():
    rng = np.random.default_rng(3)
    alphabet = "-.01259"
    strings = list(_all_strings(alphabet, 4))
    for _ in range(25):
        decimals = int(rng.integers(0, 3))
        lo, hi = sorted(int(v) for v in rng.integers(-150, 150, 2))
        spec = ColumnSpec("x", "numeric" if decimals else "integer", min=lo / 10**decimals,
                          max=hi / 10**decimals, decimals=decimals)
        _check_prefixes(spec, _numbers(lo, hi, decimals), strings)
    # a bound off the decimal grid: the nearest values inside count
    off_grid = ColumnSpec("x", "numeric", min=0.05, max=0.31, decimals=1)
    _check_prefixes(off_grid, _numbers(1, 3, 1), strings)


def test_is_prefix_datetime_exact():
    day = ColumnSpec("d", "datetime", min="2019-12-30", max="2020-03-01", fmt="%Y-%m-%d")
    first = datetime(2019, 12, 30)
    days = {(first + timedelta(days=k)).strftime("%Y-%m-%d") for k in range(63)}
    prefixes = {v[:i] for v in days for i in range(11)}
    # every one-character extension of every valid prefix (what a decoder asks), plus junk
    candidates = prefixes | {p + c for p in prefixes for c in "0123456789-: x"}
    _check_prefixes(day, days, candidates)
    assert day.is_prefix("2020-02-2") and day.is_complete("2020-02-29") and not day.is_prefix("2020-02-3")
    second = ColumnSpec("t", "datetime", min="2020-02-29 23:58:30", max="2020-03-01 00:01:10",
                        fmt="%Y-%m-%d %H:%M:%S", missing=True)
    start = datetime(2020, 2, 29, 23, 58, 30)
    times = {(start + timedelta(seconds=k)).strftime("%Y-%m-%d %H:%M:%S") for k in range(161)} | {"missing"}
    prefixes = {v[:i] for v in times for i in range(len(v) + 1)}
    _check_prefixes(second, times, prefixes | {p + c for p in prefixes for c in "0123569-: m"})


def test_bundled_and_read_table(tmp_path):
    assert BUNDLED_TABLES == ("randhie", "heart", "breast_cancer", "wine")
    assert bundled_table("randhie").shape == (20190, 10)
    with pytest.raises(DataError, match="unknown bundled table 'iris'.*randhie, heart, breast_cancer, wine"):
        bundled_table("iris")
    frame = _mixed_frame().drop(columns=["smoker"])
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    from_parquet = read_table(tmp_path / "t.parquet")
    assert from_parquet.equals(frame)
    from_csv = read_table(tmp_path / "t.csv")
    assert from_csv.shape == frame.shape
    # the CSV's text dates are inferred as datetimes again (read_csv itself turns "007" into 7)
    schema = infer_schema(from_csv)
    assert [s.kind for s in schema.columns] == ["integer", "numeric", "categorical", "datetime", "datetime",
                                                "integer", "integer"]
    assert schema.column("visit").fmt == "%Y-%m-%d %H:%M:%S" and schema.column("code").min == 7
    _assert_round_trip(from_csv, decode_rows(encode_table(from_csv, schema), schema), schema)
    (tmp_path / "t.xlsx").write_text("x")
    (tmp_path / "bad.parquet").write_text("not parquet")
    for path, message in [("t.xlsx", "unsupported table format '.xlsx'"), ("none.csv", "no such file"),
                          ("bad.parquet", "unreadable parquet file")]:
        with pytest.raises(DataError, match=f"{path}: {message}"):
            read_table(tmp_path / path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: unreadable table schema"):
        TableSchema.load(tmp_path / "bad.json")


def test_discrete_number_columns_get_levels(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({
        "visits": rng.choice([0, 1, 2, 5, 40], n),  # a count with 5 values
        "dose": rng.choice([0.25, 0.5, 1.0], n),  # a coded amount
        "weight": rng.normal(70, 10, n).round(1),  # continuous: hundreds of values
        "rare": np.r_[np.arange(150), np.zeros(n - 150)].astype(int),  # 151 values in 400 rows: < 4 each
    })
    schema = infer_schema(df, max_levels=64)
    visits, dose, weight, rare = schema.columns
    assert visits.levels == ["0", "1", "2", "5", "40"] and dose.levels == ["0.25", "0.50", "1.00"]
    assert weight.levels is None and rare.levels is None
    assert infer_schema(df).columns[0].levels is None  # default: never (the text codec spells numbers)
    assert visits.is_complete("40") and not visits.is_complete("3") and visits.is_prefix("4")
    assert not visits.is_prefix("3") and "one of the levels" in visits.describe()
    with pytest.raises(DataError, match="visits"):
        visits.format(3)  # inside min..max, but never seen
    assert decode_rows(encode_table(df, schema), schema).equals(df)
    schema.save(tmp_path / "s.json")
    assert TableSchema.load(tmp_path / "s.json").columns[1].levels == ["0.25", "0.50", "1.00"]

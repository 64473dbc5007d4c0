"""Loading and checking time series: bad input fails with the file, column and line at fault;
repairs (sorting, inserted gaps, missing values, constant series) are notes, never silent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genlab.errors import DataError
from genlab.series.data import BUNDLED, Series, bundled, check_length, read_series, write_series_csv


def write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def read(path, **kwargs):
    messages = []
    return read_series(path, warn=messages.append, **kwargs), messages


@pytest.fixture(scope="module")
def shipped():
    return bundled()


def test_columns_become_series_sharing_the_timestamps(tmp_path):
    path = write(tmp_path, "date,temp,rain,site\n2020-01-01,1.5,10,a\n2020-02-01,2.5,NA,a\n"
                           "2020-03-01,3.5,,a\n2020-04-01,4.5,nan,a\n")
    (temp, rain), messages = read(path)
    assert [temp.name, rain.name] == ["temp", "rain"]
    assert temp.timestamps.equals(rain.timestamps)
    assert list(temp.timestamps.strftime("%Y-%m-%d")) == ["2020-01-01", "2020-02-01", "2020-03-01", "2020-04-01"]
    assert (temp.freq, temp.season, temp.source) == ("MS", 12, str(path))
    np.testing.assert_array_equal(temp.values, [1.5, 2.5, 3.5, 4.5])
    assert temp.values.dtype == np.float64
    assert np.isnan(rain.values[1:]).all() and rain.values[0] == 10  # "NA", "" and "nan" are missing, not errors
    assert "3 missing values" in rain.notes and "3 missing values" not in temp.notes
    assert "columns not read: site (not numeric)" in temp.notes  # left out, but said so
    assert any("site" in m for m in messages) and any("3 missing values" in m for m in messages)
    assert list(temp.future_index(2).strftime("%Y-%m-%d")) == ["2020-05-01", "2020-06-01"]


def test_requested_columns_and_explicit_timestamp(tmp_path):
    path = write(tmp_path, "when,a,b\n2021-01-04,1,2\n2021-01-05,2,3\n2021-01-06,3,4\n")
    (b,), _ = read(path, columns=["b"], timestamp="when")
    assert b.name == "b" and b.freq == "D" and b.season == 7
    with pytest.raises(DataError, match=r"no column 'zz'; available: a, b"):
        read(path, columns=["zz"])
    with pytest.raises(DataError, match="no timestamp column 'time'"):
        read(path, timestamp="time")


def test_non_numeric_cell_names_column_and_line(tmp_path):
    path = write(tmp_path, "date,a,b\n2020-01-01,1,2\n2020-02-01,2,3\n2020-03-01,3,4..\n")
    with pytest.raises(DataError, match=r"data\.csv: column 'b', line 4: '4\.\.' is not a number"):
        read(path)


def test_written_row_index_is_not_a_series(tmp_path):
    path = write(tmp_path, ",date,a\n0,2020-01-01,1\n1,2020-02-01,2\n2,2020-03-01,3\n")  # DataFrame.to_csv's index
    (a,), messages = read(path)
    assert a.name == "a" and "columns not read: Unnamed: 0 (no header)" in a.notes


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "date,a\n2020-01-01,1\n\n2020-02-01,x\n")
    with pytest.raises(DataError, match="column 'a', line 4: 'x'"):
        read(path)


def test_all_missing_column_fails(tmp_path):
    path = write(tmp_path, "date,a,empty\n2020-01-01,1,\n2020-02-01,2,NA\n2020-03-01,3,\n")
    with pytest.raises(DataError, match=r"data\.csv: column 'empty' has no values: all 3 are missing"):
        read(path)


def test_constant_series_is_kept_with_a_note(tmp_path):
    path = write(tmp_path, "date,flat\n2020-01-01,5\n2020-01-02,5\n2020-01-03,5\n")
    (flat,), messages = read(path)
    np.testing.assert_array_equal(flat.values, [5, 5, 5])
    assert "constant series (every value is 5)" in flat.notes
    assert messages == [f"{path}: column 'flat': constant series (every value is 5)"]


def test_unsorted_rows_are_sorted_with_a_note(tmp_path):
    path = write(tmp_path, "date,a\n2020-03-01,3\n2020-01-01,1\n2020-02-01,2\n2020-04-01,4\n")
    (a,), messages = read(path)
    np.testing.assert_array_equal(a.values, [1, 2, 3, 4])
    assert a.timestamps.is_monotonic_increasing and a.freq == "MS"
    assert "timestamps were not in order: sorted (3 rows moved)" in a.notes
    assert any("sorted" in m for m in messages)


def test_duplicate_timestamps_fail_naming_them(tmp_path):
    path = write(tmp_path, "date,a\n2020-01-01,1\n2020-02-01,2\n2020-01-01,3\n")
    with pytest.raises(DataError, match="duplicate timestamp 2020-01-01 at lines 2, 4"):
        read(path)


def test_bad_or_missing_timestamp_names_the_line(tmp_path):
    with pytest.raises(DataError, match=r"timestamp column 'date', line 3: cannot parse '2020-13-45' as a date"):
        read(write(tmp_path, "date,a\n2020-01-01,1\n2020-13-45,2\n2020-03-01,3\n"))
    with pytest.raises(DataError, match="timestamp column 'date', line 4: missing timestamp"):
        read(write(tmp_path, "date,a\n2020-01-01,1\n2020-02-01,2\n,3\n"))


def test_monthly_gap_is_filled_with_nan_and_reported(tmp_path):
    path = write(tmp_path, "month,a\n2020-01,1\n2020-02,2\n2020-05,5\n2020-06,6\n")
    (a,), messages = read(path)
    assert len(a) == 6 and a.freq == "MS"
    np.testing.assert_array_equal(a.values, [1, 2, np.nan, np.nan, 5, 6])
    assert a.timestamps[2] == pd.Timestamp("2020-03-01")
    assert "2 missing timestamps inserted as NaN (frequency MS)" in a.notes
    assert any("2 missing timestamps inserted" in m for m in messages)


def test_business_day_gap_is_not_mistaken_for_daily(tmp_path):
    days = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-05", "2024-01-08", "2024-01-09"]  # Thu 4th missing
    path = write(tmp_path, "ds,v\n" + "".join(f"{d},{i}\n" for i, d in enumerate(days)))
    (v,), _ = read(path)
    assert (v.freq, v.season, len(v)) == ("B", 5, 7)
    assert np.isnan(v.values[3]) and "1 missing timestamp inserted as NaN (frequency B)" in v.notes


def test_irregular_timestamps_fail(tmp_path):
    rng = np.random.default_rng(0)
    times = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.sort(rng.uniform(0, 1e6, 30)).round(), unit="s")
    path = write(tmp_path, "time,v\n" + "".join(f"{t},{i}\n" for i, t in enumerate(times)))
    with pytest.raises(DataError, match="timestamps are irregular"):
        read(path)


def test_without_timestamps_values_are_indexed_by_position(tmp_path):
    path = write(tmp_path, "a,b\n1,4\n2,5\n3,7\n")
    (a, b), messages = read(path)
    assert a.timestamps is None and a.freq is None and a.season == 1
    assert any("no timestamp column" in n for n in a.notes) and len(messages) == 1  # said once per file
    assert list(b.future_index(2)) == [3, 4]


def test_year_and_quarter_columns_make_quarterly_timestamps(tmp_path):
    path = write(tmp_path, "year,quarter,gdp\n1959,1,10\n1959,2,11\n1959,3,12\n1959,4,13\n1960,1,14\n")
    (gdp,), _ = read(path)
    assert gdp.season == 4 and gdp.timestamps[-1] == pd.Timestamp("1960-01-01")
    (spots,), _ = read(write(tmp_path, "YEAR,spots\n1700,5\n1701,11\n1702,16\n"))  # plain years
    assert (spots.freq, spots.season) == ("YS-JAN", 1) and spots.timestamps[0] == pd.Timestamp("1700-01-01")


def test_unsupported_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported file type"):
        read(write(tmp_path, "a\n1\n", "data.xlsx"))
    with pytest.raises(DataError, match="no such file"):
        read(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="no numeric columns"):
        read(write(tmp_path, "date,name\n2020-01-01,x\n2020-01-02,y\n"))


def test_parquet_round_trip(tmp_path):
    frame = pd.DataFrame({"ds": pd.date_range("2023-01-07", periods=5, freq="W-SAT"),
                          "x": [1.0, np.nan, 3.0, 4.0, 5.0], "y": pd.array([1, 2, 3, 4, 5], dtype="Int64")})
    frame.to_parquet(tmp_path / "data.parquet")
    (x, y), _ = read(tmp_path / "data.parquet")
    assert (x.freq, x.season) == ("W-SAT", 52)
    np.testing.assert_array_equal(x.values, frame["x"].to_numpy())
    np.testing.assert_array_equal(y.values, [1, 2, 3, 4, 5])
    assert x.timestamps.equals(pd.DatetimeIndex(frame["ds"]).as_unit(x.timestamps.unit))
    frame.set_index("ds").to_parquet(tmp_path / "indexed.parquet")  # timestamps saved as the index
    (x2, _), _ = read(tmp_path / "indexed.parquet")
    assert x2.timestamps.equals(x.timestamps) and x2.freq == "W-SAT"


def test_write_series_csv_round_trip(tmp_path, shipped):
    macro = [shipped[name] for name in ("realgdp", "cpi", "unemp")]
    path = tmp_path / "out" / "macro.csv"
    write_series_csv(path, macro)
    assert [p.name for p in path.parent.iterdir()] == ["macro.csv"]  # no temporary file left behind
    back, _ = read(path)
    assert [s.name for s in back] == ["realgdp", "cpi", "unemp"] and back[0].season == 4
    for before, after in zip(macro, back):
        np.testing.assert_array_equal(before.values, after.values)
        assert (before.timestamps == after.timestamps).all()
    with pytest.raises(DataError, match="no series"):
        write_series_csv(tmp_path / "empty.csv", [])


def test_bundled_series(shipped):
    assert tuple(shipped) == BUNDLED
    expected = {"co2": (2284, 52), "elnino": (732, 12), "sunspots": (309, 1),
                "realgdp": (203, 4), "cpi": (203, 4), "unemp": (203, 4)}
    for name, (length, season) in expected.items():
        s = shipped[name]
        assert (len(s), s.season, s.source) == (length, season, f"statsmodels:{name}"), name
        assert len(s.timestamps) == length and s.freq is not None
    co2 = shipped["co2"]
    assert co2.freq == "W-SAT" and co2.timestamps[0] == pd.Timestamp("1958-03-29")
    assert np.isnan(co2.values).sum() == 59 and "59 missing values" in co2.notes  # kept as NaN, not filled
    assert shipped["elnino"].freq == "MS" and shipped["elnino"].timestamps[0] == pd.Timestamp("1950-01-01")
    assert shipped["elnino"].timestamps[-1] == pd.Timestamp("2010-12-01")
    assert shipped["sunspots"].timestamps[[0, -1]].year.tolist() == [1700, 2008]
    assert shipped["realgdp"].timestamps[0] == pd.Timestamp("1959-01-01")
    assert shipped["realgdp"].freq.startswith("QS")
    assert shipped["unemp"].values[0] == pytest.approx(5.8)
    assert list(bundled(["cpi"])) == ["cpi"]
    with pytest.raises(DataError, match="unknown bundled series 'nope'; choose from co2, elnino"):
        bundled(["nope"])


def test_check_length():
    s = Series("co2", np.arange(40.0), None, None, 1, "test")
    check_length(s, context=10, horizon=10, windows=3)  # exactly enough: no error
    with pytest.raises(DataError, match=r"^co2: 40 values; a backtest with horizon 12 x 3 windows needs at least 46"):
        check_length(s, context=10, horizon=12, windows=3)

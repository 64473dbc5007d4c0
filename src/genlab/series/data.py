"""Load and check time series: user CSV / Parquet files and the bundled statsmodels series.

Bad input fails with one DataError naming the file, column and line. Anything repaired (rows
sorted, missing timestamps inserted as NaN, missing values, a constant series) becomes a note
on the Series and a logged warning: nothing is dropped silently.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries import offsets
from pandas.tseries.frequencies import to_offset

from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_write_text

BUNDLED = ("co2", "elnino", "sunspots", "realgdp", "cpi", "unemp")
log = logging.getLogger("genlab.series")

# cells that mean "no value" (compared lower-cased, stripped); "." is FRED's missing marker
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "nat", "<na>", "#n/a", "-nan", "."})
_TIME_NAMES = frozenset({"date", "time", "timestamp", "datetime", "ds", "dt", "month", "year",
                         "period", "week", "day", "quarter"})
_SEASONS = (  # (offset classes, seasonal period); only for n == 1 (e.g. "2MS" gets 1)
    ((offsets.YearBegin, offsets.YearEnd, offsets.BYearBegin, offsets.BYearEnd), 1),
    ((offsets.QuarterBegin, offsets.QuarterEnd, offsets.BQuarterBegin, offsets.BQuarterEnd), 4),
    ((offsets.MonthBegin, offsets.MonthEnd, offsets.BusinessMonthBegin, offsets.BusinessMonthEnd), 12),
    ((offsets.Week,), 52),
    ((offsets.BusinessDay,), 5),
    ((offsets.Day,), 7),
    ((offsets.Hour,), 24),
)


def season_for(freq: str | None) -> int:
    """Seasonal period of a pandas frequency alias: yearly 1, quarterly 4, monthly 12, weekly 52,
    daily 7, business-daily 5, hourly 24, anything else (or None) 1."""
    if freq is None:
        return 1
    off = to_offset(freq)
    if off.n != 1:
        return 1
    return next((season for kinds, season in _SEASONS if isinstance(off, kinds)), 1)


@dataclass
class Series:
    name: str
    values: np.ndarray  # float64, NaN = missing
    timestamps: pd.DatetimeIndex | None  # None: positions 0..n-1
    freq: str | None
    season: int
    source: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 1:
            raise DataError(f"{self.name}: values must be one-dimensional, got shape {self.values.shape}")
        if self.timestamps is not None and len(self.timestamps) != len(self.values):
            raise DataError(f"{self.name}: {len(self.timestamps)} timestamps for {len(self.values)} values")

    def __len__(self) -> int:
        return len(self.values)

    @property
    def index(self) -> pd.DatetimeIndex | pd.RangeIndex:
        return self.timestamps if self.timestamps is not None else pd.RangeIndex(len(self.values))

    def future_index(self, horizon: int) -> pd.DatetimeIndex | pd.RangeIndex:
        """The `horizon` timestamps (or positions) right after the last value."""
        if horizon < 0:
            raise InvalidParameterError(f"horizon must be >= 0, got {horizon}")
        n = len(self.values)
        if self.timestamps is None:
            return pd.RangeIndex(n, n + horizon)
        if self.freq is None:
            raise DataError(f"{self.name}: no regular frequency is known, so its timestamps cannot be extended")
        return pd.date_range(self.timestamps[-1], periods=horizon + 1, freq=self.freq)[1:]


def check_length(series: Series, context: int, horizon: int, windows: int = 1) -> None:
    """Raise one DataError if `series` is too short for `windows` backtest windows of `horizon`
    steps, each forecast from at least `context` earlier values."""
    for label, value in (("context", context), ("horizon", horizon), ("windows", windows)):
        if value < 1:
            raise InvalidParameterError(f"{label} must be >= 1, got {value}")
    need = context + horizon * windows
    if len(series) < need:
        plural = "window" if windows == 1 else "windows"
        raise DataError(f"{series.name}: {len(series)} values; a backtest with horizon {horizon} x {windows} "
                        f"{plural} needs at least {need} (context {context} + {horizon} x {windows})")


# ---------------------------------------------------------------------------- reading files

def read_series(path, columns: list[str] | None = None, timestamp: str | None = None, warn=None) -> list[Series]:
    """Read a CSV or Parquet file into one Series per value column, all sharing one index.

    `columns` defaults to every numeric column except the timestamp; `timestamp` defaults to a
    column named like date/time/year/... or else the first column that parses as dates. Notes
    (repairs) are passed to `warn(message)`, by default the "genlab.series" logger's warning."""
    src = str(path)
    frame, word = _read_table(Path(path))
    times, time_cols, notes = _find_timestamps(frame, timestamp, src, word)
    numbers = functools.cache(lambda name: _numbers(frame[name]))
    names, skipped = _pick_columns(frame, columns, time_cols, numbers, src)
    notes += skipped
    data = {name: _to_float(frame[name], name, numbers(name), src, word) for name in names}
    if times is not None:
        order, note = _check_order(times, frame.index, src, word)
        if order is not None:
            times = times[order]
            data = {name: values[order] for name, values in data.items()}
            notes.append(note)
    return _build(times, data, src, notes, warn or log.warning)


def _read_table(path: Path) -> tuple[pd.DataFrame, str]:
    """The file as a frame whose index is the 1-based file line (CSV) or row (Parquet) of each row."""
    kind = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .csv or .parquet")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if kind == "csv":  # everything as text, so each bad cell can be reported with its line
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read {kind}: {reason}") from e
    if kind == "csv" and not isinstance(frame.index, pd.RangeIndex):
        raise DataError(f"{path}: line 2 has more fields than the header's {frame.shape[1]} columns")
    if kind == "parquet" and not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()  # e.g. a DatetimeIndex saved by DataFrame.to_parquet
    first = 2 if kind == "csv" else 1  # CSV line 1 is the header
    frame.index = pd.RangeIndex(first, first + len(frame))
    frame.columns = [str(c) for c in frame.columns]
    if kind == "csv":
        frame = frame.apply(lambda col: col.str.strip())
        frame = frame[(frame != "").any(axis=1)]  # blank lines
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    return frame, "line" if kind == "csv" else "row"


def _as_text(col: pd.Series) -> pd.Series:
    if pd.api.types.is_string_dtype(col) and not col.isna().any():
        return col  # CSV cells: already stripped text
    return col.astype(object).where(col.notna(), "").astype(str).str.strip()


def _is_missing(text: pd.Series) -> pd.Series:
    return text.str.lower().isin(_MISSING)


def _numbers(col: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """(float64 values, NaN where missing; mask of the cells that are neither numbers nor missing)."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.float64, na_value=np.nan), pd.Series(False, index=col.index)
    text = _as_text(col)
    missing = _is_missing(text)
    parsed = pd.to_numeric(text.where(~missing), errors="coerce")
    return parsed.to_numpy(dtype=np.float64), parsed.isna() & ~missing


def _pick_columns(frame, columns, time_cols, numbers, src) -> tuple[list[str], list[str]]:
    """The value columns to read, and a note on the columns left out by default."""
    available = [c for c in frame.columns if c not in time_cols]
    if columns is not None:
        columns = [columns] if isinstance(columns, str) else list(columns)
        for name in columns:
            if name not in frame.columns:
                raise DataError(f"{src}: no column {name!r}; available: {', '.join(available)}")
            if name in time_cols:
                raise DataError(f"{src}: column {name!r} holds the timestamps, not values")
        repeated = [name for name, count in Counter(columns).items() if count > 1]
        if repeated:
            raise DataError(f"{src}: column {repeated[0]!r} is requested twice")
        return columns, []
    found = {c: (int((~np.isnan(numbers(c)[0])).sum()), int(numbers(c)[1].sum())) for c in available}
    text = {c for c, (good, bad) in found.items() if bad > good}  # mostly not numbers
    empty = {c for c, (good, bad) in found.items() if good + bad == 0}
    # an empty named column is kept so that it fails loudly; a nameless column is a written-out
    # row index (skipped, with a note) or, if empty, a trailing comma (skipped quietly: no data)
    nameless = {c for c in available if c.startswith("Unnamed: ")}
    chosen = [c for c in available if c not in text and c not in nameless]
    if not chosen:
        raise DataError(f"{src}: no numeric columns; columns: {', '.join(frame.columns)}")
    skipped = [f"{c} ({'no header' if c in nameless else 'not numeric'})"
               for c in available if c not in chosen and c not in empty]
    return chosen, [f"columns not read: {', '.join(skipped)}"] if skipped else []


def _to_float(col: pd.Series, name: str, parsed, src: str, word: str) -> np.ndarray:
    """The parsed column (from `_numbers`), failing on the first cell that is not a number."""
    values, bad = parsed
    if bad.any():
        line = bad.idxmax()
        raise DataError(f"{src}: column {name!r}, {word} {line}: {_as_text(col)[line]!r} is not a number")
    if np.isinf(values).any():
        line = col.index[np.argmax(np.isinf(values))]
        raise DataError(f"{src}: column {name!r}, {word} {line}: value is infinite")
    return values


# ---------------------------------------------------------------------------- timestamps

def _find_timestamps(frame, timestamp, src, word) -> tuple[pd.DatetimeIndex | None, list[str], list[str]]:
    """(timestamps, the columns they came from, notes); timestamps None when there are none."""
    if timestamp is not None:
        if timestamp not in frame.columns:
            raise DataError(f"{src}: no timestamp column {timestamp!r}; available: {', '.join(frame.columns)}")
        return _strict_times(frame[timestamp], timestamp, src, word, allow_numbers=True), [timestamp], []
    combined = _year_and_period(frame)
    if combined is not None:
        return combined
    named = [c for c in frame.columns if c.strip().lower() in _TIME_NAMES or re.search("date|time", c, re.I)]
    for c in named + [c for c in frame.columns if c not in named]:
        head = frame[c].head(50)  # a look at the first rows is enough to tell a date column
        present = int((~_is_missing(_as_text(head))).sum())
        if _parse_times(head, allow_numbers=c in named).notna().sum() >= max(1, present / 2):
            return _strict_times(frame[c], c, src, word, allow_numbers=c in named), [c], []
    return None, [], ["no timestamp column found: values are indexed by position 0..n-1"]


def _strict_times(col, name, src, word, allow_numbers) -> pd.DatetimeIndex:
    """Parse a timestamp column, failing on the first cell that is missing or not a date."""
    parsed = _parse_times(col, allow_numbers)
    if parsed.isna().any():
        line = col.index[np.argmax(parsed.isna())]
        value = _as_text(col)[line]
        problem = "missing timestamp" if value.lower() in _MISSING else f"cannot parse {value!r} as a date"
        raise DataError(f"{src}: timestamp column {name!r}, {word} {line}: {problem}")
    return parsed


def _year_month(year, month) -> pd.DatetimeIndex:
    parts = pd.DataFrame({"year": np.asarray(year, dtype=int), "month": np.asarray(month, dtype=int), "day": 1})
    return pd.DatetimeIndex(pd.to_datetime(parts))


def _parse_times(col: pd.Series, allow_numbers: bool) -> pd.DatetimeIndex:
    """Timestamps (NaT where a cell is not a date). Plain numbers are dates only as 4-digit years,
    and only when `allow_numbers` (the column's name says it holds times)."""
    if pd.api.types.is_datetime64_any_dtype(col):
        return pd.DatetimeIndex(col)
    if isinstance(col.dtype, pd.PeriodDtype):
        return pd.DatetimeIndex(col.dt.to_timestamp())
    text = pd.Series(_as_text(col).to_numpy(dtype=object))
    present = ~_is_missing(text)
    years = text.str.fullmatch(r"\d{4}(\.0+)?") & allow_numbers
    quarters = text.str.extract(r"^(\d{4})[-\s]?[Qq]([1-4])$")
    out = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
    if years.sum() >= present.sum() / 2 and years.any():  # mostly years: the others are errors
        out[years] = _year_month(text[years].str[:4], np.ones(years.sum()))
    elif quarters[0].notna().sum() >= present.sum() / 2 and quarters[0].notna().any():
        found = quarters.dropna()
        out[found.index] = _year_month(found[0], (found[1].astype(int) - 1) * 3 + 1)
    else:
        # a date has digits ("May" alone is not one) and is not a plain number
        dates = present & pd.to_numeric(text, errors="coerce").isna() & text.str.contains(r"\d")
        parsed = _to_datetime(text[dates].to_numpy()) if dates.any() else None
        if parsed is not None:
            out = pd.Series(pd.NaT, index=text.index, dtype=parsed.dtype)
            out[dates] = parsed.to_numpy()
    return pd.DatetimeIndex(out)


def _to_datetime(text: np.ndarray) -> pd.DatetimeIndex | None:
    """The best of pandas' format inference, ISO 8601 and per-cell parsing (fewest failures)."""
    best = None
    for fmt in (None, "ISO8601", "mixed"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parsed = pd.DatetimeIndex(pd.to_datetime(text, errors="coerce", format=fmt))
        except (ValueError, TypeError, OverflowError):  # e.g. mixed time zones
            continue
        if best is None or parsed.isna().sum() < best.isna().sum():
            best = parsed
        if not best.isna().any():
            break
    return best


def _year_and_period(frame):
    """Timestamps from a `year` column plus a `quarter` (1-4) or `month` (1-12) column, or None."""
    lower = {c.strip().lower(): c for c in frame.columns}
    if "year" not in lower:
        return None
    for part, top, months_per in (("quarter", 4, 3), ("qtr", 4, 3), ("month", 12, 1)):
        if part not in lower:
            continue
        year, period = (pd.to_numeric(_as_text(frame[lower[k]]), errors="coerce") for k in ("year", part))
        ok = year.notna().all() and period.notna().all() and (year % 1 == 0).all() and (period % 1 == 0).all()
        if ok and period.between(1, top).all():
            return _year_month(year, (period - 1) * months_per + 1), [lower["year"], lower[part]], []
    return None


def _fmt_time(ts: pd.Timestamp) -> str:
    return ts.strftime("%Y-%m-%d") if ts == ts.normalize() else str(ts)


def _check_order(times, lines, src, word) -> tuple[np.ndarray | None, str | None]:
    """Fail on duplicate timestamps; return (sort order, note) when rows are out of order."""
    repeated = times.duplicated(keep=False)
    if repeated.any():
        first = times[np.argmax(repeated)]
        where = [str(line) for line in lines[times == first]]
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        raise DataError(f"{src}: duplicate timestamp {_fmt_time(first)} at {word}s {shown}; "
                        "each timestamp must appear once (aggregate the rows first)")
    if times.is_monotonic_increasing:
        return None, None
    order = np.argsort(times.asi8, kind="stable")
    moved = int((order != np.arange(len(order))).sum())
    return order, f"timestamps were not in order: sorted ({moved} rows moved)"


def _infer_freq(times: pd.DatetimeIndex) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas 3 warns that infer_freq will return an offset
            freq = pd.infer_freq(times)
    except (ValueError, TypeError):
        return None
    return None if freq is None else to_offset(freq).freqstr


_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")


def _candidate_freqs(times: pd.DatetimeIndex) -> list[str]:
    """Frequencies that may fit an index with gaps (infer_freq needs a gap-free one): those of
    short gap-free runs, the calendar frequencies anchored at the first timestamp, the most
    common step."""
    starts = np.unique(np.linspace(0, len(times) - 3, min(len(times) - 2, 200)).astype(int))
    runs = Counter(_infer_freq(times[i:i + 3]) for i in starts)
    runs.pop(None, None)
    first = times[0]
    month, day = _MONTHS[first.month - 1], _DAYS[first.day_of_week]
    calendar = ["MS", "ME", f"QS-{month}", f"QE-{month}", f"YS-{month}", f"YE-{month}", f"W-{day}", "B", "D", "h"]
    step = (times[1:] - times[:-1]).value_counts().idxmax()
    return list(dict.fromkeys([f for f, _ in runs.most_common()] + calendar + [to_offset(step).freqstr]))


def _regularize(times: pd.DatetimeIndex, src: str) -> tuple[pd.DatetimeIndex, str | None]:
    """The regular grid (first to last timestamp at the inferred frequency) holding every timestamp.

    With gaps, the candidate whose grid holds every timestamp with the fewest insertions wins
    (so monthly beats daily, business days beat calendar days); at most half may be inserted."""
    if len(times) < 3:
        return times, None
    freq = _infer_freq(times)
    if freq is not None:
        return pd.DatetimeIndex(times, freq=freq), freq
    best = None
    for cand in _candidate_freqs(times):
        try:
            off = to_offset(cand)
        except ValueError:  # an alias this pandas version lacks (e.g. "ME" before pandas 2.2)
            continue
        if not off.is_on_offset(times[0]):
            continue
        grid = pd.date_range(times[0], times[-1], freq=off)
        if len(grid) <= 100 * len(times) and times.isin(grid).all() and (best is None or len(grid) < len(best)):
            best = grid
    steps = times[1:] - times[:-1]
    if best is None:
        raise DataError(f"{src}: timestamps are irregular: the steps between rows vary from {steps.min()} to "
                        f"{steps.max()} and no regular frequency fits them; resample the data first")
    if len(best) > 2 * len(times):
        raise DataError(f"{src}: timestamps are too sparse: they fit frequency {best.freqstr} only with "
                        f"{len(best) - len(times)} of {len(best)} timestamps missing; resample the data first")
    return best, best.freqstr


def _build(times, data: dict[str, np.ndarray], source: str, notes: list[str], warn) -> list[Series]:
    """Check each column, put every series on the regular grid and report the notes."""
    own = {}
    for name, values in data.items():
        observed = values[~np.isnan(values)]
        if observed.size == 0:
            raise DataError(f"{source}: column {name!r} has no values: all {len(values)} are missing")
        own[name] = []
        if observed.size < len(values):
            own[name].append(_count(len(values) - observed.size, "missing value"))
        if observed.min() == observed.max():
            own[name].append(f"constant series (every value is {observed[0]:g})")
    freq = None
    if times is not None:
        grid, freq = _regularize(times, source)
        if len(grid) > len(times):
            positions = grid.get_indexer(times)
            data = {name: _spread(values, positions, len(grid)) for name, values in data.items()}
            inserted = _count(len(grid) - len(times), "missing timestamp")
            notes = notes + [f"{inserted} inserted as NaN (frequency {freq})"]
        times = grid
    for note in notes:
        warn(f"{source}: {note}")
    for name in data:
        for note in own[name]:
            warn(f"{source}: column {name!r}: {note}")
    return [Series(name, values, times, freq, season_for(freq), source, notes + own[name])
            for name, values in data.items()]


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _spread(values: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    out = np.full(size, np.nan)
    out[positions] = values
    return out


# ---------------------------------------------------------------------------- bundled and writing

@functools.lru_cache(maxsize=None)
def _statsmodels_frame(dataset: str) -> pd.DataFrame:
    import importlib

    return importlib.import_module(f"statsmodels.datasets.{dataset}").load_pandas().data


def _co2():
    frame = _statsmodels_frame("co2")
    return pd.DatetimeIndex(frame.index), frame["co2"]


def _elnino():
    frame = _statsmodels_frame("elnino")  # one row per year, one column per month
    years = frame["YEAR"].astype(int).to_numpy()
    assert (np.diff(years) == 1).all(), "statsmodels elnino years are not consecutive"
    values = frame.drop(columns="YEAR").to_numpy(dtype=np.float64).ravel()
    return pd.date_range(f"{years[0]}-01-01", periods=values.size, freq="MS"), values


def _sunspots():
    frame = _statsmodels_frame("sunspots")
    return _year_month(frame["YEAR"], np.ones(len(frame))), frame["SUNACTIVITY"]


def _macro(column):
    frame = _statsmodels_frame("macrodata")
    return _year_month(frame["year"], (frame["quarter"] - 1) * 3 + 1), frame[column]


_LOADERS = {"co2": _co2, "elnino": _elnino, "sunspots": _sunspots, "realgdp": functools.partial(_macro, "realgdp"),
            "cpi": functools.partial(_macro, "cpi"), "unemp": functools.partial(_macro, "unemp")}


def bundled(names: list[str] | None = None) -> dict[str, Series]:
    """The real series shipped with statsmodels (offline), with their real timestamps."""
    names = list(BUNDLED) if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in _LOADERS]
    if unknown:
        raise DataError(f"unknown bundled series {unknown[0]!r}; choose from {', '.join(BUNDLED)}")
    out = {}
    for name in names:
        times, values = _LOADERS[name]()
        values = np.array(values, dtype=np.float64)  # a copy: the cached frame stays untouched
        (out[name],) = _build(times, {name: values}, f"statsmodels:{name}", [], log.info)
    return out


def write_series_csv(path, series: list[Series]) -> None:
    """Write a timestamp column (when the series have timestamps) and one column per series,
    outer-joined on the timestamps; all or nothing (temporary file, then rename)."""
    series = list(series)
    if not series:
        raise DataError(f"{path}: no series to write")
    names = [s.name for s in series]
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataError(f"{path}: two series are named {repeated[0]!r}")
    timed = {s.timestamps is not None for s in series}
    if len(timed) > 1:
        raise DataError(f"{path}: cannot write series with and without timestamps to one file")
    if "timestamp" in names and timed == {True}:
        raise DataError(f"{path}: a series named 'timestamp' would clash with the timestamp column")
    frame = pd.concat([pd.Series(s.values, index=s.index, name=s.name) for s in series], axis=1).sort_index()
    if timed == {True}:
        frame.index.name = "timestamp"
    atomic_write_text(path, frame.to_csv(index=timed == {True}))

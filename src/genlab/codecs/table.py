"""Tables as text (the GReaT encoding): a row is "col is value, col2 is value2, ..." with the
columns in a fresh random order per row, so a language model learns every conditional.

A `TableSchema` (inferred by `infer_schema`, saved as JSON) fixes what each column may hold;
`ColumnSpec.format / parse / is_prefix / is_complete` are exact per-column checks a constrained
decoder can use character by character.

Value texts (choices made here):
- numeric: exactly `decimals` decimals ("12.50"; decimals = the most seen, at most 6);
  integer: plain digits ("-3"); never "-0". min/max are numbers and are enforced.
- categorical: the category string (categories are kept as strings); boolean: "true" / "false"
  (its `categories` are ["false", "true"], so a decoder can treat it as a categorical).
- datetime: `fmt`, one of DATETIME_FORMATS (fixed width, so text order is time order): dates
  only when every time is midnight, seconds when all are whole, else microseconds; min/max are
  strings in `fmt`. Time-zone-aware times are stored as naive UTC.
- a missing value is the word `missing` (allowed only when `spec.missing`).
- Escapes keep the text unambiguous: in category texts `\\` `,` newline and carriage return are
  written `\\\\` `\\,` `\\n` `\\r`, and a category that is literally "missing" is written
  `\\missing`. Column names cannot be escaped: a kept column whose name contains ",", "\\",
  a newline or " is " is a DataError asking to rename it.

Inference rules (`infer_schema`), in order:
- bool dtype (or only True/False objects) -> boolean. Numbers that are 0/1 stay integer [0, 1]:
  the same two texts, and the original dtype comes back.
- numbers: all whole -> integer (floats too: pandas stores integers with gaps as floats), unless
  the column is an identifier (no missing, every value unique, and sequential like 0..n-1 or
  monotone in row order); otherwise numeric. A number column with at most `max_levels` distinct
  values, each seen 4+ times on average (codes, counts, scores), keeps them as `levels`: its only
  valid texts, one token each for the table model (synth fit uses 1000; the default 0 = never).
- strings: mostly (>= half) numbers but not all -> excluded as mixed types; all ISO 8601 dates
  -> datetime; nearly all unique (>= id_unique_ratio) -> excluded as an identifier; at most
  max_categories distinct -> categorical; more -> excluded as free text. Numeric-looking strings
  (e.g. "02139") stay strings, so codes keep their leading zeros.
Excluded columns are never serialised, so their values can never be copied verbatim.
"""

from __future__ import annotations

import json
import logging
import re
from bisect import bisect_left
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from genlab.errors import DataError, InvalidParameterError

KINDS = ("numeric", "integer", "categorical", "boolean", "datetime")
MISSING = "missing"
MAX_DECIMALS = 6
MIN_ROWS = 10
# fmt -> (character template: d = a digit, anything else literal; one step of time)
DATETIME_FORMATS = {
    "%Y-%m-%d": ("dddd-dd-dd", timedelta(days=1)),
    "%Y-%m-%d %H:%M:%S": ("dddd-dd-dd dd:dd:dd", timedelta(seconds=1)),
    "%Y-%m-%d %H:%M:%S.%f": ("dddd-dd-dd dd:dd:dd.dddddd", timedelta(microseconds=1)),
}
_EPOCH = datetime(1970, 1, 1)
_DT_FIRST, _DT_LAST = datetime(1000, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999999)
_DIGITS = frozenset("0123456789")
_ESCAPES = str.maketrans({"\\": "\\\\", ",": "\\,", "\n": "\\n", "\r": "\\r"})
_NUMBER = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?")
_NUMBER_PREFIX = re.compile(r"(-?)([0-9]*)(?:(\.)([0-9]*))?")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?)?")


def _escape(category: str) -> str:
    return "\\" + category if category == MISSING else category.translate(_ESCAPES)


def _short(text, limit: int = 60) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def name_problem(name) -> str | None:
    """Why `name` cannot be a column name in the text encoding (None when it can)."""
    if not isinstance(name, str) or not name:
        return "empty column name"
    bad = [c for c in (",", "\\", "\n", "\r") if c in name]
    if bad or (name + " is ").find(" is ") != len(name):
        return (f"column name {_short(name)} contains {bad[0] if bad else ' is '!r}, which the text "
                "encoding uses as a separator; rename the column")
    return None


def _is_missing(value) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _number_text(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[1:] if text[0] == "-" and not text.strip("-0.") else text  # no "-0.00"


def _scaled(text: str, decimals: int) -> int | None:
    """The integer value * 10**decimals of a canonical number text; None if not canonical."""
    m = _NUMBER.fullmatch(text)
    if m is None or len(m.group(3) or "") != decimals:
        return None
    n = int(m.group(2) + (m.group(3) or ""))
    if m.group(1) and n == 0:
        return None
    return -n if m.group(1) else n


def _bound(x, decimals: int, rounding) -> int | None:
    if x is None:
        return None
    exact = Decimal(repr(float(x))) if isinstance(x, (float, np.floating)) else Decimal(int(x))
    return int(exact.scaleb(decimals).to_integral_value(rounding=rounding))


def _number_prefix_ok(text: str, lo: int | None, hi: int | None, decimals: int) -> bool:
    """Whether some canonical number with `decimals` decimals, scaled into [lo, hi], starts with text."""
    if lo is not None and hi is not None and lo > hi:
        return False
    if text == "":
        return True
    m = _NUMBER_PREFIX.fullmatch(text)
    if m is None:
        return False
    neg, whole, dot, frac = m.group(1), m.group(2), m.group(3), m.group(4) or ""
    if (dot and (decimals == 0 or not whole or len(frac) > decimals)) or (len(whole) > 1 and whole[0] == "0"):
        return False
    unit = 10**decimals
    if dot:  # the whole part is complete: one interval of magnitudes
        step = 10 ** (decimals - len(frac))
        base = int(whole) * unit + int(frac or 0) * step
        spans = [(base, base + step - 1)]
    elif whole == "":  # just "-"
        spans = [(1, None)]
    elif whole == "0":
        spans = [(0, unit - 1)]
    else:  # the whole part may still grow by k digits
        limit = (-lo if neg else hi) if (lo if neg else hi) is not None else None
        if limit is None:
            return True  # unbounded on this side: a long enough completion fits
        spans, k = [], 0
        while int(whole) * 10**k * unit <= max(limit, 0):
            spans.append((int(whole) * 10**k * unit, (int(whole) + 1) * 10**k * unit - 1))
            k += 1
    for a, b in spans:
        if neg:  # magnitudes [a, b] -> values [-b, -max(a, 1)]
            a, b = (None if b is None else -b), -max(a, 1)
        empty = a is not None and b is not None and a > b
        if not empty and (hi is None or a is None or a <= hi) and (lo is None or b is None or b >= lo):
            return True
    return False


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # one of KINDS
    min: float | int | str | None = None  # numbers for numeric/integer, text in `fmt` for datetime
    max: float | int | str | None = None  # None: unbounded
    decimals: int = 0  # numeric: exact number of decimals in the text
    categories: list[str] | None = None  # categorical vocabulary; boolean: ["false", "true"]
    missing: bool = False  # "missing" is a valid value
    fmt: str | None = None  # datetime: one of DATETIME_FORMATS
    levels: list[str] | None = None  # numeric / integer with few distinct values: the only valid texts

    def __post_init__(self):
        problem = name_problem(self.name)
        if problem or self.kind not in KINDS:
            raise InvalidParameterError(problem or f"column {self.name!r}: unknown kind {self.kind!r} (one of {KINDS})")
        if self.kind == "boolean":
            object.__setattr__(self, "categories", ["false", "true"])
        if self.kind == "categorical" and (not self.categories or len(set(self.categories)) != len(self.categories)
                                           or not all(isinstance(c, str) for c in self.categories)):
            raise InvalidParameterError(f"column {self.name!r}: categories must be distinct strings, at least one")
        if self.kind == "datetime":
            if self.fmt not in DATETIME_FORMATS:
                raise InvalidParameterError(f"column {self.name!r}: fmt must be one of {list(DATETIME_FORMATS)}")
            for bound in (self.min, self.max):
                if bound is not None and not (isinstance(bound, str) and self._dt_complete(bound)):
                    raise InvalidParameterError(f"column {self.name!r}: bound {bound!r} is not a date in {self.fmt}")
        if self.kind in ("numeric", "integer") and (self.decimals < 0 or (self.kind == "integer" and self.decimals)):
            raise InvalidParameterError(f"column {self.name!r}: decimals must be >= 0 (0 for integers)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidParameterError(f"column {self.name!r}: min {self.min!r} > max {self.max!r}")
        if self.levels is not None and (self.kind not in ("numeric", "integer") or not self.levels
                                        or len(set(self.levels)) != len(self.levels)
                                        or any(_scaled(t, self.decimals) is None for t in self.levels)):
            raise InvalidParameterError(f"column {self.name!r}: levels must be distinct number texts of a "
                                        f"numeric or integer column, at least one")

    # -- derived tables (specs are immutable, so these are computed once) --
    @cached_property
    def _bounds(self) -> tuple[int | None, int | None]:
        return _bound(self.min, self.decimals, ROUND_CEILING), _bound(self.max, self.decimals, ROUND_FLOOR)

    @cached_property
    def _level_texts(self) -> list[str]:
        """The levels inside [min, max], sorted as texts (what a decoder may write)."""
        lo, hi = self._bounds
        return sorted(t for t in self.levels if (lo is None or _scaled(t, self.decimals) >= lo)
                      and (hi is None or _scaled(t, self.decimals) <= hi))

    @cached_property
    def _vocab(self) -> dict[str, object]:
        if self.kind == "boolean":
            return {"false": False, "true": True}
        return {_escape(c): c for c in self.categories}

    @cached_property
    def _sorted_texts(self) -> list[str]:
        return sorted(self._vocab)

    @cached_property
    def _dt_steps(self) -> tuple[int, int]:
        step = DATETIME_FORMATS[self.fmt][1]
        first = _DT_FIRST if self.min is None else datetime.strptime(self.min, self.fmt)
        last = _DT_LAST if self.max is None else datetime.strptime(self.max, self.fmt)
        return -((_EPOCH - first) // step), (last - _EPOCH) // step

    def _dt_text(self, k: int) -> str:
        return (_EPOCH + k * DATETIME_FORMATS[self.fmt][1]).strftime(self.fmt)

    def _dt_shape_ok(self, text: str) -> bool:
        template = DATETIME_FORMATS[self.fmt][0]
        return len(text) <= len(template) and all(c in _DIGITS if t == "d" else c == t for c, t in zip(text, template))

    def _dt_complete(self, text: str) -> bool:
        if len(text) != len(DATETIME_FORMATS[self.fmt][0]) or not self._dt_shape_ok(text):
            return False
        try:
            return datetime.strptime(text, self.fmt).strftime(self.fmt) == text
        except ValueError:  # e.g. 2021-02-30
            return False

    # -- value checks for a constrained decoder --
    def is_complete(self, text: str) -> bool:
        """Whether `text` is exactly a valid value text of this column."""
        if text == MISSING:
            return self.missing
        if self.levels is not None:
            i = bisect_left(self._level_texts, text)
            return i < len(self._level_texts) and self._level_texts[i] == text
        if self.kind in ("numeric", "integer"):
            n, (lo, hi) = _scaled(text, self.decimals), self._bounds
            return n is not None and (lo is None or n >= lo) and (hi is None or n <= hi)
        if self.kind == "datetime":
            return (self._dt_complete(text) and (self.min is None or text >= self.min)
                    and (self.max is None or text <= self.max))
        return text in self._vocab

    def is_prefix(self, text: str) -> bool:
        """Whether some valid value text of this column starts with `text` (complete ones included)."""
        if self.missing and MISSING.startswith(text):
            return True
        if self.levels is not None:
            i = bisect_left(self._level_texts, text)
            return i < len(self._level_texts) and self._level_texts[i].startswith(text)
        if self.kind in ("numeric", "integer"):
            return _number_prefix_ok(text, *self._bounds, self.decimals)
        if self.kind == "datetime":
            if not self._dt_shape_ok(text):
                return False
            # fixed-width texts sort like times: find the first valid time whose text is >= text
            a, b = self._dt_steps
            if a > b or self._dt_text(b) < text:
                return False
            while a < b:
                mid = (a + b) // 2
                a, b = (a, mid) if self._dt_text(mid) >= text else (mid + 1, b)
            return self._dt_text(a).startswith(text)
        i = bisect_left(self._sorted_texts, text)
        return i < len(self._sorted_texts) and self._sorted_texts[i].startswith(text)

    def describe(self) -> str:
        """What a valid value looks like (for error messages)."""
        if self.levels is not None:
            shown = ", ".join(self._level_texts[:8]) + (", ..." if len(self._level_texts) > 8 else "")
            what = f"one of the levels {shown}"
        elif self.kind == "numeric":
            what = f"a number with {self.decimals} decimals in [{self.min}, {self.max}]"
        elif self.kind == "integer":
            what = f"an integer in [{self.min}, {self.max}]"
        elif self.kind == "datetime":
            what = f"a time written {self.fmt} in [{self.min}, {self.max}]"
        else:
            shown = ", ".join(map(repr, self._sorted_texts[:8])) + (", ..." if len(self._vocab) > 8 else "")
            what = f"one of {shown}"
        return what + (" or missing" if self.missing else "")

    def format(self, value) -> str:
        """The text of one value; a DataError if the value is not valid for this column."""
        if _is_missing(value):
            if self.missing:
                return MISSING
            raise DataError(f"column {self.name!r}: missing value, but the schema has none for this column")
        try:
            text = self._text(value)
        except (TypeError, ValueError, OverflowError):
            text = None
        if text is None or not self.is_complete(text):
            raise DataError(f"column {self.name!r}: value {_short(value)} is not {self.describe()}")
        return text

    def _text(self, value) -> str | None:
        if self.kind == "numeric":
            return _number_text(float(value), self.decimals)
        if self.kind == "integer":
            if isinstance(value, (bool, np.bool_)):
                return None
            if isinstance(value, (int, np.integer)):
                return str(int(value))
            return str(int(value)) if float(value).is_integer() else None
        if self.kind == "boolean":
            if isinstance(value, (bool, np.bool_)):
                return "true" if value else "false"
            return value if value in ("true", "false") else None
        if self.kind == "datetime":
            stamp = pd.Timestamp(value)
            if stamp.tzinfo is not None:
                stamp = stamp.tz_convert("UTC").tz_localize(None)
            return stamp.strftime(self.fmt)
        return _escape(str(value))

    def parse(self, text: str):
        """The value of a value text (None for missing); a DataError naming the column if invalid."""
        if not isinstance(text, str) or not self.is_complete(text):
            raise DataError(f"column {self.name!r}: bad value {_short(text)} (expected {self.describe()})")
        if text == MISSING:
            return None
        if self.kind == "numeric":
            return float(text)
        if self.kind == "integer":
            return int(text)
        if self.kind == "datetime":
            return pd.Timestamp(datetime.strptime(text, self.fmt))
        return self._vocab[text]


@dataclass
class TableSchema:
    columns: list[ColumnSpec]
    excluded: dict[str, str] = field(default_factory=dict)  # column -> why it is not encoded

    def __post_init__(self):
        names = self.names()
        if len(set(names)) != len(names):
            raise InvalidParameterError(f"duplicate column names in the schema: {names}")

    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnSpec:
        for spec in self.columns:
            if spec.name == name:
                return spec
        raise DataError(f"no column {name!r} in the table schema (columns: {', '.join(self.names())})")

    def to_dict(self) -> dict:
        return {"type": "table", "version": 1, "columns": [asdict(c) for c in self.columns],
                "excluded": dict(self.excluded)}

    @classmethod
    def from_dict(cls, d: dict) -> "TableSchema":
        allowed = {f.name for f in fields(ColumnSpec)}
        try:
            columns = [ColumnSpec(**{k: v for k, v in c.items() if k in allowed}) for c in d["columns"]]
            return cls(columns, {str(k): str(v) for k, v in d.get("excluded", {}).items()})
        except (KeyError, TypeError, AttributeError, InvalidParameterError) as e:
            raise DataError(f"invalid table schema ({type(e).__name__}: {e})") from None

    def save(self, path) -> None:
        from genlab.fsutil import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "TableSchema":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable table schema ({e})") from None
        try:
            return cls.from_dict(d)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None


# -- inference --
def _decimals(x: np.ndarray) -> int:
    tolerance = 1e-13 * np.maximum(1.0, np.abs(x))  # float noise, far below any kept decimal
    for d in range(MAX_DECIMALS):
        if np.all(np.abs(x - np.round(x, d)) <= tolerance):
            return d
    return MAX_DECIMALS


def _with_levels(spec: ColumnSpec, values: np.ndarray, max_levels: int) -> ColumnSpec:
    """A discrete number column (codes, counts, scores: at most max_levels distinct values,
    each seen 4+ times on average) keeps its values as levels: one token each for a decoder."""
    distinct = np.unique(values)
    if len(distinct) > max_levels or 4 * len(distinct) > len(values):
        return spec
    texts = [str(int(v)) if spec.kind == "integer" else _number_text(v, spec.decimals) for v in distinct]
    return replace(spec, levels=list(dict.fromkeys(texts)))


def _number_spec(name: str, values: pd.Series, missing: bool, max_levels: int = 0) -> ColumnSpec | str:
    x = values.to_numpy(dtype=float)
    if not np.isfinite(x).all():
        return f"infinite values: {int((~np.isfinite(x)).sum())} of {len(x)}"
    if pd.api.types.is_integer_dtype(values.dtype) or (np.all(x == np.round(x)) and np.all(np.abs(x) < 2**53)):
        ints = values.to_numpy(dtype=np.int64)
        if not missing and len(ints) >= MIN_ROWS and len(np.unique(ints)) == len(ints):
            steps = np.diff(ints)
            if ints.max() - ints.min() == len(ints) - 1 or (steps > 0).all() or (steps < 0).all():
                return f"identifier: {len(ints)} unique values of {len(ints)} (sequential or monotone integers)"
        spec = ColumnSpec(name, "integer", min=int(ints.min()), max=int(ints.max()), missing=missing)
        return _with_levels(spec, ints, max_levels)
    d = _decimals(x)
    spec = ColumnSpec(name, "numeric", min=float(_number_text(x.min(), d)), max=float(_number_text(x.max(), d)),
                      decimals=d, missing=missing)
    return _with_levels(spec, x, max_levels)


def _datetime_spec(name: str, stamps: pd.Series, missing: bool) -> ColumnSpec | str:
    if stamps.dt.tz is not None:
        stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
    if stamps.min().year < 1000:
        return "unsupported dates: before the year 1000"
    if (stamps == stamps.dt.normalize()).all():
        fmt = "%Y-%m-%d"
    elif ((stamps.dt.microsecond == 0) & (stamps.dt.nanosecond == 0)).all():
        fmt = "%Y-%m-%d %H:%M:%S"
    else:
        fmt = "%Y-%m-%d %H:%M:%S.%f"
    return ColumnSpec(name, "datetime", min=stamps.min().strftime(fmt), max=stamps.max().strftime(fmt),
                      missing=missing, fmt=fmt)


def _text_spec(name: str, texts: pd.Series, missing: bool, max_categories: int, id_ratio: float):
    n, distinct = len(texts), texts.nunique()
    if n >= MIN_ROWS and distinct >= id_ratio * n:
        return f"identifier: {distinct} unique values of {n}"
    if distinct <= max_categories:
        return ColumnSpec(name, "categorical", categories=sorted(texts.unique()), missing=missing)
    return (f"free text: {distinct} distinct values (more than max_categories={max_categories}), "
            f"{texts.str.len().mean():.0f} characters on average")


def _column_spec(name: str, column: pd.Series, max_categories: int, id_ratio: float,
                 max_levels: int) -> ColumnSpec | str:
    """The spec of one column, or the reason it is excluded."""
    values = column.dropna()
    missing = len(values) < len(column)
    dtype = column.dtype
    if values.empty:
        return "empty: every value is missing"
    if pd.api.types.is_bool_dtype(dtype) or (dtype == object and all(isinstance(v, (bool, np.bool_)) for v in values)):
        return ColumnSpec(name, "boolean", missing=missing)
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return _datetime_spec(name, values, missing)
    if isinstance(dtype, pd.CategoricalDtype):
        return _text_spec(name, values.astype(str), missing, max_categories, id_ratio)
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
        return _number_spec(name, values, missing, max_levels)
    if dtype != object and not pd.api.types.is_string_dtype(dtype):
        return f"unsupported dtype {dtype}"
    odd = [v for v in values if not isinstance(v, (str, int, float, np.number))]
    if odd:
        return f"unsupported values of type {type(odd[0]).__name__}"
    numbers = pd.to_numeric(values, errors="coerce")
    if all(not isinstance(v, str) for v in values):  # Python numbers in an object column
        return _number_spec(name, numbers, missing, max_levels)
    n_numbers = int(numbers.notna().sum())
    if 2 * n_numbers >= len(values) and n_numbers < len(values):
        bad = list(dict.fromkeys(values[numbers.isna()].tolist()))[:2]
        return (f"mixed types: {n_numbers} of {len(values)} values are numbers but "
                f"{' and '.join(_short(b, 30) for b in bad)} {'are' if len(bad) > 1 else 'is'} not")
    texts = values.astype(str)
    if texts.map(lambda t: _ISO_DATE.fullmatch(t) is not None).all():
        stamps = pd.to_datetime(texts, format="ISO8601", errors="coerce")
        if stamps.notna().all():
            return _datetime_spec(name, stamps, missing)
    return _text_spec(name, texts, missing, max_categories, id_ratio)


def infer_schema(df: pd.DataFrame, max_categories: int = 50, id_unique_ratio: float = 0.95, warn=None,
                 max_levels: int = 0) -> TableSchema:
    """The schema of a table; excluded columns (identifiers, free text, mixed types, ...) are
    reported through `warn(message)` (default: the "genlab.table" logger's warning). Number
    columns with at most `max_levels` distinct values get them as `levels` (0: never)."""
    if max_categories < 1 or not 0 < id_unique_ratio <= 1 or max_levels < 0:
        raise InvalidParameterError("infer_schema needs max_categories >= 1, 0 < id_unique_ratio <= 1 "
                                    "and max_levels >= 0")
    warn = warn or logging.getLogger("genlab.table").warning
    names = [str(c) for c in df.columns]
    if "" in names:
        raise DataError(f"the table has a column with an empty name (column {names.index('') + 1})")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"the table has duplicate column names: {', '.join(map(repr, duplicates))}")
    if len(df) < MIN_ROWS:
        raise DataError(f"the table is too small to learn from: {len(df)} rows (at least {MIN_ROWS} needed)")
    columns, excluded = [], {}
    for i, name in enumerate(names):
        problem = name_problem(name)  # matters only if the column is kept (excluded ones are never written)
        spec = _column_spec("column" if problem else name, df.iloc[:, i], max_categories, id_unique_ratio, max_levels)
        if isinstance(spec, str):
            excluded[name] = spec
            warn(f"column {name!r} is excluded from the table encoding: {spec}")
        elif problem:
            raise DataError(problem)
        else:
            columns.append(spec)
    if len(columns) < 2:
        raise DataError(f"the table has {len(columns)} usable column(s) (at least 2 needed); "
                        f"excluded: {'; '.join(f'{k}: {v}' for k, v in excluded.items()) or 'none'}")
    return TableSchema(columns, excluded)


# -- rows as text --
def _split_fields(text: str) -> list[str]:
    """Split at ", " that is not escaped (category texts write a comma as "\\,")."""
    if "\\" not in text:
        return text.split(", ")
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text.startswith(", ", i):
            parts.append(text[start:i])
            i = start = i + 2
        else:
            i += 1
    return parts + [text[start:]]


def _join(fields_: list[str], rng: np.random.Generator | None) -> str:
    if rng is not None:
        fields_ = [fields_[i] for i in rng.permutation(len(fields_))]
    return ", ".join(fields_)


def serialize_row(row, schema: TableSchema, rng: np.random.Generator | None = None) -> str:
    """'col is value, ...' for one row (dict or Series); columns shuffled by `rng` when given."""
    out = []
    for spec in schema.columns:
        if spec.name not in row:
            raise DataError(f"the row has no column {spec.name!r}")
        out.append(f"{spec.name} is {spec.format(row[spec.name])}")
    return _join(out, rng)


def parse_row(text: str, schema: TableSchema) -> dict:
    """{column: value} in schema order (None = missing); every column exactly once, any order."""
    specs = {c.name: c for c in schema.columns}
    values = {}
    for part in _split_fields(text):
        cut = part.find(" is ")
        if cut < 0:
            raise DataError(f"{_short(part)} is not 'column is value'")
        name = part[:cut]
        if name not in specs:
            why = " (excluded from the schema)" if name in schema.excluded else ""
            raise DataError(f"unknown column {_short(name)}{why}")
        if name in values:
            raise DataError(f"column {name!r} appears twice")
        values[name] = specs[name].parse(part[cut + 4:])
    absent = [n for n in specs if n not in values]
    if absent:
        raise DataError(f"no value for column(s) {', '.join(map(repr, absent))}")
    return {n: values[n] for n in specs}


def encode_table(df: pd.DataFrame, schema: TableSchema, rng: np.random.Generator | None = None) -> list[str]:
    """One text per row of `df` (columns matched by str(name)); excluded columns are ignored."""
    by_name = {str(c): c for c in df.columns}
    absent = [n for n in schema.names() if n not in by_name]
    if absent:
        raise DataError(f"the table has no column(s) {', '.join(map(repr, absent))}")
    per_column = []
    for spec in schema.columns:
        texts = []
        for i, value in enumerate(df[by_name[spec.name]].tolist()):
            try:
                texts.append(f"{spec.name} is {spec.format(value)}")
            except DataError as e:
                raise DataError(f"row {i}: {e}") from None
        per_column.append(texts)
    return [_join(list(row), rng) for row in zip(*per_column)]


def _column(spec: ColumnSpec, values: list) -> pd.Series:
    if spec.kind == "numeric":
        return pd.Series([np.nan if v is None else v for v in values], dtype=float)
    if spec.kind == "integer":
        return pd.Series(values, dtype="Int64" if spec.missing else "int64")
    if spec.kind == "boolean":
        return pd.Series(values, dtype="boolean" if spec.missing else bool)
    if spec.kind == "datetime":
        return pd.Series(values, dtype="datetime64[us]")
    return pd.Series(pd.Categorical(values, categories=spec.categories))


def decode_rows(texts, schema: TableSchema) -> pd.DataFrame:
    """The inverse of encode_table: a frame in schema order with the kinds' dtypes (float, int64 /
    Int64 with missing, category, bool / boolean with missing, datetime64[us])."""
    rows = []
    for i, text in enumerate(texts):
        try:
            rows.append(parse_row(text, schema))
        except DataError as e:
            raise DataError(f"row {i}: {e}") from None
    return pd.DataFrame({s.name: _column(s, [r[s.name] for r in rows]) for s in schema.columns})

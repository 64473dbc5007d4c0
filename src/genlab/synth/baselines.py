"""Two reference generators every synthesizer must beat: independent marginals and a Gaussian copula.

Both learn each column's marginal the same way (sorted values for continuous columns, frequency-ordered
categories for discrete ones) and differ only in how they draw the uniforms that feed the inverse CDFs:
independently, or through a correlated multivariate normal (the SDV-style Gaussian copula).
Continuous values come from interpolated quantiles, so they lie between real values instead of copying them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri
from scipy.stats import rankdata

from genlab.errors import DataError, InvalidParameterError

KINDS = ("numeric", "integer", "categorical", "boolean", "datetime")
CONTINUOUS = frozenset({"numeric", "integer", "datetime"})


def infer_kinds(df: pd.DataFrame, kinds: dict[str, str] | None = None) -> dict:
    """Column -> kind: boolean, datetime, integer, numeric by dtype, else categorical; `kinds` overrides."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    out = {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_bool_dtype(s):
            out[col] = "boolean"
        elif pd.api.types.is_datetime64_any_dtype(s):
            out[col] = "datetime"
        elif pd.api.types.is_integer_dtype(s):
            out[col] = "integer"
        elif pd.api.types.is_numeric_dtype(s):
            out[col] = "numeric"
        else:
            out[col] = "categorical"
    for col, kind in (kinds or {}).items():
        if kind not in KINDS:
            raise InvalidParameterError(f"kinds[{col!r}] = {kind!r}: expected one of {', '.join(KINDS)}")
        if col in out:
            out[col] = kind
    return out


def to_float(s: pd.Series, kind: str) -> np.ndarray:
    """A continuous column as float64 (datetimes as nanoseconds since the epoch, UTC); NaN = missing."""
    if kind == "datetime":
        d = pd.to_datetime(s, errors="coerce")
        if getattr(d.dt, "tz", None) is not None:
            d = d.dt.tz_convert(None)
        x = d.astype("datetime64[ns]").to_numpy().astype("int64").astype(np.float64)
        x[d.isna().to_numpy()] = np.nan
    else:
        x = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(x) & s.notna().to_numpy()
    if bad.any():
        raise DataError(f"column {s.name!r} is declared {kind} but holds {s[bad].iloc[0]!r}")
    return x


class _Marginal:
    """One column's empirical distribution: a normal-score transform and its inverse."""

    def __init__(self, s: pd.Series, kind: str):
        self.kind, self.dtype = kind, s.dtype
        self.tz = getattr(s.dtype, "tz", None) if kind == "datetime" else None
        self.missing = float(s.isna().mean()) if len(s) else 0.0
        if kind in CONTINUOUS:
            x = to_float(s, kind)
            self.values = np.sort(x[~np.isnan(x)])
        else:
            counts = s.dropna().value_counts(sort=True)
            counts = counts[counts > 0]  # a category dtype lists unused categories with count 0
            self.categories = counts.index.to_numpy(dtype=object)
            self.probs = counts.to_numpy(dtype=np.float64) / max(counts.sum(), 1)
            self.upper = np.cumsum(self.probs)

    def normal_scores(self, s: pd.Series, rng: np.random.Generator) -> np.ndarray:
        """Rows -> N(0,1) scores (NaN where missing); a category maps to a random point of its interval."""
        present = s.notna().to_numpy()
        u = np.full(len(s), np.nan)
        if self.kind in CONTINUOUS:
            x = to_float(s, self.kind)[present]
            u[present] = (rankdata(x, method="average") - 0.5) / max(len(x), 1)
        elif present.any():
            code = pd.Index(self.categories).get_indexer(s[present])
            u[present] = self.upper[code] - self.probs[code] * rng.random(len(code))
        return ndtri(np.clip(u, 1e-9, 1 - 1e-9))

    def from_uniform(self, u: np.ndarray, missing: np.ndarray) -> pd.Series:
        """Uniforms -> values through the inverse empirical CDF, then the `missing` rows blanked."""
        if self.kind in CONTINUOUS:
            n = len(self.values)
            if n == 0:
                return self._restore(np.full(len(u), np.nan))
            x = np.interp(u, (np.arange(n) + 0.5) / n, self.values)  # linear between order statistics
            x[missing] = np.nan
            return self._restore(x)
        vals = np.full(len(u), np.nan, dtype=object)
        if len(self.categories):
            idx = np.minimum(np.searchsorted(self.upper, u, side="right"), len(self.categories) - 1)
            vals = self.categories[idx]
            vals[missing] = np.nan
        if isinstance(self.dtype, pd.CategoricalDtype):
            return pd.Series(pd.Categorical(vals, categories=self.dtype.categories))
        if pd.api.types.is_bool_dtype(self.dtype) and not missing.any():
            return pd.Series(vals.astype(bool))
        return pd.Series(vals, dtype=object)

    def _restore(self, x: np.ndarray) -> pd.Series:
        nan = np.isnan(x)
        if self.kind == "datetime":
            d = pd.Series(pd.to_datetime(np.where(nan, 0, np.round(x)).astype("int64"), unit="ns"))
            d[nan] = pd.NaT
            return d.dt.tz_localize("UTC").dt.tz_convert(self.tz) if self.tz is not None else d
        if self.kind == "integer":
            x = np.round(x)
            if not nan.any() and pd.api.types.is_integer_dtype(self.dtype):
                return pd.Series(x.astype(self.dtype))
            return pd.Series(x).astype("Int64")
        if pd.api.types.is_float_dtype(self.dtype):
            return pd.Series(x.astype(self.dtype))
        return pd.Series(x)


class IndependentMarginals:
    """Every column drawn independently from its own empirical marginal (keeps shapes, breaks all pairs)."""

    def fit(self, df: pd.DataFrame, kinds: dict[str, str] | None = None, seed: int = 0):
        kinds = infer_kinds(df, kinds)
        if df.shape[0] == 0 or df.shape[1] == 0:
            raise DataError(f"cannot fit a generator on an empty table ({df.shape[0]} rows, {df.shape[1]} columns)")
        self.columns = list(df.columns)
        self.marginals = [_Marginal(df[c], kinds[c]) for c in self.columns]
        return self

    def _uniforms(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.random((n, len(self.columns)))

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        if not hasattr(self, "marginals"):
            raise InvalidParameterError(f"{type(self).__name__}: call fit() before sample()")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidParameterError(f"n must be a non-negative integer, got {n!r}")
        rng = np.random.default_rng(seed)
        u = self._uniforms(int(n), rng)
        missing = rng.random(u.shape) < np.array([m.missing for m in self.marginals])
        cols = {c: m.from_uniform(u[:, j], missing[:, j]) for j, (c, m) in enumerate(zip(self.columns, self.marginals))}
        return pd.DataFrame(cols, columns=self.columns)


class GaussianCopula(IndependentMarginals):
    """Marginals joined by the correlation matrix of the columns' normal scores."""

    def fit(self, df: pd.DataFrame, kinds: dict[str, str] | None = None, seed: int = 0):
        super().fit(df, kinds)
        rng = np.random.default_rng(seed)
        z = np.column_stack([m.normal_scores(df[c], rng) for c, m in zip(self.columns, self.marginals)])
        corr = pd.DataFrame(z).corr(min_periods=3).to_numpy()  # pairwise-complete: missing rows skipped
        corr = np.nan_to_num(corr, nan=0.0)
        np.fill_diagonal(corr, 1.0)
        w, v = np.linalg.eigh(corr)  # pairwise estimates need not be positive definite: clip the spectrum
        corr = (v * np.maximum(w, 1e-6)) @ v.T
        d = np.sqrt(np.diag(corr))
        self.correlation = corr / np.outer(d, d)
        self._chol = np.linalg.cholesky(self.correlation + 1e-9 * np.eye(len(d)))
        return self

    def _uniforms(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return ndtr(rng.standard_normal((n, len(self.columns))) @ self._chol.T)

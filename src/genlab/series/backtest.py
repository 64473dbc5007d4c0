"""Rolling-origin evaluation of probabilistic forecasters, as in the Chronos paper and the fev
benchmark: each series is cut at a few origins, every forecaster predicts the next `horizon`
values from what came before, and the forecasts are scored with MASE (median forecast) and
WQL (nine quantiles), then summarised as geometric means relative to seasonal naive.

A forecaster is any callable `f(contexts, horizon) -> list[Forecast]` with a `name`; it gets all
contexts of one series in one call so a neural model can sample them as one batch. Baselines
that need the seasonal period declare `needs_season = True` and are also passed `season=`.
"""

from __future__ import annotations

import csv
import importlib
import io
import math
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Protocol

import numpy as np

from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_write_text, save_figure, write_json

QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_Z = np.array([NormalDist().inv_cdf(q) for q in QUANTILES])  # standard-normal quantiles; _Z[4] == 0.0


@dataclass
class Forecast:
    mean: np.ndarray  # [H]
    quantiles: np.ndarray  # [len(QUANTILES), H], non-decreasing along axis 0

    @property
    def median(self) -> np.ndarray:
        return self.quantiles[QUANTILES.index(0.5)]


class Forecaster(Protocol):
    name: str

    def __call__(self, contexts: list[np.ndarray], horizon: int) -> list[Forecast]: ...


# ---------------------------------------------------------------------------- metrics

def mase(actual, median, history, season) -> float:
    """Mean |actual - median| over the finite actual values, divided by the in-sample MAE of the
    seasonal-naive forecast on `history` (lag `season`, or lag 1 when history is too short).
    NaN when nothing can be scored or the scale is zero (e.g. a constant history)."""
    actual, median = np.asarray(actual, float).ravel(), np.asarray(median, float).ravel()
    history = np.asarray(history, float).ravel()
    if actual.shape != median.shape:
        raise InvalidParameterError(f"mase: {actual.size} actual values but {median.size} forecasts")
    if int(season) < 1:
        raise InvalidParameterError(f"mase: season must be >= 1, got {season}")
    lag = int(season) if history.size > int(season) else 1
    diffs = np.abs(history[lag:] - history[:-lag])
    diffs, keep = diffs[np.isfinite(diffs)], np.isfinite(actual)
    if not diffs.size or not keep.any() or diffs.mean() == 0:
        return math.nan
    return float(np.abs(actual[keep] - median[keep]).mean() / diffs.mean())


def wql(actual, quantiles, levels=QUANTILES) -> float:
    """Weighted quantile loss (GluonTS / Chronos): mean over levels q of
    2 * sum_t pinball_q(y_t, yhat_q,t) / sum_t |y_t|, over the finite actual values."""
    actual, quantiles = np.asarray(actual, float).ravel(), np.asarray(quantiles, float)
    levels = np.asarray(levels, float).ravel()
    if quantiles.shape != (levels.size, actual.size):
        raise InvalidParameterError(f"wql: quantiles have shape {quantiles.shape}, expected "
                                    f"({levels.size} levels, {actual.size} steps)")
    if not ((levels > 0) & (levels < 1)).all():
        raise InvalidParameterError(f"wql: quantile levels must lie in (0, 1), got {levels.tolist()}")
    keep = np.isfinite(actual)
    denom = np.abs(actual[keep]).sum()
    if denom == 0:
        return math.nan
    diff = actual[keep][None, :] - quantiles[:, keep]
    pinball = np.maximum(levels[:, None] * diff, (levels[:, None] - 1) * diff)
    return float(2 * pinball.sum() / (levels.size * denom))


# ---------------------------------------------------------------------------- baselines

def fill_gaps(context) -> np.ndarray:
    """`context` as floats with NaN gaps linearly interpolated (leading/trailing gaps take the
    nearest value)."""
    y = np.asarray(context, float).ravel()
    ok = np.isfinite(y)
    if not ok.any():
        raise DataError(f"a context of {y.size} values has no finite value to forecast from")
    if ok.all():
        return y
    idx = np.arange(y.size)
    return np.interp(idx, idx[ok], y[ok])


def normal_forecast(mean, sigma) -> Forecast:
    """A Forecast with normal quantiles around `mean` (sigma per step, or one for all)."""
    mean = np.asarray(mean, float)
    sigma = np.broadcast_to(np.asarray(sigma, float), mean.shape)
    return Forecast(mean=mean.copy(), quantiles=mean[None, :] + _Z[:, None] * sigma[None, :])


def seasonal_naive_forecast(y: np.ndarray, horizon: int, season: int) -> Forecast:
    """The last season repeated; sigma_h = RMS of the in-sample seasonal-naive residuals
    * sqrt(ceil(h / season)), as statsforecast's SeasonalNaive. Lag 1 when y is too short."""
    season = season if y.size > season else 1
    resid = y[season:] - y[:-season]
    sigma = math.sqrt(float(np.mean(resid**2))) if resid.size else 0.0
    k = np.arange(horizon) // season + 1  # = ceil(h / season) for h = 1..horizon
    return normal_forecast(np.resize(y[-season:], horizon), sigma * np.sqrt(k))


class SeasonalNaive:
    name = "seasonal-naive"
    needs_season = True

    def __call__(self, contexts: list[np.ndarray], horizon: int, season: int = 1) -> list[Forecast]:
        return [seasonal_naive_forecast(fill_gaps(c), horizon, season) for c in contexts]


class _StatsModel:
    """Fit a statsmodels model per context, trying `specs` from richest to simplest; any fit
    failure or non-finite forecast moves to the next spec, and seasonal naive is the last resort,
    so a backtest never stops on one bad window. `specs_used` counts which spec served."""

    name = ""
    needs_season = True

    def __init__(self):
        self.specs_used: Counter = Counter()

    def specs(self, n: int, season: int) -> list[tuple[str, dict]]:
        raise NotImplementedError

    def fit_predict(self, z: np.ndarray, horizon: int, spec: dict) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard deviation) of the next `horizon` values of the standardised series z."""
        raise NotImplementedError

    def __call__(self, contexts: list[np.ndarray], horizon: int, season: int = 1) -> list[Forecast]:
        from threadpoolctl import threadpool_limits

        # imported before catch_warnings: on import it installs "always" filters that would beat ours
        importlib.import_module("statsmodels.tools.sm_exceptions")
        # the state-space matrices are tiny: threaded BLAS only adds overhead (20x slower on 2 busy cores)
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning, ValueWarning, overflow: we check results instead
            return [self._forecast(fill_gaps(c), horizon, season) for c in contexts]

    def _forecast(self, y: np.ndarray, horizon: int, season: int) -> Forecast:
        loc, scale = float(y.mean()), float(y.std())
        if scale == 0:
            self.specs_used["constant"] += 1
            return normal_forecast(np.full(horizon, loc), 0.0)
        z = (y - loc) / scale  # optimisers behave on unit scale
        for label, spec in self.specs(y.size, season):
            try:
                mean, sd = (np.asarray(a, float) for a in self.fit_predict(z, horizon, spec))
            except Exception:  # statsmodels raises many kinds (LinAlgError, ValueError, IndexError ...)
                continue
            if mean.shape == (horizon,) and sd.shape == (horizon,) and np.isfinite(mean).all() \
                    and np.isfinite(sd).all():
                self.specs_used[label] += 1
                return normal_forecast(loc + scale * mean, scale * np.maximum(sd, 0.0))
        self.specs_used["seasonal-naive"] += 1
        return seasonal_naive_forecast(y, horizon, season)


class ETS(_StatsModel):
    """statsmodels ETSModel, additive error: damped additive trend + additive season (when the
    context holds >= 2 seasons), else damped trend, else simple exponential smoothing."""

    name = "ets"

    def specs(self, n, season):
        damped = {"trend": "add", "damped_trend": True}
        seasonal = [("AAdA", {**damped, "seasonal": "add", "seasonal_periods": season})]
        return (seasonal if season > 1 and n >= 2 * season else []) + [("AAdN", damped), ("ANN", {})]

    def fit_predict(self, z, horizon, spec):
        import pandas as pd
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        # a pandas Series: statsmodels 0.15's get_prediction fails on plain arrays
        res = ETSModel(pd.Series(z), error="add", **spec).fit(disp=False)
        pred = res.get_prediction(start=z.size, end=z.size + horizon - 1)
        return pred.predicted_mean.to_numpy(), np.sqrt(np.asarray(pred.forecast_variance, float))


class ARIMA(_StatsModel):
    """statsmodels SARIMAX (1,1,1) x (0,1,1,season) when 1 < season <= 24 and the context holds
    >= 3 seasons; else (1,1,1), then (0,1,1)."""

    name = "arima"

    def specs(self, n, season):
        seasonal = [(f"(1,1,1)(0,1,1,{season})", {"order": (1, 1, 1), "seasonal_order": (0, 1, 1, season)})]
        return ((seasonal if 1 < season <= 24 and n >= 3 * season else [])
                + [("(1,1,1)", {"order": (1, 1, 1)}), ("(0,1,1)", {"order": (0, 1, 1)})])

    def fit_predict(self, z, horizon, spec):
        from statsmodels.tsa.statespace.sarimax import SARIMAX

        pred = SARIMAX(z, **spec).fit(disp=False).get_forecast(horizon)
        return pred.predicted_mean, pred.se_mean


# ---------------------------------------------------------------------------- seasons, origins

_GLUONTS_SEASONS = {"S": 3600, "T": 1440, "H": 24, "D": 1, "W": 1, "M": 12, "B": 5, "Q": 4}
_ALIASES = {"s": "S", "min": "T", "h": "H", "ME": "M", "BME": "M", "BM": "M", "QE": "Q", "BQE": "Q",
            "BQ": "Q", "A": "Y", "YE": "Y", "BA": "Y", "BY": "Y", "BYE": "Y"}
_NO_SEASON = {"Y", "SM", "SME", "C", "L", "ms", "U", "us", "N", "ns", "BH", "CBH", "bh", "cbh"}


def gluonts_season(freq: str) -> int:
    """The seasonal period GluonTS's get_seasonality gives a pandas frequency (what Chronos and
    fev use for MASE and seasonal naive): seconds 3600, minutes ("T"/"min") 1440, hours 24,
    days 1, weeks 1, business days 5, months 12, quarters 4, years (and sub-second, semi-month,
    custom business) 1. Start/end and anchor variants ("MS", "ME", "QE-DEC", "W-SUN") count as
    their base; a multiple divides the period when it can ("15min" 96, "2H" 12), else 1. Old
    and new pandas aliases are both accepted. (genlab.series.data.season_for is the
    genlab default instead: daily 7, weekly 52.)"""
    match = re.fullmatch(r"\s*(\d*)\s*([A-Za-z]+)(?:-[A-Za-z]+)?\s*", str(freq))
    if not match:
        raise InvalidParameterError(f"not a pandas frequency string: {freq!r}")
    multiple, base = int(match.group(1) or 1), match.group(2)
    if base not in _GLUONTS_SEASONS and base not in _ALIASES and base not in _NO_SEASON \
            and len(base) >= 2 and base.endswith("S"):
        base = base[:-1]  # start-of-period variants: "MS", "QS", "AS", "YS", "BMS" ...
    base = _ALIASES.get(base, base)
    if base in _NO_SEASON:
        return 1
    if base not in _GLUONTS_SEASONS or multiple < 1:
        raise InvalidParameterError(f"unknown pandas frequency {freq!r}")
    season, remainder = divmod(_GLUONTS_SEASONS[base], multiple)
    return season if remainder == 0 else 1


def origins(n: int, horizon: int, windows: int, min_context: int) -> list[int]:
    """Cut points, ascending: the last window ends at the series end and each earlier one
    `horizon` steps before; every window needs >= min_context values before its origin."""
    for label, value in (("horizon", horizon), ("windows", windows), ("min_context", min_context)):
        if int(value) < 1:
            raise InvalidParameterError(f"{label} must be >= 1, got {value}")
    need = min_context + horizon * windows
    if n < need:
        raise DataError(f"{n} values are too few for {windows} window(s) of horizon {horizon} after at "
                        f"least {min_context} context values: need {need}")
    return [n - horizon * k for k in range(windows, 0, -1)]


# ---------------------------------------------------------------------------- backtest

def _check(name: str, series: str, forecasts, count: int, horizon: int) -> list[Forecast]:
    """The forecaster's output as Forecasts, or one DataError naming what is wrong."""
    if not isinstance(forecasts, (list, tuple)) or len(forecasts) != count:
        got = f"{len(forecasts)} items" if isinstance(forecasts, (list, tuple)) else type(forecasts).__name__
        raise DataError(f"forecaster {name!r} returned {got} for series {series!r}; expected a list of {count} Forecasts")
    checked = []
    for i, f in enumerate(forecasts, 1):
        where = f"forecaster {name!r}, series {series!r}, window {i}"
        try:
            mean, q = np.asarray(f.mean, float), np.asarray(f.quantiles, float)
        except (AttributeError, TypeError, ValueError) as e:
            raise DataError(f"{where}: not a Forecast ({e})") from None
        if mean.shape != (horizon,):
            raise DataError(f"{where}: mean has shape {mean.shape}, expected ({horizon},)")
        if q.shape != (len(QUANTILES), horizon):
            raise DataError(f"{where}: quantiles have shape {q.shape}, expected ({len(QUANTILES)}, {horizon})")
        if not (np.isfinite(mean).all() and np.isfinite(q).all()):
            raise DataError(f"{where}: the forecast holds NaN or infinite values")
        if (np.diff(q, axis=0) < -1e-9 * (1 + np.abs(q).max())).any():
            raise DataError(f"{where}: quantiles decrease from one level to the next (axis 0 must be non-decreasing)")
        checked.append(Forecast(mean=mean, quantiles=q))
    return checked


def _finite_mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def backtest(series: dict[str, tuple[np.ndarray, int]], forecasters: list[Forecaster], horizon: int | dict[str, int],
             windows: int = 3, min_context: int = 32, max_context: int | None = None, progress=None) -> BacktestResult:
    """Score every forecaster on every series (name -> (values, season)) over `windows` rolling
    origins. Contexts are values[max(0, o - max_context):o] (NaN gaps kept: forecasters fill
    them); NaN actual values are left out of the metrics; MASE scales by the whole history
    values[:o]. `progress(1)` is called after each (series, forecaster)."""
    names = [f.name for f in forecasters]
    if not names:
        raise InvalidParameterError("backtest needs at least one forecaster")
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"forecaster names must be unique, got {names}")
    if max_context is not None and max_context < 1:
        raise InvalidParameterError(f"max_context must be >= 1 or None, got {max_context}")
    rows = []
    for sname, (values, season) in series.items():
        values = np.asarray(values, float)
        if values.ndim != 1:
            raise DataError(f"series {sname!r}: values must be one-dimensional, got shape {values.shape}")
        if int(season) < 1:
            raise InvalidParameterError(f"series {sname!r}: season must be >= 1, got {season}")
        h = horizon.get(sname) if isinstance(horizon, dict) else horizon
        if h is None:
            raise InvalidParameterError(f"series {sname!r} has no horizon in the horizon dict")
        try:
            cuts = origins(values.size, h, windows, min_context)
        except DataError as e:
            raise DataError(f"series {sname!r}: {e}") from None
        contexts = [values[max(0, o - max_context) if max_context else 0:o] for o in cuts]
        for o, c in zip(cuts, contexts):
            if not np.isfinite(c).any():
                raise DataError(f"series {sname!r}: the context before position {o} holds no finite value")
        for f in forecasters:
            kwargs = {"season": int(season)} if getattr(f, "needs_season", False) else {}
            start = time.perf_counter()
            out = f([c.copy() for c in contexts], h, **kwargs)  # copies: a forecaster may not alter the series
            seconds = time.perf_counter() - start
            scores = [(mase(values[o:o + h], fc.median, values[:o], season), wql(values[o:o + h], fc.quantiles))
                      for o, fc in zip(cuts, _check(f.name, sname, out, len(cuts), h))]
            rows.append({"series": sname, "model": f.name, "mase": _finite_mean(s[0] for s in scores),
                         "wql": _finite_mean(s[1] for s in scores), "windows": len(cuts), "seconds": seconds})
            if progress is not None:
                progress(1)
    return BacktestResult(rows)


def _geomean_ratio(pairs) -> tuple[float, int]:
    ratios = [a / b for a, b in pairs if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0]
    return (math.exp(float(np.mean(np.log(ratios)))) if ratios else math.nan), len(ratios)


def _jsonable(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class BacktestResult:
    rows: list[dict]  # one per (series, model): series, model, mase, wql, windows, seconds
    baseline: str = "seasonal-naive"

    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def series(self) -> list[str]:
        return list(dict.fromkeys(r["series"] for r in self.rows))

    def relative(self) -> dict[str, dict[str, float]]:
        """model -> {"mase", "wql": geometric mean over series of model / baseline error;
        "mase_series", "wql_series": how many series were used (NaN or zero errors are skipped)}."""
        base = {r["series"]: r for r in self.rows if r["model"] == self.baseline}
        if not base:
            raise InvalidParameterError(f"baseline {self.baseline!r} is not among the models {self.models()}")
        out = {}
        for model in self.models():
            mine = [r for r in self.rows if r["model"] == model and r["series"] in base]
            out[model] = {}
            for metric in ("mase", "wql"):
                score, used = _geomean_ratio((r[metric], base[r["series"]][metric]) for r in mine)
                out[model].update({metric: score, f"{metric}_series": used})
        return out

    def table(self):
        from rich.table import Table

        models, cell = self.models(), {(r["series"], r["model"]): r for r in self.rows}
        table = Table(title=f"rolling-origin backtest (relative: geometric mean of error / {self.baseline})")
        table.add_column("series")
        for m in models:
            table.add_column(f"{m}\nMASE", justify="right")
            table.add_column(f"{m}\nWQL", justify="right")
        for s in self.series():
            table.add_row(s, *(f"{cell[s, m][k]:.3f}" if (s, m) in cell else "-" for m in models for k in ("mase", "wql")))
        table.add_section()
        rel = self.relative()
        table.add_row("relative", *(f"{rel[m][k]:.3f}" for m in models for k in ("mase", "wql")), style="bold")
        table.add_row("series used", *(str(rel[m][f"{k}_series"]) for m in models for k in ("mase", "wql")))
        seconds = {m: sum(r["seconds"] for r in self.rows if r["model"] == m) for m in models}
        table.add_row("seconds", *(c for m in models for c in (f"{seconds[m]:.2f}", "")))
        return table

    def to_json(self, path) -> Path:
        rel = {m: {k: _jsonable(v) for k, v in d.items()} for m, d in self.relative().items()}
        rows = [{k: _jsonable(v) for k, v in r.items()} for r in self.rows]
        write_json(path, {"baseline": self.baseline, "quantiles": list(QUANTILES), "rows": rows, "relative": rel})
        return Path(path)

    def to_csv(self, path) -> Path:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["series", "model", "mase", "wql", "windows", "seconds"],
                                extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(path, buf.getvalue())
        return Path(path)

    def plot(self, png) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rel, models = self.relative(), self.models()
        x = np.arange(len(models))
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(models) + 2), 3.6))
        for offset, metric in ((-0.2, "mase"), (0.2, "wql")):
            bars = ax.bar(x + offset, [rel[m][metric] for m in models], width=0.4, label=f"relative {metric.upper()}")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xticks(x, models)
        ax.set_ylabel(f"geometric mean vs {self.baseline}")
        ax.set_title(f"backtest over {len(self.series())} series (lower is better)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, png)

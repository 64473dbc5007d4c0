"""Rolling-origin backtests: metrics against hand-computed values, the baselines, origins,
and a full run writing its table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from genlab.errors import DataError, InvalidParameterError
from genlab.series.backtest import (
    ARIMA, ETS, QUANTILES, BacktestResult, Forecast, SeasonalNaive, backtest, fill_gaps, gluonts_season, mase,
    normal_forecast, origins, wql,
)


def trend_season(n=120, season=12, noise=0.5, seed=0):
    t = np.arange(n)
    return 20 + 0.8 * t + 10 * np.sin(2 * np.pi * t / season) + np.random.default_rng(seed).normal(0, noise, n)


# ---------------------------------------------------------------------------- metrics

def test_mase_by_hand():
    actual, median, history = [3.0, 5.0], [2.0, 7.0], [1.0, 2.0, 4.0, 7.0]
    # errors 1, 2 -> 1.5; lag-1 diffs 1, 2, 3 -> 2; lag-2 diffs 3, 5 -> 4
    assert mase(actual, median, history, 1) == pytest.approx(0.75)
    assert mase(actual, median, history, 2) == pytest.approx(0.375)
    assert mase(actual, median, history, 10) == pytest.approx(0.75)  # history too short for lag 10 -> lag 1
    assert mase([3.0, np.nan], median, history, 1) == pytest.approx(0.5)  # NaN actual left out
    assert math.isnan(mase(actual, median, [5.0, 5.0, 5.0], 1))  # zero scale -> nan, no crash
    assert math.isnan(mase([np.nan, np.nan], median, history, 1))
    with pytest.raises(InvalidParameterError):
        mase(actual, [1.0], history, 1)


def test_wql_by_hand():
    actual = np.array([2.0, 4.0])
    q = np.array([[1.0, 5.0], [3.0, 3.0]])
    # level 0.1: pinball 0.1*1 + 0.9*1 = 1.0; level 0.9: 0.1*1 + 0.9*1 = 1.0 -> 2 * 2 / (2 * 6)
    assert wql(actual, q, levels=(0.1, 0.9)) == pytest.approx(1 / 3)
    # level 0.5 with median [3, 3]: pinball 0.5 + 0.5 = 1 -> 2 * 1 / 6
    assert wql(actual, [[3.0, 3.0]], levels=(0.5,)) == pytest.approx(1 / 3)
    with_gap = wql([2.0, 4.0, np.nan], np.c_[q, [0.0, 0.0]], levels=(0.1, 0.9))
    assert with_gap == pytest.approx(1 / 3)  # NaN actual left out
    assert math.isnan(wql([0.0, 0.0], np.zeros((9, 2))))
    with pytest.raises(InvalidParameterError):
        wql(actual, np.zeros((3, 2)))


def test_wql_perfect_and_wider_wrong():
    y = np.array([10.0, 12.0, 9.0, 11.0])
    assert wql(y, np.tile(y, (len(QUANTILES), 1))) == 0.0  # every quantile equal to the truth
    assert wql(y, normal_forecast(y, 0.0).quantiles) == 0.0
    narrow, wide = normal_forecast(y + 1, 0.5).quantiles, normal_forecast(y + 1, 3.0).quantiles
    assert 0 < wql(y, narrow) < wql(y, wide)
    centred, off = normal_forecast(y, 1.0).quantiles, normal_forecast(y + 2, 1.0).quantiles
    assert 0 < wql(y, centred) < wql(y, off)


def test_fill_gaps_interpolates():
    np.testing.assert_allclose(fill_gaps([np.nan, 1.0, np.nan, 3.0, np.nan]), [1, 1, 2, 3, 3])
    with pytest.raises(DataError):
        fill_gaps([np.nan, np.nan])


# ---------------------------------------------------------------------------- baselines

def test_seasonal_naive_on_a_sine():
    t = np.arange(132)
    y = np.sin(2 * np.pi * t / 12)
    (f,) = SeasonalNaive()([y[:120]], 12, season=12)
    assert f.median.shape == (12,) and f.quantiles.shape == (9, 12)
    np.testing.assert_allclose(f.median, y[120:], atol=1e-12)
    # lag-1 scale: a pure sine's own seasonal-naive scale is ~0, which would make MASE 0/0
    assert mase(y[120:], f.median, y[:120], 1) < 1e-9
    assert math.isnan(mase(y[120:], f.median, np.tile(np.arange(12.0), 10), 12))  # exact zero scale -> nan
    assert (np.diff(f.quantiles, axis=0) >= 0).all()


def test_seasonal_naive_sigma_grows_with_seasons_ahead():
    y = trend_season(96, noise=1.0)
    (f,) = SeasonalNaive()([y], 24, season=12)
    np.testing.assert_allclose(f.mean, np.r_[y[-12:], y[-12:]])
    resid = y[12:] - y[:-12]
    width = f.quantiles[-1] - f.quantiles[0]  # 2 * 1.2816 * sigma_h
    sigma = np.sqrt(np.mean(resid**2))
    np.testing.assert_allclose(width[:12], 2 * 1.2815515655446004 * sigma)
    np.testing.assert_allclose(width[12:], width[:12] * np.sqrt(2))  # k = ceil(h / 12) = 2
    assert (np.diff(f.quantiles, axis=0) > 0).all()


@pytest.mark.parametrize("model", [ETS, ARIMA])
def test_statsmodels_baselines_never_crash(model):
    f = model()
    contexts = [np.full(30, 4.0), np.array([1.0, 2.0]), np.r_[np.nan, np.arange(20.0), np.nan, 5.0]]
    out = f(contexts, 6, season=12)
    assert len(out) == 3
    for fc in out:
        assert fc.mean.shape == (6,) and fc.quantiles.shape == (9, 6)
        assert np.isfinite(fc.quantiles).all() and (np.diff(fc.quantiles, axis=0) >= 0).all()
    np.testing.assert_allclose(out[0].quantiles, 4.0)  # a constant context forecasts itself
    assert sum(f.specs_used.values()) == 3 and f.specs_used["constant"] == 1


def test_ets_beats_seasonal_naive_on_trend_and_season():
    y = trend_season(120, noise=0.5)
    result = backtest({"trend": (y, 12)}, [SeasonalNaive(), ETS()], horizon=12, windows=3, min_context=48)
    by_model = {r["model"]: r for r in result.rows}
    # seasonal naive misses one season of trend (0.8 * 12 per step) -> MASE ~1; ETS tracks it
    assert by_model["seasonal-naive"]["mase"] == pytest.approx(1.0, abs=0.1)
    assert by_model["ets"]["mase"] < 0.3 * by_model["seasonal-naive"]["mase"]
    assert by_model["ets"]["wql"] < 0.3 * by_model["seasonal-naive"]["wql"]
    rel = result.relative()
    assert rel["seasonal-naive"]["mase"] == 1.0 and rel["seasonal-naive"]["wql"] == 1.0
    assert rel["ets"]["mase"] == pytest.approx(by_model["ets"]["mase"] / by_model["seasonal-naive"]["mase"])


# ---------------------------------------------------------------------------- origins, seasons

def test_origins():
    assert origins(100, 12, 3, 32) == [64, 76, 88]
    assert origins(44, 12, 1, 32) == [32]
    with pytest.raises(DataError, match=r"43 values .* need 44"):
        origins(43, 12, 1, 32)
    with pytest.raises(DataError, match="need 68"):
        origins(67, 12, 3, 32)
    with pytest.raises(InvalidParameterError):
        origins(100, 0, 3, 32)


def test_gluonts_season():
    expected = {"H": 24, "h": 24, "2H": 12, "15min": 96, "T": 1440, "D": 1, "W": 1, "W-SUN": 1, "B": 5,
                "M": 12, "MS": 12, "ME": 12, "Q": 4, "QE-DEC": 4, "A": 1, "Y": 1, "YS": 1, "S": 3600, "7D": 1}
    assert {f: gluonts_season(f) for f in expected} == expected
    with pytest.raises(InvalidParameterError):
        gluonts_season("fortnightly?")


def test_relative_skips_nan_and_zero():
    rows = [{"series": s, "model": m, "mase": v, "wql": v, "windows": 1, "seconds": 0.0}
            for s, m, v in [("a", "seasonal-naive", 2.0), ("a", "x", 1.0), ("b", "seasonal-naive", 4.0),
                            ("b", "x", 16.0), ("c", "seasonal-naive", math.nan), ("c", "x", 1.0),
                            ("d", "seasonal-naive", 0.0), ("d", "x", 1.0)]]
    rel = BacktestResult(rows).relative()
    assert rel["x"]["mase"] == pytest.approx(math.sqrt(0.5 * 4.0))  # only series a and b
    assert rel["x"]["mase_series"] == 2
    with pytest.raises(InvalidParameterError, match="baseline 'nope'"):
        BacktestResult(rows, baseline="nope").relative()


# ---------------------------------------------------------------------------- full run

def test_backtest_writes_outputs(tmp_path):
    from rich.console import Console

    monthly = trend_season(96)
    daily = 50 + 5 * np.sin(2 * np.pi * np.arange(90) / 7) + np.random.default_rng(1).normal(0, 1, 90)
    daily[[40, 41, 75]] = np.nan  # gaps in a context and in an actual window
    calls = []
    result = backtest({"monthly": (monthly, 12), "daily": (daily, 7)}, [SeasonalNaive(), ETS(), ARIMA()],
                      horizon={"monthly": 12, "daily": 7}, windows=2, min_context=40, max_context=60,
                      progress=calls.append)
    assert calls == [1] * 6
    assert [(r["series"], r["model"]) for r in result.rows] == [
        (s, m) for s in ("monthly", "daily") for m in ("seasonal-naive", "ets", "arima")]
    for r in result.rows:
        assert r["windows"] == 2 and r["seconds"] >= 0
        assert np.isfinite(r["mase"]) and np.isfinite(r["wql"]), r
    rel = result.relative()
    assert rel["ets"]["mase_series"] == 2 and rel["ets"]["mase"] < 1.0

    console = Console(width=160, record=True)
    console.print(result.table())
    text = console.export_text()
    assert "monthly" in text and "relative" in text and f"{rel['ets']['mase']:.3f}" in text

    saved = json.loads(result.to_json(tmp_path / "out" / "backtest.json").read_text())
    assert saved["baseline"] == "seasonal-naive" and len(saved["rows"]) == 6
    assert saved["relative"]["arima"]["wql"] == pytest.approx(rel["arima"]["wql"])
    with result.to_csv(tmp_path / "out" / "backtest.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 6 and float(csv_rows[1]["mase"]) == pytest.approx(result.rows[1]["mase"])
    png = result.plot(tmp_path / "out" / "relative.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["backtest.csv", "backtest.json", "relative.png"]


def test_backtest_passes_contexts_in_one_call():
    class Recorder:
        name = "recorder"

        def __init__(self):
            self.calls = []

        def __call__(self, contexts, horizon):
            self.calls.append(([len(c) for c in contexts], horizon))
            return [normal_forecast(np.full(horizon, c[-1]), 1.0) for c in contexts]

    rec = Recorder()
    backtest({"s": (np.arange(1.0, 101.0), 1)}, [SeasonalNaive(), rec], horizon=10, windows=3, min_context=20,
             max_context=50)
    assert rec.calls == [([50, 50, 50], 10)]  # origins 70, 80, 90, contexts capped at 50
    rec.calls.clear()
    backtest({"s": (np.arange(1.0, 101.0), 1)}, [rec], horizon=10, windows=3, min_context=20)
    assert rec.calls == [([70, 80, 90], 10)]


def test_backtest_rejects_bad_forecasts():
    class Broken:
        name = "broken-model"

        def __init__(self, make):
            self.make = make

        def __call__(self, contexts, horizon):
            return [self.make(horizon) for _ in contexts]

    y = trend_season(80)
    cases = [
        (lambda h: Forecast(np.zeros(h), np.zeros((3, h))), r"quantiles have shape \(3, 6\), expected \(9, 6\)"),
        (lambda h: Forecast(np.zeros(h + 1), np.zeros((9, h))), "mean has shape"),
        (lambda h: Forecast(np.zeros(h), np.zeros((9, h)) - np.arange(9)[:, None]), "quantiles decrease"),
        (lambda h: Forecast(np.full(h, np.nan), np.zeros((9, h))), "NaN"),
        (lambda h: np.zeros(h), "not a Forecast"),
    ]
    for make, message in cases:
        with pytest.raises(DataError, match=message) as err:
            backtest({"s": (y, 12)}, [Broken(make)], horizon=6, windows=2)
        assert "'broken-model'" in str(err.value)

    class TooFew(Broken):
        def __call__(self, contexts, horizon):
            return [normal_forecast(np.zeros(horizon), 1.0)]

    with pytest.raises(DataError, match="'broken-model' returned 1 items .* expected a list of 2"):
        backtest({"s": (y, 12)}, [TooFew(None)], horizon=6, windows=2)


def test_backtest_input_errors():
    y = trend_season(60)
    with pytest.raises(DataError, match="series 'short'"):
        backtest({"short": (y[:40], 12)}, [SeasonalNaive()], horizon=12)
    with pytest.raises(InvalidParameterError, match="unique"):
        backtest({"s": (y, 12)}, [SeasonalNaive(), SeasonalNaive()], horizon=6)
    with pytest.raises(InvalidParameterError, match="no horizon"):
        backtest({"s": (y, 12)}, [SeasonalNaive()], horizon={"other": 6})
    gappy = y.copy()
    gappy[40:58] = np.nan  # the only window's context, values[50:58], is all NaN
    with pytest.raises(DataError, match="no finite value"):
        backtest({"s": (gappy, 12)}, [SeasonalNaive()], horizon=2, windows=1, max_context=8)

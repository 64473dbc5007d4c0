"""`genlab series eval`: genlab zero-shot and fine-tuned against seasonal naive, ETS and ARIMA,
by rolling-origin backtests on the bundled series and the user's own.

The fine-tuned forecaster adapts the model separately for each series, on the history before
that series' first backtest origin only, so no evaluated value is ever trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from genlab.series.backtest import ARIMA, ETS, BacktestResult, Forecast, SeasonalNaive, backtest
from genlab.series.data import Series, bundled
from genlab.series.model import SeriesModel

# Forecast horizons by seasonal period, as in the M4 competition (yearly 6, quarterly 8,
# monthly 18, weekly 13) and common practice for daily / hourly data.
HORIZONS = {1: 6, 4: 8, 12: 18, 52: 13, 7: 14, 5: 10, 24: 48}


def default_horizon(season: int) -> int:
    return HORIZONS.get(season, 2 * season if season > 1 else 6)


@dataclass
class Finetuned:
    """Per series: fine-tune `model` on the history before the earliest origin, then forecast."""

    model: str
    work: Path
    steps: int = 100
    full: bool = False
    num_samples: int = 100
    seed: int = 0
    device: str = "cpu"
    console: Console | None = None
    name: str = "genlab-finetuned"

    def __post_init__(self):
        self.runs = 0

    def __call__(self, contexts: list[np.ndarray], horizon: int) -> list[Forecast]:
        from genlab.series.train import finetune_series

        history = min(contexts, key=len)  # the earliest origin's history: nothing after it is used
        self.runs += 1
        run = finetune_series(model=self.model, out=str(self.work / f"series-{self.runs}"), series={"history": history},
                              max_steps=self.steps, full=self.full, seed=self.seed, device=self.device,
                              console=self.console or Console(stderr=True, quiet=True))
        forecaster = SeriesModel.load(run.output_dir, device=self.device, num_samples=self.num_samples, seed=self.seed)
        return forecaster(contexts, horizon)


def evaluate_series(model: str | Path, series: dict[str, Series] | None = None, out: str | Path = "runs/series-eval",
                    horizon: int | None = None, windows: int = 3, num_samples: int = 100, finetune: bool = True,
                    finetune_steps: int = 100, full: bool = False, arima: bool = True, seed: int = 0,
                    device: str = "cpu", console: Console | None = None) -> BacktestResult:
    """Backtest every forecaster on `series` (default: the bundled set); writes backtest.json,
    backtest.csv and relative.png to `out` and returns the result."""
    console = console or Console(stderr=True)
    out = Path(out)
    series = series if series is not None else bundled()
    zero_shot = SeriesModel.load(model, device=device, num_samples=num_samples, seed=seed, name="genlab-zero-shot")
    forecasters = [SeasonalNaive(), ETS()] + ([ARIMA()] if arima else []) + [zero_shot]
    if finetune:
        forecasters.append(Finetuned(str(model), out / "finetune", finetune_steps, full, num_samples, seed, device))
    data = {name: (s.values, s.season) for name, s in series.items()}
    horizons = {name: horizon or default_horizon(s.season) for name, s in series.items()}
    result = backtest(data, forecasters, horizons, windows=windows, min_context=32)
    result.to_json(out / "backtest.json")
    result.to_csv(out / "backtest.csv")
    result.plot(out / "relative.png")
    return result


def wins(result: BacktestResult, model: str, against: str, metric: str = "mase") -> tuple[int, int]:
    """(series where `model`'s error is below `against`'s, series where both were scored)."""
    scores: dict[str, dict[str, float]] = {}
    for row in result.rows:
        scores.setdefault(row["series"], {})[row["model"]] = row[metric]
    pairs = [(s[model], s[against]) for s in scores.values() if model in s and against in s
             and np.isfinite(s[model]) and np.isfinite(s[against])]
    return sum(a < b for a, b in pairs), len(pairs)

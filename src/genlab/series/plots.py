"""Fan charts of probabilistic forecasts and plots of generated paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genlab.fsutil import save_figure
from genlab.series.backtest import QUANTILES, Forecast


def _axes(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def fan_chart(history_x, history: np.ndarray, future_x, forecast: Forecast, png: str | Path, title: str,
              actual: np.ndarray | None = None) -> Path:
    """The recent history, the median forecast and nested 80/60/40/20% bands (10-90 ... 40-60)."""
    fig, ax = _axes(title)
    ax.plot(history_x, history, color="black", lw=1, label="history")
    q = forecast.quantiles
    for k in range(len(QUANTILES) // 2):  # outermost band first, lightest
        lo, hi = QUANTILES[k], QUANTILES[-1 - k]
        ax.fill_between(future_x, q[k], q[-1 - k], color="#1565c0", alpha=0.15 + 0.1 * k, lw=0,
                        label=f"{lo:.0%}-{hi:.0%}")
    ax.plot(future_x, forecast.median, color="#0d47a1", lw=1.5, label="median")
    if actual is not None:
        ax.plot(future_x, actual, color="#c62828", lw=1, ls="--", label="actual")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return save_figure(fig, png)


def paths_chart(history_x, history: np.ndarray, future_x, paths: np.ndarray, png: str | Path, title: str) -> Path:
    """The context and a few generated continuations."""
    fig, ax = _axes(title)
    ax.plot(history_x, history, color="black", lw=1, label="context")
    for i, path in enumerate(paths[:8]):
        ax.plot(future_x, path, lw=1, alpha=0.8, label="generated" if i == 0 else None)
    ax.legend(fontsize=7, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return save_figure(fig, png)

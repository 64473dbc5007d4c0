"""Metrics as JSONL (one object per logged step) and the PNG of the loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from genlab.fsutil import atomic_write_text, save_figure


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # a killed run may have logged past its last checkpoint: those steps are re-run
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_curves(records: list[dict], png: Path, title: str = "training", ylabel: str = "cross-entropy (nats/token)",
                x: str = "tokens", train: tuple[str, str] = ("loss", "train loss"),
                val: tuple[str, str] = ("val_loss", "validation loss"), log_y: bool = False) -> Path:
    """A train curve and a validation curve from metric records: `x` is the record key on the
    x axis ("tokens" or "step"); `train` and `val` are (record key, legend label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (key, label), style in ((train, dict(alpha=0.8)), (val, dict(marker="o"))):
        points = [(r[x], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="tokens seen" if x == "tokens" else x, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png)

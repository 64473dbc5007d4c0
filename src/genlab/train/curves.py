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


def plot_curves(records: list[dict], png: Path, title: str = "training", ylabel: str = "cross-entropy (nats/token)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png)

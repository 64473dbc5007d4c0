"""Held-out loss and perplexity of a model on a dataset of rows (train/batches.py)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch


def batches(n_rows: int, batch_size: int, max_batches: int | None = None) -> list[np.ndarray]:
    """Row indices of consecutive batches: the first `max_batches` (all when None)."""
    limit = n_rows if max_batches is None else min(n_rows, max_batches * batch_size)
    return [np.arange(i, min(i + batch_size, limit)) for i in range(0, limit, batch_size)]


def batch_loss(forward, data, rows: np.ndarray, device, autocast=None) -> float:
    """The mean loss of one batch of `data` (forward(**batch) returns it)."""
    batch = {k: t.to(device) for k, t in data.get(rows).items()}
    with autocast or nullcontext():
        return forward(**batch).item()


@torch.no_grad()
def perplexity(forward, data, batch_size: int = 8, max_batches: int | None = None, device="cpu") -> dict:
    """Mean loss over the batches (weighted by rows) and its exponential."""
    total, rows = 0.0, 0
    for idx in batches(len(data), batch_size, max_batches):
        total += batch_loss(forward, data, idx, device) * len(idx)
        rows += len(idx)
    loss = total / max(rows, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "rows": rows}

"""Training datasets: indexable collections of fixed-length rows, each batch a dict of tensors
that the model's forward takes as keyword arguments (`input_ids`, `targets`, and for packed
examples `positions` and `mask`). -100 in `targets` means "no loss here".
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

IGNORE = -100


class TokenWindows:
    """A token stream cut into fixed-length training windows (packing: documents back to back,
    separated by their bos/eos tokens). Window w covers tokens [w*T, w*T + T + 1)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def get(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        t = self.seq_len
        rows = np.stack([np.asarray(self.tokens[w * t : w * t + t + 1], dtype=np.int64) for w in windows])
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of items grouped into bins of `capacity`: first-fit decreasing (dense rows), each
    bin's items in their original order. Every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))  # the fullest bin that still has room
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]


class PackedExamples:
    """Supervised examples packed several to a row without cross-contamination.

    Example = token ids + a boolean label mask (which tokens carry loss). An example of n tokens
    gives n - 1 (input, target) positions; its targets are -100 where the mask is off. Within a
    row each example restarts its RoPE positions at 0 and attends only to itself (a
    block-diagonal causal mask), so a row computes exactly what the examples would one by one.
    """

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int):
        self.seq_len = seq_len
        lengths = [len(ids) - 1 for ids, _ in examples]
        if any(n < 1 or n > seq_len for n in lengths):
            raise ValueError(f"every example needs 2 to {seq_len + 1} tokens")
        rows = pack_first_fit(lengths, seq_len)
        r, t = len(rows), seq_len
        self.input_ids = np.zeros((r, t), dtype=np.int64)
        self.targets = np.full((r, t), IGNORE, dtype=np.int64)
        self.positions = np.zeros((r, t), dtype=np.int64)
        self.segments = np.full((r, t), -1, dtype=np.int32)  # -1: padding
        for row, members in enumerate(rows):
            start = 0
            for seg, i in enumerate(members):
                ids, labels = examples[i]
                n = len(ids) - 1
                span = slice(start, start + n)
                self.input_ids[row, span] = ids[:-1]
                self.targets[row, span] = np.where(labels[1:], ids[1:], IGNORE)
                self.positions[row, span] = np.arange(n)
                self.segments[row, span] = seg
                start += n
        self.examples = len(examples)
        self.supervised = int((self.targets != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.input_ids)

    def get(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        seg = torch.from_numpy(self.segments[rows])
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, T, T]; padding attends to padding
        return {"input_ids": torch.from_numpy(self.input_ids[rows]), "targets": torch.from_numpy(self.targets[rows]),
                "positions": torch.from_numpy(self.positions[rows]), "mask": mask[:, None]}

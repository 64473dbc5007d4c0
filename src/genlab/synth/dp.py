"""Differentially private training of a table model (DP-SGD), one table row = one privacy unit.

A row (a person) reaches the model as several token sequences (its `permutations` column
orders), so DP-SGD's "example" is the row: each step samples rows independently with rate
q = expected_batch_rows / rows (Poisson sampling, which the accountant's amplification bound
assumes), computes each sampled row's gradient over all its sequences, clips that one vector
to L2 norm C, sums, adds Gaussian noise N(0, (sigma C)^2) to every coordinate and divides by the
expected batch size (Opacus's convention) before an AdamW step (post-processing, so free).

Per-row gradients come from `torch.func`: `vmap(grad(row_loss))` over rows, each row a small
[sequences, tokens] batch for `functional_call` on the unchanged model. Measured on one CPU
thread ("1m" preset, 0.45M parameters; rows of 3 orders x ~55 tokens; batches of 64 rows) a
DP step, clipping, noise and AdamW included, runs at ~75% of a plain step's rows/s (~108 vs
~142). The alternatives computed the same per-row gradients slower than vmap: Opacus's
GradSampleModule hooks at ~0.7x its speed, a backward pass per row at ~0.6-0.8x.

The noise multiplier sigma is the smallest one (to 1%) whose accounted epsilon after `steps`
steps is <= the target: Opacus's accountants, RDP (Mironov 2017; Mironov, Talwar, Zhang 2019,
with the tighter RDP -> (eps, delta) conversion of Balle et al. 2020) or PRV (Gopi, Lee, Wutschitz
2021, tighter still). The noise is drawn with torch's (non-cryptographic) generator, as in
Opacus without `secure_mode`. The per-step training losses returned and logged are read from the
private rows and are not covered by the guarantee; only the trained weights are.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from genlab.errors import InvalidParameterError

IGNORE = -100
# RDP orders: Opacus's defaults plus larger ones, which small-epsilon-per-step runs need (Opacus
# warns "optimal order is the largest alpha" otherwise); more orders can only tighten the bound.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 512, 1024]


@dataclass
class DPConfig:
    epsilon: float  # target privacy budget for the whole run
    delta: float | None = None  # None -> 1 / (10 * rows); must be < 1 / rows
    max_grad_norm: float = 1.0  # C: each row's whole gradient is clipped to this L2 norm
    expected_batch_rows: int = 64  # Poisson sampling rate q = this / rows
    accountant: str = "rdp"  # "rdp" or "prv" (tighter epsilon, slower: seconds per search)
    chunk_rows: int = 32  # rows whose per-row gradients are held in memory at once

    def resolve_delta(self, rows: int) -> float:
        """Check every field against a table of `rows` rows; the delta to use."""
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise InvalidParameterError(f"dp epsilon must be a finite number > 0 (got {self.epsilon!r})")
        if rows < 2:
            raise InvalidParameterError(f"differentially private training needs at least 2 rows (got {rows})")
        delta = 1.0 / (10 * rows) if self.delta is None else self.delta
        if not 0 < delta < 1.0 / rows:
            # delta is the chance that the guarantee fails outright; at >= 1/rows a mechanism that
            # publishes one random person's row verbatim would still qualify.
            raise InvalidParameterError(f"dp delta must be in (0, 1/rows) = (0, {1.0 / rows:.3g}) for {rows:,} rows "
                                        f"(got {delta!r}); the usual choice is 1/(10 x rows) = {1.0 / (10 * rows):.3g}")
        if not self.max_grad_norm > 0:
            raise InvalidParameterError(f"dp max_grad_norm must be > 0 (got {self.max_grad_norm!r})")
        if self.expected_batch_rows < 1 or self.chunk_rows < 1:
            raise InvalidParameterError("dp expected_batch_rows and chunk_rows must be >= 1")
        if self.accountant not in ("rdp", "prv"):
            raise InvalidParameterError(f"dp accountant must be 'rdp' or 'prv' (got {self.accountant!r})")
        return delta


@dataclass
class DPResult:
    epsilon_spent: float  # accounted epsilon of the steps actually run (<= the target)
    epsilon_target: float
    delta: float
    noise_multiplier: float  # sigma: noise std / max_grad_norm
    sample_rate: float  # q
    steps: int
    max_grad_norm: float
    rows: int
    accountant: str
    clipped_fraction: float  # share of sampled rows whose gradient was clipped (C is too low if ~1)
    seconds: float
    rows_per_second: float
    losses: list[float] = field(default_factory=list, repr=False)  # per step (nan: no row sampled)

    def to_dict(self) -> dict:
        """What the model folder records (genlab.json), without the loss curve."""
        out = asdict(self)
        out.pop("losses")
        return {"mechanism": "DP-SGD (Poisson-sampled Gaussian), unit = one table row", **out}


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps at (sample_rate, noise_multiplier)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    eps = acc.get_epsilon(delta=delta, alphas=RDP_ORDERS) if accountant == "rdp" else acc.get_epsilon(delta=delta)
    return max(0.0, float(eps))  # the tight RDP conversion dips below 0 for huge noise: that is (0, delta)-DP


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest sigma (to within 1% of epsilon) whose spent epsilon after `steps` is <= `epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    kwargs = {"alphas": RDP_ORDERS} if accountant == "rdp" else {}
    try:
        with warnings.catch_warnings():  # the search visits large sigmas, where the optimal order is the largest
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant,
                                              epsilon_tolerance=min(0.01, 0.01 * epsilon), **kwargs))
    except ValueError:  # Opacus: "The privacy budget is too low." (sigma would exceed 1e6)
        raise InvalidParameterError(f"dp epsilon {epsilon} is unreachable for {steps} steps at sampling rate "
                                    f"{sample_rate:.3g}: use fewer steps or a larger epsilon") from None


def pad_rows(rows: list[list[np.ndarray]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of id sequences -> inputs and next-token targets [rows, sequences, tokens - 1].

    Sequences are right-padded (PAD id 0, target -100); causal attention means padding never
    changes a real position's output. A row with fewer sequences gets all-padding ones."""
    n_seq = max(len(r) for r in rows)
    width = max(1, max(len(s) for r in rows for s in r) - 1)
    ids = np.zeros((len(rows), n_seq, width), dtype=np.int64)
    targets = np.full((len(rows), n_seq, width), IGNORE, dtype=np.int64)
    for i, row in enumerate(rows):
        for j, seq in enumerate(row):
            n = len(seq) - 1
            ids[i, j, :n], targets[i, j, :n] = seq[:-1], seq[1:]
    return torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device)


def per_row_gradients(module: torch.nn.Module, params: dict, frozen: dict, ids: torch.Tensor,
                      targets: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Each row's gradient of its loss (mean cross-entropy over all its tokens): {name: [rows, *shape]},
    and the losses [rows]. `module(ids)` must return logits [B, T, V]."""

    def row_loss(p, row_ids, row_targets):
        logits = functional_call(module, (p, frozen), (row_ids,))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), row_targets.flatten(), ignore_index=IGNORE, reduction="sum")
        loss = ce / (row_targets != IGNORE).sum().clamp_min(1)
        return loss, loss.detach()

    with warnings.catch_warnings():  # torch has no vmap rule for CPU flash attention; its per-row fallback is fine
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return vmap(grad(row_loss, has_aux=True), in_dims=(None, 0, 0))(params, ids, targets)


def clip_and_sum(grads: dict, max_grad_norm: float) -> tuple[dict, torch.Tensor]:
    """Sum of the per-row gradients, each scaled to L2 norm <= max_grad_norm over *all* parameters
    (one row moves the sum by at most C); also the rows' norms before clipping."""
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1).float(), dim=1)
                                                  for g in grads.values()]), dim=0)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: (factor.to(g.dtype) @ g.flatten(1)).view(g.shape[1:]) for k, g in grads.items()}, norms


def add_noise(summed: dict, noise_multiplier: float, max_grad_norm: float, expected_rows: float,
              generator: torch.Generator) -> dict:
    """(sum of clipped gradients + N(0, (sigma C)^2) per coordinate) / expected batch rows."""
    std = noise_multiplier * max_grad_norm
    return {k: (s + std * torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)) / expected_rows
            for k, s in summed.items()}


def train_dp(module: torch.nn.Module, row_examples: list[list[np.ndarray]], cfg: DPConfig, steps: int, lr: float,
             seed: int = 0, *, warmup_steps: int = 0, min_lr_ratio: float = 0.1, weight_decay: float = 0.0,
             betas: tuple[float, float] = (0.9, 0.95), log: Callable[[str], None] | None = print, log_every: int = 50,
             on_step: Callable[[int, float, int], None] | None = None) -> DPResult:
    """Train `module` in place with DP-SGD on `row_examples` (per table row: its token id sequences).

    `module(ids)` returns logits [B, T, V] (genlab's Transformer, not packed for inference). The
    learning rate warms up linearly for `warmup_steps`, then decays by a cosine to
    `min_lr_ratio * lr` (as genlab's Trainer). `on_step(step, loss, rows_sampled)` runs after every
    step (progress bars, JSONL); `log` gets a line every `log_every` steps.
    """
    n = len(row_examples)
    delta = cfg.resolve_delta(n)
    if steps < 1 or not lr > 0:
        raise InvalidParameterError(f"dp training needs steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    if any(len(r) == 0 or min(len(s) for s in r) < 2 for r in row_examples):
        raise InvalidParameterError("every row needs at least one token sequence of >= 2 ids")
    if getattr(module, "head", None) is not None:
        raise InvalidParameterError("the model is packed for inference; call module.unpack() before training")
    sample_rate = min(1.0, cfg.expected_batch_rows / n)
    expected_rows = sample_rate * n
    sigma = noise_multiplier_for(cfg.epsilon, delta, sample_rate, steps, cfg.accountant)
    if log:
        log(f"DP-SGD: epsilon {cfg.epsilon} at delta {delta:.3g} over {steps} steps of ~{expected_rows:.0f} rows "
            f"(q = {sample_rate:.4g}) -> noise multiplier {sigma:.4g}, clip {cfg.max_grad_norm} per row ({cfg.accountant})")

    device = next(module.parameters()).device
    module.train()
    params = {k: p for k, p in module.named_parameters() if p.requires_grad}  # tied weights appear once
    frozen = {k: p.detach() for k, p in module.named_parameters() if not p.requires_grad}
    frozen.update(module.named_buffers())
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    rng = np.random.default_rng(seed)  # which rows each step samples
    noise = torch.Generator(device=device).manual_seed(seed)
    losses, clipped, sampled_total, start = [], 0, 0, time.perf_counter()
    for step in range(steps):
        if step < warmup_steps:
            rate = (step + 1) / warmup_steps
        else:
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            rate = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * rate
        chosen = np.flatnonzero(rng.random(n) < sample_rate)  # Poisson sampling: the batch may be empty
        summed = {k: torch.zeros_like(p) for k, p in params.items()}
        loss_sum, detached = 0.0, {k: p.detach() for k, p in params.items()}
        for at in range(0, len(chosen), cfg.chunk_rows):
            ids, targets = pad_rows([row_examples[i] for i in chosen[at : at + cfg.chunk_rows]], device)
            grads, row_losses = per_row_gradients(module, detached, frozen, ids, targets)
            part, norms = clip_and_sum(grads, cfg.max_grad_norm)
            for k in summed:
                summed[k] += part[k]
            loss_sum += float(row_losses.sum())
            clipped += int((norms > cfg.max_grad_norm).sum())
        # Noise is added even to an empty batch: the accountant counts every step.
        for k, g in add_noise(summed, sigma, cfg.max_grad_norm, expected_rows, noise).items():
            params[k].grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sampled_total += len(chosen)
        losses.append(loss_sum / len(chosen) if len(chosen) else math.nan)
        if on_step:
            on_step(step + 1, losses[-1], len(chosen))
        if log and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = [x for x in losses[-log_every:] if not math.isnan(x)]
            log(f"dp step {step + 1}/{steps}: loss {np.mean(recent) if recent else math.nan:.4f} (non-private), "
                f"{sampled_total / (time.perf_counter() - start):.1f} rows/s")
    seconds = time.perf_counter() - start
    spent = epsilon_spent(sigma, sample_rate, steps, delta, cfg.accountant)
    return DPResult(spent, cfg.epsilon, delta, sigma, sample_rate, steps, cfg.max_grad_norm, n, cfg.accountant,
                    clipped / max(1, sampled_total), seconds, sampled_total / max(seconds, 1e-9), losses)

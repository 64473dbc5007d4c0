"""The training loop, shared by pretraining and fine-tuning.

AdamW (fused where available) with linear warmup + cosine decay, gradient accumulation and
clipping, bf16 autocast on GPU, optional torch.compile, periodic validation, a progress bar,
JSONL metrics, a loss plot, and atomic checkpoints from which a killed run resumes onto the same
loss curve: the data order is a pure function of (seed, step), so restoring model, optimizer
and step restores everything.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genlab.errors import GenlabError
from genlab.evaluate.perplexity import batch_loss, batches
from genlab.train.batches import PackedExamples, TokenWindows
from genlab.train.checkpoint import list_checkpoints, load_checkpoint, read_trainer_state, save_checkpoint
from genlab.train.config import TrainConfig
from genlab.train.curves import MetricsLog, plot_curves
from genlab.train.distributed import Dist, wrap

Dataset = TokenWindows | PackedExamples


class Sampler:
    """Which windows each process reads at each step: a fresh permutation per epoch, seeded.

    Global step s reads the global batch [s*G, (s+1)*G) of the epoch-concatenated order, G =
    batch * accumulation * processes; micro-step m of rank r reads slice (m*world + r). So one
    process with accumulation k sees exactly the samples of k processes without it.
    """

    def __init__(self, n_windows: int, batch: int, accum: int, d: Dist, seed: int):
        self.n, self.batch, self.accum, self.d, self.seed = n_windows, batch, accum, d, seed
        self.global_batch = batch * accum * d.world
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.n))
        return self._perm[1]

    def windows(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch + (micro * self.d.world + self.d.rank) * self.batch
        idx = np.arange(start, start + self.batch)
        return np.array([self._order(i // self.n)[i % self.n] for i in idx])


def lr_at(step: int, cfg: TrainConfig, time_done: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr. The decay's progress is the share of
    max_steps done after warm-up, or, with cfg.time_schedule, the larger of that and `time_done`
    (the share of max_minutes used), so a time-budgeted run ends at the bottom of the schedule
    whatever the machine's speed."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.time_schedule:
        progress = max(progress, time_done)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = not cfg.fsdp and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


@dataclass
class Result:
    step: int
    tokens: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_s: float


class Trainer:
    """Trains `module` (whose forward(**batch) returns the loss) on a dataset of rows
    (train/batches.py: TokenWindows for text, PackedExamples for supervised examples)."""

    def __init__(self, cfg: TrainConfig, module: torch.nn.Module, train: Dataset, val: Dataset,
                 out: Path, d: Dist, fingerprint: dict, console: Console | None = None, keep_frozen: bool = True):
        for name, data in (("training data", train), ("validation split", val)):
            if len(data) < 1:
                size = f"{len(data.tokens):,} tokens" if isinstance(data, TokenWindows) else "no examples"
                raise GenlabError(f"the {name} has {size}; one sequence needs {cfg.seq_len + 1} tokens "
                                  "(lower seq_len, raise val_fraction or add data)")
        self.cfg, self.out, self.d, self.fingerprint = cfg, Path(out), d, fingerprint
        self.console = console or Console(stderr=True)
        self.raw = module.to(d.device)
        self.model = wrap(self.raw, d, cfg.fsdp)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = make_optimizer(self.model, cfg, d.device)
        self.train_set, self.val_set = train, val
        self.sampler = Sampler(len(train), cfg.batch_size, cfg.grad_accum, d, cfg.seed)
        self.time_done = 0.0  # share of max_minutes used so far (updated at each log step)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" and cfg.bf16
                         else nullcontext())
        self.ckpt_dir = self.out / "checkpoints"
        # LoRA: checkpoints hold the trainable parameters only (the frozen base is the model folder).
        self.saved = None if keep_frozen else {n for n, p in self.raw.named_parameters() if p.requires_grad}

    def begin(self, resume: bool) -> tuple[int, float]:
        """(first step, validation loss before training — NaN when resuming); restores the newest
        checkpoint when resuming and writes the run's config.yaml (main process)."""
        start = self.resume_step() if resume else 0
        if self.d.is_main:
            self.cfg.save(self.out / "config.yaml")
        return start, (self.evaluate() if not resume else float("nan"))

    # --- resume --------------------------------------------------------------------------
    def resume_step(self) -> int:
        """Restore the newest checkpoint; its step (0 when starting fresh). A checkpoint of
        another configuration is refused before anything is loaded or written."""
        found = list_checkpoints(self.ckpt_dir)
        if not found:
            return 0
        theirs = read_trainer_state(found[-1]).get("fingerprint", {})
        diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
        if diff:
            raise GenlabError(f"{found[-1]}: checkpoint is from a different configuration ({', '.join(diff)} "
                              "differ); nothing was changed — use another --out or the original settings")
        state = load_checkpoint(found[-1], self.model, self.optimizer, strict=self.saved is None)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        return state["step"]

    # --- one step ------------------------------------------------------------------------
    def _train_step(self, step: int) -> tuple[float, float]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, self.time_done)
        total = torch.zeros((), device=self.d.device)
        for micro in range(cfg.grad_accum):
            batch = self.train_set.get(self.sampler.windows(step, micro))
            batch = {k: t.to(self.d.device, non_blocking=True) for k, t in batch.items()}
            sync = micro == cfg.grad_accum - 1 or not hasattr(self.model, "no_sync")
            with (nullcontext() if sync else self.model.no_sync()), self.autocast:
                loss = self.forward(**batch)
            (loss / cfg.grad_accum).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return (total / cfg.grad_accum).item(), float(norm)

    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None) -> float:
        """Mean loss on (the first eval_batches batches of) `data`, by default the validation split."""
        data = self.val_set if data is None else data
        self.model.eval()
        todo = batches(len(data), self.cfg.batch_size, self.cfg.eval_batches)
        loss_sum, count = 0.0, 0
        mine = todo[self.d.rank :: self.d.world]
        # Every process runs the same number of forward passes: under FSDP each is a collective.
        for i in range(math.ceil(len(todo) / self.d.world)):
            rows = mine[i] if i < len(mine) else todo[0]
            loss = batch_loss(self.forward, data, rows, self.d.device, self.autocast)
            if i < len(mine):
                loss_sum, count = loss_sum + loss * len(rows), count + len(rows)
        self.model.train()
        loss_sum, count = self.d.all_sum([loss_sum, count])
        return loss_sum / max(count, 1)

    @torch.no_grad()
    def replicas_in_sync(self) -> bool | None:
        """Data-parallel check: every process holds bit-identical parameters (None if not DDP)."""
        if self.d.world == 1 or self.cfg.fsdp:
            return None
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.raw.parameters()])
        mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device).double()).sum()])
        everyone = [torch.zeros_like(mine) for _ in range(self.d.world)]
        torch.distributed.all_gather(everyone, mine)
        return all(torch.equal(everyone[0], other) for other in everyone[1:])

    def _checkpoint(self, step: int, tokens: int) -> None:
        state = {"step": step, "tokens": tokens, "fingerprint": self.fingerprint,
                 "data_position": step * self.sampler.global_batch, "torch_rng": torch.get_rng_state().tolist()}
        save_checkpoint(self.ckpt_dir, self.model, self.optimizer, state, self.cfg.keep_checkpoints, self.d.is_main,
                        only=self.saved)

    # --- the loop ------------------------------------------------------------------------
    def run(self, start_step: int = 0, initial_val_loss: float | None = None) -> Result:
        """Train from `start_step` (as returned by resume_step(); 0 for a new run)."""
        cfg, d = self.cfg, self.d
        resume = start_step > 0
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=start_step if resume else None) if d.is_main else None
        if log and initial_val_loss is not None and not resume:
            log.write({"step": 0, "tokens": 0, "val_loss": round(initial_val_loss, 5)})
        tokens_per_step = self.sampler.global_batch * cfg.seq_len
        tokens = start_step * tokens_per_step
        self.model.train()
        t0 = last_t = time.perf_counter()
        last_tokens, train_loss, val_loss = tokens, float("nan"), float("nan")
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.3f} · {task.fields[rate]:,.0f} tok/s"),
                            TimeRemainingColumn(), console=self.console, disable=not d.is_main, transient=False)
        step = start_step
        with progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=start_step, loss=float("nan"), rate=0.0)
            while step < cfg.max_steps:
                try:
                    train_loss, grad_norm = self._train_step(step)
                except torch.OutOfMemoryError:
                    raise GenlabError(f"out of GPU memory at batch_size {cfg.batch_size} x seq_len {cfg.seq_len}; try "
                                      f"--batch-size {max(1, cfg.batch_size // 2)} --grad-accum {cfg.grad_accum * 2}") from None
                step += 1
                tokens += tokens_per_step
                last = step == cfg.max_steps
                if step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    rate = (tokens - last_tokens) / max(now - last_t, 1e-9)
                    (train_loss,) = d.all_mean([train_loss])
                    if cfg.max_minutes:  # the same clock on every process
                        (self.time_done,) = d.all_mean([(now - t0) / (60 * cfg.max_minutes)])
                        last = last or self.time_done > 1  # out of time: finish like a completed run
                    record = {"step": step, "tokens": tokens, "loss": round(train_loss, 5),
                              "lr": lr_at(step - 1, cfg, self.time_done),
                              "grad_norm": round(grad_norm, 4), "tokens_per_s": round(rate, 1), "elapsed_s": round(now - t0, 2)}
                    if log:
                        log.write(record)
                    last_t, last_tokens = now, tokens
                    progress.update(task, loss=train_loss, rate=rate)
                if step % cfg.eval_every == 0 or last:
                    val_loss = self.evaluate()
                    if log:
                        log.write({"step": step, "tokens": tokens, "val_loss": round(val_loss, 5),
                                   "val_ppl": round(math.exp(min(val_loss, 50)), 3)})
                        plot_curves(log.records(), self.out / "loss.png", f"{self.out.name}")
                if step % cfg.checkpoint_every == 0 or last:
                    self._checkpoint(step, tokens)
                progress.update(task, completed=step)
                if last:
                    break
        seconds = time.perf_counter() - t0
        return Result(step, tokens, train_loss, val_loss, seconds, (tokens - start_step * tokens_per_step) / max(seconds, 1e-9))

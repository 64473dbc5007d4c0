"""Training configuration: one dataclass, from a YAML file and/or flags; saved beside the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from genlab.errors import InvalidParameterError
from genlab.fsutil import atomic_write_text


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)  # files / folders; empty = the bundled Python docs
    out: str = "runs/pretrain"
    field: str = "text"  # JSONL field / CSV or Parquet column
    glob: str = "**/*"
    val_fraction: float = 0.05
    min_chars: int = 1
    max_chars: int | None = None
    near_dedup: float | None = None  # MinHash Jaccard threshold, e.g. 0.8; None = off
    # model
    preset: str = "2m"
    tokenizer: str | None = None  # a tokenizer folder; None = train one on the data
    vocab_size: int = 4096
    seq_len: int = 256
    # optimisation
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None  # stop early (cleanly, with a checkpoint) after this long
    # with max_minutes: the cosine decay ends when the time does (train/loop.lr_at); like max_minutes,
    # the clock starts again on --resume (the schedule then follows the larger of the two progresses)
    time_schedule: bool = False
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    samples: int = 2  # text samples printed after training
    # engine
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast on GPU (never on CPU, where it is slower)
    compile: bool = False
    fsdp: bool = False  # shard parameters across processes (torchrun) instead of replicating them

    def __post_init__(self):
        checks = [
            (self.seq_len >= 8, "seq_len must be >= 8"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be > 0 and min_lr_ratio in [0, 1]"),
            (0 < self.val_fraction < 0.5, "val_fraction must be in (0, 0.5)"),
            (self.warmup_steps >= 0 and self.eval_every >= 1 and self.log_every >= 1, "step intervals must be >= 1"),
            (self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoint_every and keep_checkpoints must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0"),
            (not self.time_schedule or self.max_minutes, "time_schedule needs max_minutes"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidParameterError(f"invalid training config: {message}")
        self.data = [str(d) for d in self.data]

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "TrainConfig":
        """Defaults <- YAML file <- overrides (flags). Unknown keys are an error naming the key."""
        values = {}
        if path is not None:
            try:
                values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise InvalidParameterError(f"{path}: cannot read config ({e})") from None
            if not isinstance(values, dict):
                raise InvalidParameterError(f"{path}: the config must be a mapping of field: value")
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameterError(f"{path or 'config'}: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

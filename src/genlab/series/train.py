"""`genlab series pretrain` and `genlab series finetune`: series as token sequences, trained by
the same loop, checkpoints and model folders as text.

A training example is a window of a series: scaled by the mean absolute value of its context
part (everything but the last `prediction_length` values, as at forecast time), quantised by the
series codec, loss on every value token (missing values are inputs, never targets). Windows of
different lengths are packed several to a row without seeing each other (the SFT packing), so
the model learns from short contexts too, each starting at position 0 as at forecast time.

Pretraining data needs no download: KernelSynth series plus TSMixup of the statsmodels series,
of which only the first `1 - holdout_fraction` is used (the backtests evaluate on the rest).
Fine-tuning adapts a series model to the user's own series, with LoRA or fully.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from genlab.codecs.series import MISSING, SPECIAL, SeriesCodec
from genlab.data.synth_series import bundled_series, kernel_synth, ts_mixup
from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import write_json
from genlab.model import adapters, io
from genlab.model.presets import preset
from genlab.model.transformer import Transformer
from genlab.train import distributed
from genlab.train.batches import PackedExamples
from genlab.train.config import TrainConfig
from genlab.train.loop import Result, Trainer

MIN_WINDOW = 16  # the shortest training window, in values


@dataclass
class SeriesTrainConfig(TrainConfig):
    out: str = "runs/series"
    preset: str = "1m"
    bins: int = 4096  # codec bins (the model's vocabulary is bins + 3 special tokens)
    low: float = -15.0  # scaled values outside [low, high] land in the outer bins
    high: float = 15.0
    seq_len: int = 256  # values per training window (context + prediction)
    prediction_length: int = 64  # the scale comes from the window minus its last part this long
    synthetic: int = 3000  # KernelSynth series
    mixup: int = 1500  # TSMixup windows of the bundled statsmodels series
    holdout_fraction: float = 0.2  # the end of every bundled series, never trained on
    missing_rate: float = 0.05  # share of windows given a run of missing values
    max_window_fraction: float = 1.0  # a training window covers at most this share of its series
    smooth_init: bool = True  # bin embeddings start as a smooth function of the bin's value
    # Subtract the context's mean before the codec's mean-absolute scaling. Pure mean scaling
    # (Chronos, the default) keeps zeros exact but leaves a series with a high level and small
    # swings (CO2 at 370 ppm moving by a few ppm) in two or three bins; centred, the swings span
    # the bins. Measured on the bundled backtests at 600 CPU steps, centring scored worse
    # (relative MASE 0.63 vs 0.57), CO2 included, so it is an option, not the default.
    center: bool = False
    columns: list[str] | None = None  # columns of the `data` files (default: every numeric one)
    timestamp: str | None = None  # timestamp column of the `data` files (default: detected)
    lr: float = 2e-3
    warmup_steps: int = 30
    max_steps: int = 600
    batch_size: int = 16
    eval_every: int = 100
    checkpoint_every: int = 200
    samples: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.prediction_length < self.seq_len:
            raise InvalidParameterError("prediction_length must be in (0, seq_len)")
        if self.synthetic < 0 or self.mixup < 0 or not 0 <= self.holdout_fraction < 1 or not 0 <= self.missing_rate <= 1:
            raise InvalidParameterError("synthetic and mixup must be >= 0, holdout_fraction in [0, 1), "
                                        "missing_rate in [0, 1]")
        self.codec()  # validates bins / low / high

    def codec(self) -> SeriesCodec:
        return SeriesCodec(self.bins, self.low, self.high)


@dataclass
class SeriesFinetuneConfig(SeriesTrainConfig):
    model: str = ""  # the series model folder to adapt
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    out: str = "runs/series-finetune"
    # replay against forgetting: pretraining-style series mixed in, one window each (measured on
    # the bundled backtests: without it, fine-tuning on one short trending series overfits badly)
    synthetic: int = 300
    mixup: int = 150
    max_window_fraction: float = 0.75
    windows: int = 0  # training windows drawn from the user's series (0: enough to cover each ~8 times)
    lr: float = 0.0  # 0: 1e-3 for LoRA, 3e-4 for full fine-tuning
    max_steps: int = 100
    batch_size: int = 8
    warmup_steps: int = 10
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    eval_every: int = 50
    checkpoint_every: int = 100

    def __post_init__(self):
        if not self.lr:
            self.lr = 3e-4 if self.full else 1e-3
        super().__post_init__()
        if not self.model:
            raise InvalidParameterError("no series model given to fine-tune (a `genlab series pretrain` model folder)")


@dataclass
class SeriesRunResult:
    out: Path
    output_dir: Path  # model/ (pretraining, full fine-tuning) or adapter/ (LoRA)
    result: Result
    val_loss_before: float
    data: dict = field(default_factory=dict)


def window_examples(series: list[np.ndarray], codec: SeriesCodec, seq_len: int, prediction_length: int,
                    per_series: int, rng: np.random.Generator, missing_rate: float = 0.0,
                    full_share: float = 0.7, max_fraction: float = 1.0,
                    center: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token examples (ids, loss mask): `per_series` random windows of each series, most of them
    as long as allowed (the rest shorter), scaled by their context part (after subtracting the
    context's mean when `center`: see SeriesTrainConfig.center). A window is at most
    `seq_len` values and `max_fraction` of its series (so a short series still gives windows
    that start at different places, instead of itself over and over)."""
    out = []
    for s in series:
        s = np.asarray(s, dtype=np.float64)
        n = len(s)
        if n < MIN_WINDOW:
            continue
        longest = max(MIN_WINDOW, min(seq_len, int(n * max_fraction)))
        for _ in range(per_series):
            length = longest if rng.random() < full_share else int(rng.integers(MIN_WINDOW, longest + 1))
            start = int(rng.integers(0, n - length + 1))
            x = s[start:start + length].copy()
            if missing_rate and rng.random() < missing_rate:
                run = int(rng.integers(1, max(2, length // 8)))
                at = int(rng.integers(0, length - run + 1))
                x[at:at + run] = np.nan
            context = x[: length - min(prediction_length, length // 4)]
            if not np.isfinite(context).any():
                continue
            loc = float(np.nanmean(context)) if center else 0.0
            ids, _ = codec.encode(x - loc, codec.scale_of(context - loc))
            out.append((ids, ids != MISSING))
    return out


def smooth_value_embeddings(module: Transformer, codec: SeriesCodec, seed: int, std: float = 0.02) -> None:
    """Start each bin's embedding as random Fourier features of its value (frequencies spread
    log-uniformly from coarse to finer than a bin), so neighbouring bins start alike and what the
    model learns about one value carries over to its neighbours; with tied embeddings the output
    head starts smooth too. The special tokens keep their random rows."""
    emb = module.model.embed_tokens.weight
    d = emb.shape[1]
    g = torch.Generator().manual_seed(seed)
    freqs = torch.exp(torch.empty(d // 2).uniform_(np.log(0.1), np.log(4 / codec.width), generator=g))
    phases = torch.rand(d // 2, generator=g) * 2 * np.pi
    x = torch.as_tensor(codec.centers, dtype=torch.float32)[:, None] * freqs + phases
    features = torch.cat([x.sin(), x.cos()], dim=1)[:, :d] * (std * np.sqrt(2))
    mixing = torch.linalg.qr(torch.randn(d, d, generator=g))[0]  # a random rotation: no axis is special
    with torch.no_grad():
        emb[SPECIAL:SPECIAL + codec.bins] = (features @ mixing).to(emb.dtype)


def _split(examples: list, val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    order = rng.permutation(len(examples))
    n_val = max(1, int(round(len(examples) * val_fraction)))
    if len(examples) < 2:
        raise DataError("too little series data: fewer than 2 training windows (give longer or more series)")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def _file_series(cfg: SeriesTrainConfig, log) -> dict[str, np.ndarray]:
    found = {}
    if not cfg.data:
        return found
    from genlab.series.data import read_series

    for path in cfg.data:
        for s in read_series(path, columns=cfg.columns, timestamp=cfg.timestamp, warn=log):
            found[f"{Path(path).name}:{s.name}"] = s.values
    return found


def pretraining_series(cfg: SeriesTrainConfig, log) -> tuple[list[np.ndarray], dict]:
    """The pretraining corpus: KernelSynth + TSMixup of the head of the bundled series + any files."""
    parts, info = [], {}
    if cfg.synthetic:
        parts += list(kernel_synth(cfg.synthetic, length=cfg.seq_len, seed=cfg.seed))
        info["kernel_synth"] = cfg.synthetic
    if cfg.mixup:
        heads = [s[: int(len(s) * (1 - cfg.holdout_fraction))] for s in bundled_series().values()]
        length = min(cfg.seq_len, min(len(h) for h in heads))  # every bundled series can contribute
        parts += list(ts_mixup(heads, cfg.mixup, length=length, seed=cfg.seed + 1))
        info["ts_mixup"] = {"windows": cfg.mixup, "length": length, "sources": sorted(bundled_series()),
                            "heldout_tail": cfg.holdout_fraction}
    files = _file_series(cfg, log)
    parts += list(files.values())
    if files:
        info["files"] = sorted(files)
    if not parts:
        raise DataError("no pretraining data: synthetic and mixup are 0 and no data files were given")
    return parts, info


def _key(*items) -> str:
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            h.update(np.ascontiguousarray(item).tobytes())
        else:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _datasets(series: list[np.ndarray], cfg: SeriesTrainConfig, per_series: int, replay: list[np.ndarray] = ()):
    """Packed train / validation rows: `per_series` windows of each series, plus one window of
    each `replay` series (pretraining data mixed into a fine-tune against forgetting)."""
    rng = np.random.default_rng(cfg.seed)
    codec = cfg.codec()
    examples = window_examples(series, codec, cfg.seq_len, cfg.prediction_length, per_series, rng, cfg.missing_rate,
                               max_fraction=cfg.max_window_fraction, center=cfg.center)
    examples += window_examples(list(replay), codec, cfg.seq_len, cfg.prediction_length, 1, rng, cfg.missing_rate,
                                center=cfg.center)
    train, val = _split(examples, cfg.val_fraction, rng)
    # an example of n values gives n - 1 next-value predictions: rows hold seq_len - 1 of them
    return PackedExamples(train, cfg.seq_len - 1), PackedExamples(val, cfg.seq_len - 1), len(examples)


def _series_meta(cfg: SeriesTrainConfig, codec: SeriesCodec) -> dict:
    return {"codec": codec.to_dict(), "series": {"context_length": cfg.seq_len - cfg.prediction_length,
                                                 "prediction_length": cfg.prediction_length, "center": cfg.center}}


def pretrain_series(config: SeriesTrainConfig | None = None, config_file: str | Path | None = None, resume: bool = False,
                    console: Console | None = None, **overrides) -> SeriesRunResult:
    """Train a new series model from scratch (no download: synthetic and bundled series)."""
    cfg = config or SeriesTrainConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    d, log, out = distributed.start(cfg, resume, console)
    series, info = pretraining_series(cfg, log)
    train, val, n = _datasets(series, cfg, per_series=1)
    info.update(windows=n, train_rows=len(train), val_rows=len(val), key=_key(*series[:50], len(series), cfg.to_dict()))
    codec = cfg.codec()
    base = preset(cfg.preset)
    model_cfg = replace(base, vocab_size=codec.vocab_size, max_seq_len=cfg.seq_len)  # no untrained positions
    torch.manual_seed(cfg.seed)
    module = Transformer(model_cfg).init_weights(cfg.seed)
    if cfg.smooth_init:
        smooth_value_embeddings(module, codec, cfg.seed)
    log(f"series model {cfg.preset}: {module.num_params() / 1e6:.2f}M parameters, {codec.bins} bins; "
        f"{len(series):,} series -> {n:,} windows of <= {cfg.seq_len} values; {d.world} process(es) on {d.device}")
    fingerprint = {"model": model_cfg.to_dict(), "seq_len": cfg.seq_len, "data": info["key"], "seed": cfg.seed,
                   "global_batch": cfg.batch_size * cfg.grad_accum * d.world}
    trainer = Trainer(cfg, module, train, val, out, d, fingerprint, console)
    start, before = trainer.begin(resume)
    result = trainer.run(start, initial_val_loss=None if resume else before)
    model_dir = out / "model"
    if d.is_main:
        meta = {**_series_meta(cfg, codec), "model_config": model_cfg.to_dict(),
                "provenance": {"created_by": "genlab series pretrain", "config": cfg.to_dict(),
                               "data": {k: v for k, v in info.items() if k != "key"}},
                "metrics": {"val_loss": result.val_loss, "train_loss": result.train_loss, "tokens": result.tokens,
                            "steps": result.step}}
        io.save(model_dir, trainer.raw.eval(), codec, meta=meta, generation={})
        log(f"done: {result.step} steps, {result.tokens:,} tokens in {result.seconds:.0f}s; validation loss "
            f"{before:.3f} -> {result.val_loss:.3f}; series model -> {model_dir}")
    distributed.barrier(d)
    distributed.teardown()
    return SeriesRunResult(out, model_dir, result, before, {k: v for k, v in info.items() if k != "key"})


def finetune_series(config: SeriesFinetuneConfig | None = None, config_file: str | Path | None = None,
                    resume: bool = False, console: Console | None = None, series: dict[str, np.ndarray] | None = None,
                    **overrides) -> SeriesRunResult:
    """Adapt a series model to the user's series (`data` files and/or `series` arrays)."""
    cfg = config or SeriesFinetuneConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    d, log, out = distributed.start(cfg, resume, console)
    loaded = io.load(cfg.model, dtype=torch.float32, device=str(d.device))
    codec = loaded.tokenizer
    if not isinstance(codec, SeriesCodec):
        raise InvalidParameterError(f"{cfg.model}: not a series model (its genlab.json names no series codec)")
    data = {**_file_series(cfg, log), **{k: np.asarray(v, dtype=np.float64) for k, v in (series or {}).items()}}
    if not data:
        raise DataError("nothing to fine-tune on: give series files (--data) or arrays")
    trained = loaded.meta.get("series", {})
    window = trained.get("context_length", 0) + trained.get("prediction_length", 0) or loaded.module.config.max_seq_len
    cfg = replace(cfg, bins=codec.bins, low=codec.low, high=codec.high, seq_len=min(cfg.seq_len, window),
                  center=trained.get("center", False),
                  prediction_length=min(cfg.prediction_length, trained.get("prediction_length", cfg.prediction_length)))
    longest = max(len(v) for v in data.values())
    per_series = max(8, cfg.windows // len(data) if cfg.windows else 8 * max(1, longest // cfg.seq_len))
    replay = pretraining_series(replace(cfg, data=[]), log)[0] if cfg.synthetic or cfg.mixup else []
    train, val, n = _datasets(list(data.values()), cfg, per_series, replay)
    key = _key(*data.values(), cfg.to_dict())
    base = loaded.module
    if cfg.full:
        base.unpack()
        model = base.train().requires_grad_(True)
        method = "full fine-tuning"
    else:
        model = adapters.add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, None, cfg.seed)
        method = f"LoRA r={cfg.lora_r}"
    log(f"fine-tuning {loaded.path} with {method} on {len(data)} series ({n:,} windows of <= {cfg.seq_len} values)")
    fingerprint = {"base": str(Path(loaded.path).resolve()), "method": method, "seq_len": cfg.seq_len, "data": key,
                   "seed": cfg.seed, "global_batch": cfg.batch_size * cfg.grad_accum * d.world}
    trainer = Trainer(cfg, model, train, val, out, d, fingerprint, console, keep_frozen=cfg.full)
    start = trainer.resume_step() if resume else 0
    if d.is_main:
        cfg.save(out / "config.yaml")
    before = trainer.evaluate()
    result = trainer.run(start, initial_val_loss=None if resume else before)
    info = {"series": sorted(data), "windows": n, "lengths": {k: len(v) for k, v in data.items()}}
    output = out / ("model" if cfg.full else "adapter")
    if d.is_main:
        provenance = {"created_by": "genlab series finetune", "base": str(loaded.path), "method": method,
                      "config": cfg.to_dict(), "data": info}
        metrics = {"val_loss_before": before, "val_loss_after": result.val_loss, "steps": result.step}
        if cfg.full:
            meta = {**loaded.meta, "provenance": provenance, "metrics": metrics}
            io.save(output, model.eval(), codec, meta=meta, generation={}, hf_config=loaded.hf_config)
        else:
            adapters.save_adapter(model, output, Path(loaded.path).resolve(), meta={"provenance": provenance,
                                                                                   "metrics": metrics})
        write_json(out / "report.json", {"method": method, "output": str(output), "metrics": metrics, "data": info})
        log(f"done: {result.step} steps in {result.seconds:.0f}s; validation loss {before:.3f} -> "
            f"{result.val_loss:.3f}; {'model' if cfg.full else 'adapter'} -> {output}")
    distributed.barrier(d)
    distributed.teardown()
    return SeriesRunResult(out, output, result, before, info)

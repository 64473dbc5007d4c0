"""`genlab pretrain`: corpus -> tokenizer -> token files -> a new transformer, trained.

The output folder holds `model/` (a genlab / Hugging Face model folder), `tokenizer/`, `data/`
(the tokenized corpus, reused when unchanged), `checkpoints/`, `config.yaml` (the effective
config), `metrics.jsonl` and `loss.png`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file

from genlab.codecs.text import load_tokenizer, stop_token_ids, train_tokenizer
from genlab.data.corpus import python_docs_corpus
from genlab.data.tokens import prepare_tokens
from genlab.model import io
from genlab.model.presets import preset
from genlab.model.transformer import Transformer
from genlab.train import distributed
from genlab.train.checkpoint import list_checkpoints
from genlab.train.config import TrainConfig
from genlab.train.batches import TokenWindows
from genlab.train.loop import Result, Trainer


@dataclass
class PretrainResult:
    out: Path
    model_dir: Path
    result: Result
    first_val_loss: float
    data: dict
    replicas_in_sync: bool | None = None  # DDP: parameters identical on every process


def _tokenizer(cfg: TrainConfig, out: Path, texts, d: distributed.Dist, log):
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    folder = out / "tokenizer"
    if d.is_main and not (folder / "tokenizer.json").exists():
        start = time.perf_counter()
        train_tokenizer(sources=cfg.data or None, texts=texts, vocab_size=cfg.vocab_size, out_dir=folder)
        log(f"trained a {cfg.vocab_size}-token BPE tokenizer in {time.perf_counter() - start:.1f}s -> {folder}")
    distributed.barrier(d)
    return load_tokenizer(folder)


def pretrain(config: TrainConfig | None = None, config_file: str | Path | None = None, resume: bool = False,
             console: Console | None = None, **overrides) -> PretrainResult:
    """Train a new model from scratch; flags (`overrides`) win over the YAML file's values."""
    cfg = config or TrainConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    d, log, out = distributed.start(cfg, resume, console)
    texts = None if cfg.data else python_docs_corpus()
    if texts is not None:
        log(f"no data given: training on the bundled Python documentation ({len(texts):,} documents)")
    tokenizer = _tokenizer(cfg, out, texts, d, log)
    kw = dict(sources=cfg.data or None, texts=texts, val_fraction=cfg.val_fraction, min_chars=cfg.min_chars,
              max_chars=cfg.max_chars, near_dedup=cfg.near_dedup, field=cfg.field, glob=cfg.glob)
    data = distributed.main_first(d, lambda: prepare_tokens(out / "data", tokenizer, log=log, **kw))

    base = preset(cfg.preset)
    model_cfg = replace(base, vocab_size=len(tokenizer), max_seq_len=max(base.max_seq_len, cfg.seq_len))
    torch.manual_seed(cfg.seed)
    module = Transformer(model_cfg).init_weights(cfg.seed)
    log(f"model {cfg.preset}: {module.num_params() / 1e6:.2f}M parameters; {d.world} process(es) on {d.device}; "
        f"global batch {cfg.batch_size * cfg.grad_accum * d.world} x {cfg.seq_len} tokens")
    fingerprint = {"model": model_cfg.to_dict(), "seq_len": cfg.seq_len, "data": data.meta["key"],
                   "global_batch": cfg.batch_size * cfg.grad_accum * d.world, "seed": cfg.seed}
    trainer = Trainer(cfg, module, TokenWindows(data.tokens("train"), cfg.seq_len),
                      TokenWindows(data.tokens("val"), cfg.seq_len), out, d, fingerprint, console)
    start_step = trainer.resume_step() if resume else 0  # refuses a checkpoint of another config
    if d.is_main:
        cfg.save(out / "config.yaml")
    first_val = trainer.evaluate() if not resume else float("nan")
    log(f"validation loss before training: {first_val:.3f}" if not resume else f"resuming at step {start_step}")
    result = trainer.run(start_step, initial_val_loss=None if resume else first_val)
    in_sync = trainer.replicas_in_sync()
    model_dir = out / "model"
    if d.is_main:
        # The final checkpoint holds the full (unsharded) weights whatever the parallelism.
        final = Transformer(model_cfg)
        final.load_state_dict(load_file(list_checkpoints(out / "checkpoints")[-1] / "model.safetensors"))
        meta = {"model_config": model_cfg.to_dict(), "provenance": {"created_by": "genlab pretrain", "config": cfg.to_dict(),
                "data": {k: v for k, v in data.meta.items() if k != "key"}},
                "metrics": {"val_loss": result.val_loss, "train_loss": result.train_loss, "tokens": result.tokens,
                            "steps": result.step}}
        generation = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                      "eos_token_id": stop_token_ids(tokenizer)}
        io.save(model_dir, final, tokenizer, meta=meta, generation=generation)
        log(f"done: {result.step} steps, {result.tokens:,} tokens in {result.seconds:.0f}s "
            f"({result.tokens_per_s:,.0f} tok/s); validation loss {first_val:.3f} -> {result.val_loss:.3f}; model -> {model_dir}")
    distributed.barrier(d)
    distributed.teardown()
    return PretrainResult(out, model_dir, result, first_val, data.meta, in_sync)

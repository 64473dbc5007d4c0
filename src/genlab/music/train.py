"""`genlab music train`: a transformer over ABC tunes, trained by `genlab.pretrain` itself.

The run: the ABC corpus (music21's, or the user's .abc files) -> canonical tunes split into
training and held-out tunes by hash -> a BPE tokenizer on the training tunes -> `pretrain` with
the training tunes as documents (a JSONL file; pretraining holds out its own validation tunes
from these) -> held-out bits per token and per character of the model, next to a character
Kneser-Ney n-gram fitted on the same training tunes in the same run -> `report.json`, and the
music spec written into the model folder's genlab.json.

OUT/ holds corpus/ (train.jsonl, heldout.jsonl, report.json), tokenizer/, everything pretrain
writes (model/, data/, checkpoints/, config.yaml, metrics.jsonl, loss.png) and report.json.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from rich.console import Console

from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_write_text, write_json
from genlab.music.baseline import CharNgram
from genlab.codecs.text import load_tokenizer
from genlab.music.codec import MusicSpec, train_abc_tokenizer
from genlab.music.corpus import AbcCorpus, build_corpus, music21_corpus
from genlab.train.checkpoint import refuse_overwrite
from genlab.train.config import TrainConfig


@dataclass
class MusicTrainConfig(TrainConfig):
    out: str = "runs/music"
    abc: list[str] = field(default_factory=list)  # .abc files / folders; empty = music21's ABC corpus
    heldout_fraction: float = 0.05  # tunes never trained on, for bits per token / character
    max_chars: int = 800  # longer tunes are dropped (~0.5%): a whole tune must fit the context
    baseline_order: int = 5  # the character n-gram anchor
    preset: str = "2m"
    vocab_size: int = 1024
    split_words: bool = False  # True: genlab's text tokenizer as is (see codec.train_abc_tokenizer)
    # A typical tune is ~60 tokens, the longest ~300 (0.4% of tunes, longer than 255, are dropped).
    # Shorter rows make attention cheaper: 3,000 steps of 1,024 tokens reached 1.40 bits/char at
    # 256 (316 s) and 1.42 at 512 (448 s; the machine's load differed, so the speed-up is rough).
    seq_len: int = 256
    # Many small steps: at a fixed budget of 1.33M tokens (2m preset, genlab's split tokenizer,
    # 512-token rows) held-out bits/char were 2.196 / 2.079 / 2.008 for 8 / 4 / 2 rows per step
    # (1 row trailed 2 rows at 0.77M). So ~1,024 tokens per step. lr 2e-3 ~ 3e-3; 6e-3 (at 8 rows)
    # was slightly and 1e-2 much worse.
    batch_size: int = 4
    lr: float = 3e-3
    warmup_steps: int = 100
    max_steps: int = 4000
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    samples: int = 0  # pretrain's text samples: `genlab music generate` samples tunes properly

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.heldout_fraction < 0.5:
            raise InvalidParameterError("heldout_fraction must be in (0, 0.5)")
        if self.max_chars < 20 or self.baseline_order < 1:
            raise InvalidParameterError("max_chars must be >= 20 and baseline_order >= 1")
        if self.data:
            raise InvalidParameterError("give ABC files with `abc` (--data on the command line), not `data`")
        self.abc = [str(a) for a in self.abc]

    def pretrain_config(self, train_file: Path, tokenizer: Path) -> TrainConfig:
        """The plain pretraining config of this run: the tunes as documents, our tokenizer."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainConfig)}
        return TrainConfig(**{**values, "data": [str(train_file)], "tokenizer": str(tokenizer)})


@dataclass
class MusicRunResult:
    out: Path
    model_dir: Path
    report: dict


def abc_files(sources: list[str]) -> list[Path]:
    files = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(p.rglob("*.abc"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such ABC file or folder")
    if not files:
        raise DataError(f"no .abc files in {', '.join(sources)}")
    return files


def _write_if_changed(path: Path, text: str) -> None:
    # unchanged bytes keep the file's mtime, so pretrain's token cache (and --resume) stays valid
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


def write_corpus(corpus: AbcCorpus, folder: Path) -> Path:
    for split, tunes in (("train", corpus.train), ("heldout", corpus.heldout)):
        _write_if_changed(folder / f"{split}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in tunes))
    write_json(folder / "report.json", corpus.report)
    return folder / "train.jsonl"


@torch.inference_mode()
def model_bits(model, tunes: list[str]) -> dict:
    """Held-out bits of a model: every token after <|bos|>, <|eos|> (the end of the tune) included,
    exactly the tokens pretraining trains on; per token and per character (+1 per tune for its end)."""
    eos = model.tokenizer.eos_token_id
    total, tokens, chars = 0.0, 0, 0
    for tune in tunes:
        ids = model.tokenizer(tune)["input_ids"] + [eos]
        if len(ids) > model.max_seq_len:
            raise InvalidParameterError(f"a held-out tune of {len(ids)} tokens exceeds the model's context "
                                        f"({model.max_seq_len}); lower max_chars or raise seq_len")
        x = torch.tensor([ids[:-1]], device=model.engine.backend.device)
        out = model.module(input_ids=x)
        logits = (out if isinstance(out, torch.Tensor) else out.logits)[0].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=logits.device), reduction="sum")
        total += nll.item() / math.log(2)
        tokens += len(ids) - 1
        chars += len(tune) + 1
    return {"bits": total, "tokens": tokens, "chars": chars, "bits_per_token": total / tokens,
            "bits_per_char": total / chars, "chars_per_token": (chars - len(tunes)) / (tokens - len(tunes))}


def baseline_bits(train: list[str], heldout: list[str], order: int) -> dict:
    start = time.perf_counter()
    ngram = CharNgram(order).fit(train)
    return {"order": order, "bits_per_char": ngram.bits_per_char(heldout), "seconds": round(time.perf_counter() - start, 1)}


def fit_context(corpus: AbcCorpus, tokenizer, seq_len: int, log) -> AbcCorpus:
    """Only tunes that fit the context whole (<|bos|> ... <|eos|>): a tune is generated in one
    window, so the model should learn whole tunes; held-out tunes are filtered alike, so the
    model and the baseline score the same tunes."""
    def fits(tunes):
        return [t for t, ids in zip(tunes, tokenizer(tunes)["input_ids"]) if len(ids) + 1 <= seq_len]

    train, heldout = fits(corpus.train), fits(corpus.heldout)
    dropped = len(corpus.train) + len(corpus.heldout) - len(train) - len(heldout)
    if dropped:
        log(f"dropped {dropped} tunes longer than the context ({seq_len} tokens)")
    report = {**corpus.report, "train": len(train), "heldout": len(heldout), "longer_than_context": dropped,
              "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, heldout))}
    return AbcCorpus(train, heldout, report)


def _update_model_meta(model_dir: Path, spec: MusicSpec, metrics: dict, corpus_report: dict) -> None:
    path = model_dir / "genlab.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["music"] = {**spec.to_dict(), "format": "abc", "heldout": metrics,
                     "corpus": {k: corpus_report.get(k) for k in ("tunes_kept", "train", "heldout", "normaliser")}}
    write_json(path, meta)


def train_music(config: MusicTrainConfig | None = None, config_file: str | Path | None = None, resume: bool = False,
                console: Console | None = None, corpus: AbcCorpus | None = None, **overrides) -> MusicRunResult:
    """Train a music model on ABC tunes (default: music21's corpus); see the module docstring."""
    from genlab.lm import load
    from genlab.train.pretrain import pretrain

    cfg = config or MusicTrainConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    log = console.print
    out = Path(cfg.out)
    refuse_overwrite(out, resume)  # before anything in OUT is rewritten, not only at pretrain's start
    if corpus is None:
        corpus = (build_corpus(abc_files(cfg.abc), cfg.heldout_fraction, cfg.max_chars, log=log) if cfg.abc
                  else music21_corpus(cfg.heldout_fraction, cfg.max_chars, log=log))
    if len(corpus.train) < 2 or not corpus.heldout:
        raise DataError(f"too few tunes: {len(corpus.train)} to train on, {len(corpus.heldout)} held out "
                        "(give more ABC tunes)")
    tok_dir = out / "tokenizer"
    if not (resume and (tok_dir / "tokenizer.json").exists()):
        train_abc_tokenizer(corpus.train, cfg.vocab_size, tok_dir, split_words=cfg.split_words)
        log(f"trained a {cfg.vocab_size}-token BPE tokenizer on {len(corpus.train):,} training tunes -> {tok_dir}")
    corpus = fit_context(corpus, load_tokenizer(tok_dir), cfg.seq_len, log)
    # Pretraining packs documents back to back in file order, so a window would show the model the
    # tune before, from the same book and often in the same style: a crutch that held-out tunes and
    # generation (each alone after <|bos|>) never have. Shuffled, the neighbour tells it nothing.
    random.Random(cfg.seed).shuffle(corpus.train)
    train_file = write_corpus(corpus, out / "corpus")
    started = time.perf_counter()
    run = pretrain(cfg.pretrain_config(train_file, tok_dir), resume=resume, console=console)
    seconds = time.perf_counter() - started
    model = load(run.model_dir)
    torch.manual_seed(cfg.seed)
    held = model_bits(model, corpus.heldout)
    base = baseline_bits(corpus.train, corpus.heldout, cfg.baseline_order)
    spec = MusicSpec.from_tunes(corpus.train)
    metrics = {"tunes": len(corpus.heldout), "bits_per_token": held["bits_per_token"],
               "bits_per_char": held["bits_per_char"], "chars_per_token": held["chars_per_token"],
               "baseline": f"char {cfg.baseline_order}-gram Kneser-Ney",
               "baseline_bits_per_char": base["bits_per_char"],
               "bits_per_char_vs_baseline": held["bits_per_char"] / base["bits_per_char"]}
    _update_model_meta(run.model_dir, spec, metrics, corpus.report)
    report = {"corpus": corpus.report, "heldout": {**metrics, "model": held, "baseline_fit": base},
              "training": {"steps": run.result.step, "tokens": run.result.tokens, "seconds": round(seconds, 1),
                           "train_loss": run.result.train_loss, "val_loss": run.result.val_loss,
                           "val_loss_before": run.first_val_loss, "parameters": model.base.num_params()},
              "model": str(run.model_dir)}
    write_json(out / "report.json", report)
    log(f"held-out tunes ({len(corpus.heldout)}): model {held['bits_per_token']:.3f} bits/token, "
        f"{held['bits_per_char']:.3f} bits/char; char {cfg.baseline_order}-gram {base['bits_per_char']:.3f} bits/char "
        f"(ratio {metrics['bits_per_char_vs_baseline']:.3f}); report -> {out / 'report.json'}")
    return MusicRunResult(out, run.model_dir, report)

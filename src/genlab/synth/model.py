"""`genlab synth fit` and `genlab synth sample`: learn a table as token sequences and sample new
records that always satisfy its schema.

Fitting infers the schema (codecs/table.py: identifiers, free text and mixed-type columns are
excluded with a warning, so they can never be copied), writes every training row as tokens in
`permutations` random column orders (the GReaT augmentation: the model learns every
conditional, which conditional sampling needs) and trains genlab's transformer from scratch in
the shared loop. Sampling runs batches of rows through the KV cache with the row grammar's
masks, so every row parses; `where` fixes columns to values or numeric ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from genlab.codecs.table import TableSchema, decode_rows, infer_schema
from genlab.errors import DataError, InvalidParameterError
from genlab.generate.sampling import draw
from genlab.model import io
from genlab.model.presets import preset
from genlab.model.transformer import KVCache, Transformer
from genlab.synth.grammar import RowGrammar, TableTokenizer
from genlab.train import distributed
from genlab.train.batches import PackedExamples
from genlab.train.config import TrainConfig
from genlab.train.loop import Result, Trainer


@dataclass
class SynthConfig(TrainConfig):
    out: str = "runs/synth"
    preset: str = "1m"
    permutations: int = 3  # random column orders per training row
    max_categories: int = 50  # more distinct strings than this: free text (excluded)
    max_levels: int = 1000  # number columns with at most this many distinct values (4+ rows each): one token per value
    seq_len: int = 256  # tokens per packed training row (several table rows each)
    batch_size: int = 16
    max_steps: int = 800
    lr: float = 2e-3
    warmup_steps: int = 30
    eval_every: int = 100
    checkpoint_every: int = 400
    samples: int = 0
    val_fraction: float = 0.05
    dp_epsilon: float | None = None  # set: train with DP-SGD (synth/dp.py) to this privacy budget
    dp_delta: float | None = None  # None: 1 / (10 * rows)
    dp_max_grad_norm: float = 1.0  # each row's gradient is clipped to this L2 norm
    dp_batch_rows: int = 64  # expected rows per DP-SGD step (Poisson sampling)

    def __post_init__(self):
        super().__post_init__()
        if self.permutations < 1:
            raise InvalidParameterError("permutations must be >= 1")


@dataclass
class SynthRunResult:
    out: Path
    model_dir: Path
    result: Result
    val_loss_before: float
    schema: TableSchema
    rows: int
    data: dict = field(default_factory=dict)


def row_texts(df: pd.DataFrame, schema: TableSchema) -> list[dict[str, str]]:
    """Each row as column -> value text (codecs/table.py's formats; "missing" for NaN)."""
    specs = schema.columns
    columns = [df[s.name].tolist() for s in specs]
    return [{s.name: s.format(v) for s, v in zip(specs, values)} for values in zip(*columns)]


def table_examples(texts: list[dict[str, str]], tok: TableTokenizer, permutations: int,
                   rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    names = tok.schema.names()
    out = []
    for row in texts:
        for _ in range(permutations):
            ids = np.array(tok.encode(row, [names[i] for i in rng.permutation(len(names))]), dtype=np.int64)
            out.append((ids, np.ones(len(ids), dtype=bool)))
    return out


def fit_table(data: pd.DataFrame | str | Path, config: SynthConfig | None = None, config_file: str | Path | None = None,
              resume: bool = False, console: Console | None = None, **overrides) -> SynthRunResult:
    """Train a table model on `data` (a DataFrame or a CSV / Parquet file)."""
    from genlab.data.tables import read_table

    cfg = config or SynthConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    d, log, out = distributed.start(cfg, resume, console)
    df = data if isinstance(data, pd.DataFrame) else read_table(data)
    schema = infer_schema(df, max_categories=cfg.max_categories, max_levels=cfg.max_levels,
                          warn=lambda m: log(f"[yellow]warning:[/] {m}"))
    tok = TableTokenizer(schema)
    rng = np.random.default_rng(cfg.seed)
    texts = row_texts(df, schema)
    order = rng.permutation(len(texts))
    n_val = max(1, int(round(len(texts) * cfg.val_fraction)))
    longest = RowGrammar(tok).max_length()
    seq_len = max(cfg.seq_len, longest)
    train_examples = table_examples([texts[i] for i in order[n_val:]], tok, cfg.permutations, rng)
    train = PackedExamples(train_examples, seq_len)
    val = PackedExamples(table_examples([texts[i] for i in order[:n_val]], tok, 1, rng), seq_len)
    model_cfg = replace(preset(cfg.preset), vocab_size=len(tok), max_seq_len=seq_len)
    torch.manual_seed(cfg.seed)
    module = Transformer(model_cfg).init_weights(cfg.seed)
    log(f"table model {cfg.preset}: {module.num_params() / 1e6:.2f}M parameters, vocabulary {len(tok)}; "
        f"{len(df):,} rows x {len(schema.columns)} columns ({len(schema.excluded)} excluded) -> "
        f"{train.examples:,} training sequences of <= {longest} tokens; {d.world} process(es) on {d.device}")
    fingerprint = {"model": model_cfg.to_dict(), "schema": schema.to_dict(), "rows": len(df), "seed": cfg.seed,
                   "permutations": cfg.permutations, "global_batch": cfg.batch_size * cfg.grad_accum * d.world}
    if cfg.dp_epsilon is not None and (d.world > 1 or resume):
        raise InvalidParameterError("differentially private fitting (--dp-epsilon) runs in one process and cannot resume")
    trainer = Trainer(cfg, module, train, val, out, d, fingerprint, console)
    start, before = trainer.begin(resume)
    privacy = None
    if cfg.dp_epsilon is None:
        result = trainer.run(start, initial_val_loss=None if resume else before)
    else:
        rows = [[ids for ids, _ in train_examples[i : i + cfg.permutations]]
                for i in range(0, len(train_examples), cfg.permutations)]
        result, privacy = _train_private(cfg, trainer, rows, before, out, log)
    model_dir = out / "model"
    info = {"rows": len(df), "columns": schema.names(), "excluded": schema.excluded,
            "source": str(data) if not isinstance(data, pd.DataFrame) else "DataFrame"}
    if d.is_main:
        meta = {"codec": tok.to_dict(), "model_config": model_cfg.to_dict(),
                "provenance": {"created_by": "genlab synth fit", "config": cfg.to_dict(), "data": info},
                "metrics": {"val_loss": result.val_loss, "train_loss": result.train_loss, "steps": result.step}}
        if privacy:
            meta["privacy"] = privacy
        io.save(model_dir, trainer.raw.eval(), tok, meta=meta, generation={})
        log(f"done: {result.step} steps in {result.seconds:.0f}s; validation loss {before:.3f} -> "
            f"{result.val_loss:.3f} nats/token; table model -> {model_dir}")
    distributed.barrier(d)
    distributed.teardown()
    return SynthRunResult(out, model_dir, result, before, schema, len(df), info)


def _train_private(cfg: SynthConfig, trainer: Trainer, rows: list[list[np.ndarray]], before: float, out: Path,
                   log) -> tuple[Result, dict]:
    """DP-SGD instead of the trainer's loop (one table row = one privacy unit); the spent epsilon
    is what the model folder records."""
    import json
    import time

    from genlab.fsutil import atomic_write_text
    from genlab.synth.dp import DPConfig, train_dp
    from genlab.train.curves import plot_curves

    dp_cfg = DPConfig(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_max_grad_norm, cfg.dp_batch_rows)
    row_tokens = float(np.mean([sum(len(ids) for ids in row) for row in rows]))
    records, tokens, start = [{"step": 0, "tokens": 0, "val_loss": before}], [0.0], time.perf_counter()

    def on_step(step: int, loss: float, sampled: int) -> None:
        tokens[0] += sampled * row_tokens
        if step % cfg.log_every == 0 and math.isfinite(loss):
            records.append({"step": step, "tokens": int(tokens[0]), "loss": loss})

    dp = train_dp(trainer.raw, rows, dp_cfg, steps=cfg.max_steps, lr=cfg.lr, seed=cfg.seed, warmup_steps=cfg.warmup_steps,
                  weight_decay=cfg.weight_decay, log=log, log_every=max(cfg.log_every, 50), on_step=on_step)
    val_loss = trainer.evaluate()
    records.append({"step": dp.steps, "tokens": int(tokens[0]), "val_loss": val_loss})
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    plot_curves(records, out / "loss.png", title=f"DP-SGD table model (epsilon {dp.epsilon_spent:.2f})")
    finite = [x for x in dp.losses[-50:] if math.isfinite(x)]
    seconds = time.perf_counter() - start
    result = Result(dp.steps, int(tokens[0]), float(np.mean(finite)) if finite else float("nan"), val_loss, seconds,
                    tokens[0] / max(seconds, 1e-9))
    log(f"DP-SGD: spent epsilon {dp.epsilon_spent:.3f} (delta {dp.delta:.3g}, noise multiplier "
        f"{dp.noise_multiplier:.3f}, {dp.clipped_fraction:.0%} of row gradients clipped)")
    privacy = dp.to_dict() | {"not_covered": "the schema (column kinds, ranges, categories and levels) is read from "
                                             "the data as is, and the recorded validation loss uses held-out rows"}
    return result, privacy


def load_table_model(path: str | Path, device: str = "cpu"):
    """A table model folder: from scratch (TableModel) or a fine-tuned text model (TextTableModel)."""
    meta = Path(path) / "genlab.json"
    if meta.exists() and (io.read_json(meta).get("codec") or {}).get("type") == "table":
        return TableModel.load(path, device)
    from genlab.synth.text_table import TextTableModel

    return TextTableModel.load(path, device=device)


def parse_where(conditions: list[str] | dict | None) -> tuple[dict[str, str], dict[str, tuple]]:
    """`["sex=F", "age=40..60", "income=..5000"]` -> fixed values and (low, high) ranges."""
    if isinstance(conditions, dict):
        conditions = [f"{k}={v}" for k, v in conditions.items()]
    fixed, ranges = {}, {}
    for item in conditions or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidParameterError(f"condition {item!r}: write COLUMN=VALUE or COLUMN=LOW..HIGH")
        if ".." in value:
            lo, _, hi = value.partition("..")
            try:
                ranges[name] = (float(lo) if lo else None, float(hi) if hi else None)
            except ValueError:
                raise InvalidParameterError(f"condition {item!r}: the range bounds must be numbers") from None
        else:
            fixed[name] = value
    return fixed, ranges


class TableModel:
    """A fitted table model: sample rows (conditionally) as a DataFrame."""

    def __init__(self, module: torch.nn.Module, tokenizer: TableTokenizer, device: str = "cpu"):
        self.module, self.tok, self.device = module.eval().pack_for_inference(), tokenizer, torch.device(device)
        self.schema = tokenizer.schema

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "TableModel":
        loaded = io.load(path, dtype=torch.float32, device=device)
        if not isinstance(loaded.tokenizer, TableTokenizer):
            raise InvalidParameterError(f"{path}: not a table model (genlab.json names no table codec); "
                                        "train one with `genlab synth fit`")
        return cls(loaded.module, loaded.tokenizer, device)

    def sample(self, n: int, where: list[str] | dict | None = None, seed: int = 0, batch_size: int = 1024,
               temperature: float = 1.0, no_copies_of: pd.DataFrame | None = None) -> pd.DataFrame:
        """`n` new rows; every one satisfies the schema (and the conditions in `where`).

        `no_copies_of` (e.g. the training table): a drawn row equal to one of its rows (every
        column's value text the same) is dropped and another is drawn, so none is returned;
        `rows.attrs["copies_dropped"]` says how many were. A privacy filter for tables whose rows
        repeat; the training rows are needed here, the model folder never stores them."""
        if n < 1 or batch_size < 1 or temperature <= 0:
            raise InvalidParameterError("n and batch_size must be >= 1 and temperature > 0")
        grammar = RowGrammar(self.tok, *parse_where(where), device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        excluded = set(self.row_texts(no_copies_of)) - {None} if no_copies_of is not None else set()
        texts, dropped = [], 0
        while len(texts) < n:
            # with a filter, whole batches: the surplus is cheaper than many small rounds
            rows = batch_size if excluded else min(batch_size, n - len(texts))
            for text in self._batch(grammar, rows, generator, temperature):
                if len(texts) == n:
                    break
                if text in excluded:
                    dropped += 1
                else:
                    texts.append(text)
            if dropped > 20 * n + 1000 and len(texts) < n:
                raise DataError(f"only {len(texts)} of {n} rows differ from every row of the excluded table after "
                                f"{dropped + len(texts):,} draws; the model (or the --where conditions) mostly "
                                "reproduces its rows")
        rows = decode_rows(texts, self.schema)
        rows.attrs["copies_dropped"] = dropped
        return rows

    def row_texts(self, df: pd.DataFrame) -> list[str | None]:
        """Each row of `df` as the text `_batch` writes; None for a row some column of the schema
        cannot hold (no sampled row can equal it)."""
        missing = [name for name in self.schema.names() if name not in df.columns]
        if missing:
            raise DataError(f"the table has no column(s) {', '.join(map(repr, missing))} of the model's schema")
        out = []
        for values in zip(*(df[name].tolist() for name in self.schema.names())):
            try:
                out.append(", ".join(f"{s.name} is {s.format(v)}" for s, v in zip(self.schema.columns, values)))
            except DataError:
                out.append(None)
        return out

    @torch.inference_mode()
    def _batch(self, grammar: RowGrammar, rows: int, generator: torch.Generator, temperature: float) -> list[str]:
        prefix = grammar.prefix_ids()
        steps = grammar.max_length() - len(prefix) + 1
        config = self.module.config
        cache = KVCache(config, rows, len(prefix) + steps, self.device, next(self.module.parameters()).dtype)
        ids = torch.tensor(prefix, device=self.device)[None].expand(rows, -1)
        positions = torch.arange(len(prefix), device=self.device)
        logits = self.module(ids, positions.expand(rows, -1), cache, positions, len(prefix), None, last_only=True)
        states = [grammar.start() for _ in range(rows)]
        written = [list(prefix) for _ in range(rows)]
        for step in range(steps):
            scores = logits[:, -1].float() / temperature
            scores = scores.masked_fill(~grammar.masks(states), -math.inf)
            token = draw(scores.softmax(-1), generator)
            chosen = token[:, 0].tolist()
            for s, row, t in zip(states, written, chosen):
                if not s.finished:
                    grammar.advance(s, t)
                    row.append(t)
            if all(s.finished for s in states):
                break
            pos = torch.tensor([len(prefix) + step], device=self.device)
            logits = self.module(token, pos.expand(rows, 1), cache, pos, len(prefix) + step + 1, None, last_only=True)
        else:
            raise DataError("a sampled row did not finish within the schema's longest row (a grammar bug)")
        return [self._text(row) for row in written]

    def _text(self, ids: list[int]) -> str:
        values = self.tok.decode(ids)
        return ", ".join(f"{name} is {values[name]}" for name in self.schema.names())


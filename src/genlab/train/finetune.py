"""`genlab finetune`: adapt a foundation model (genlab or any local HF causal-LM folder) to a domain.

Modes, chosen from the data unless `mode` says: continued pretraining on raw text ("cpt"), or
instruction SFT on JSONL `messages` / `prompt`+`completion` records ("sft", loss on the answers
only, examples packed without cross-contamination). LoRA (PEFT) by default, full fine-tuning
with `full=True`, QLoRA with `load_4bit=True` on CUDA. Training runs in the pretraining loop
(same progress bar, metrics, checkpoints, resume and multi-process behaviour).

Before and after training it measures held-out domain perplexity, general-text perplexity on
the bundled Python documentation (warning when it rises by more than `forgetting_tolerance`),
and for SFT shows greedy answers of the base and the adapted model side by side.

Output folder: `adapter/` (PEFT folder; LoRA) or `model/` (HF folder; full), `report.json`,
`config.yaml`, `metrics.jsonl`, `loss.png`, `checkpoints/`, `data/` (text mode).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from genlab.codecs.text import stop_token_ids
from genlab.data.corpus import python_docs_corpus, statistics_corpus, statistics_instructions
from genlab.data.instructions import detect_mode, prepare_examples
from genlab.data.tokens import in_heldout_split, prepare_tokens
from genlab.errors import GenlabError, InvalidParameterError
from genlab.evaluate.perplexity import perplexity
from genlab.fsutil import write_json
from genlab.generate.engine import Engine
from genlab.generate.sampling import SamplingParams
from genlab.model import adapters, io
from genlab.model.transformer import Transformer
from genlab.train import distributed
from genlab.train.batches import PackedExamples, TokenWindows
from genlab.train.config import TrainConfig
from genlab.train.loop import Dataset, Result, Trainer


@dataclass
class FinetuneConfig(TrainConfig):
    model: str = ""  # the base: a genlab or Hugging Face model folder
    mode: str = "auto"  # auto | cpt (raw text) | sft (instructions)
    full: bool = False  # full fine-tuning instead of LoRA
    load_4bit: bool = False  # QLoRA: 4-bit base (CUDA + bitsandbytes)
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every projection of the blocks
    overlong: str = "truncate"  # SFT examples longer than seq_len + 1 tokens: truncate | drop
    general_eval: bool = True  # measure perplexity on the bundled general corpus before/after
    forgetting_tolerance: float = 0.2  # warn when general perplexity rises by more than this fraction
    # fine-tuning defaults (a pretraining run's would be too aggressive)
    out: str = "runs/finetune"
    lr: float = 0.0  # 0: 2e-4 for LoRA, 2e-5 for full fine-tuning
    max_steps: int = 200
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 8
    seq_len: int = 512
    val_fraction: float = 0.1
    eval_every: int = 50
    checkpoint_every: int = 100
    samples: int = 3

    def __post_init__(self):
        if not self.lr:
            self.lr = 2e-5 if self.full else 2e-4
        super().__post_init__()
        if self.mode not in ("auto", "cpt", "sft"):
            raise InvalidParameterError(f"invalid mode {self.mode!r}: use auto, cpt or sft")
        if not self.model:
            raise InvalidParameterError("no base model given (a genlab or Hugging Face model folder)")
        if self.full and self.load_4bit:
            raise InvalidParameterError("--4bit (QLoRA) trains a LoRA adapter; it cannot be combined with --full")
        if self.fsdp and not self.full:
            raise InvalidParameterError("--fsdp shards full fine-tuning; LoRA replicates the frozen base (use --4bit "
                                        "to shrink it)")


@dataclass
class FinetuneResult:
    out: Path
    mode: str
    output_dir: Path  # adapter/ (LoRA) or model/ (full)
    result: Result
    domain_loss_before: float
    domain_loss_after: float
    general_loss_before: float | None = None
    general_loss_after: float | None = None
    forgetting: bool = False
    samples: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    @property
    def domain_ppl(self) -> tuple[float, float]:
        return math.exp(min(self.domain_loss_before, 50)), math.exp(min(self.domain_loss_after, 50))

    @property
    def general_ppl(self) -> tuple[float, float] | None:
        if self.general_loss_before is None:
            return None
        return math.exp(min(self.general_loss_before, 50)), math.exp(min(self.general_loss_after, 50))


class CausalLMLoss(torch.nn.Module):
    """A transformers causal LM behind genlab's training interface: forward(**batch) -> loss.
    Packed rows pass their restarting `positions`, from which transformers builds the same
    block-diagonal mask (`mask` is for genlab's own transformer)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, targets, positions=None, mask=None):
        logits = self.lm(input_ids=input_ids, position_ids=positions, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def trainable(module: torch.nn.Module) -> torch.nn.Module:
    """`module` behind the loop's interface (genlab's transformer already computes the loss)."""
    return module if isinstance(adapters.base_module(module), Transformer) else CausalLMLoss(module)


def text_windows(texts: list[str], tokenizer, seq_len: int) -> TokenWindows:
    """Documents tokenized in memory ([bos] ids [eos] each, back to back) and cut into windows."""
    eos = tokenizer.eos_token_id
    ids = [t + ([eos] if eos is not None else []) for t in tokenizer(texts)["input_ids"]]
    return TokenWindows(np.fromiter((i for doc in ids for i in doc), dtype=np.int64), seq_len)


def general_eval_set(tokenizer, seq_len: int) -> TokenWindows:
    """Held-out general text: the bundled Python docs that genlab's pretraining holds out by default
    (its 5% document-hash validation split), so a genlab base never trained on them."""
    docs = [d for d in python_docs_corpus() if in_heldout_split(d, 0.05)]
    return text_windows(docs, tokenizer, seq_len)


def check_qlora(device: torch.device) -> None:
    import importlib.util

    missing = [what for what, ok in (("a CUDA GPU", device.type == "cuda"),
                                     ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None))
               if not ok]
    if missing:
        raise GenlabError(f"--4bit (QLoRA) needs {' and '.join(missing)}, which this machine lacks; "
                          "drop --4bit to train a LoRA adapter on the full-precision base")


def load_base(cfg: FinetuneConfig, device: torch.device) -> io.LoadedModel:
    if not cfg.load_4bit:
        # Frozen LoRA bases may sit in bf16 on GPU (adapters stay fp32); fully trained weights stay fp32.
        dtype = torch.bfloat16 if device.type == "cuda" and not cfg.full and cfg.bf16 else torch.float32
        return io.load(cfg.model, dtype=dtype, device=str(device))
    check_qlora(device)
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    loaded = io.load(cfg.model, dtype=torch.bfloat16, device="cpu")  # tokenizer, configs (weights are reloaded)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(loaded.path, quantization_config=quant, device_map={"": device},
                                                 trust_remote_code=False, use_safetensors=True)
    loaded.module, loaded.native = prepare_model_for_kbit_training(model), False
    return loaded


def _data(cfg: FinetuneConfig, mode: str, tokenizer, seq_len: int, out: Path, d, log) -> tuple[Dataset, Dataset, dict]:
    """Training and held-out datasets for `mode`, plus what to report about them."""
    if mode == "sft":
        records = None
        if not cfg.data:
            log("no data given: instruction-tuning on the bundled statistics Q&A (scipy.stats docstrings)")
            records = [(f"bundled statistics_instructions:{i + 1}", r) for i, r in enumerate(statistics_instructions())]
        examples = prepare_examples(cfg.data, tokenizer, seq_len + 1, cfg.val_fraction, cfg.overlong, cfg.glob, records)
        if d.is_main:
            table = Table("instruction data", "count", title="data check")
            for row in examples.stats.rows():
                table.add_row(*row)
            log(table)
        train = PackedExamples([(e.ids, e.labels) for e in examples.train], seq_len)
        val = PackedExamples([(e.ids, e.labels) for e in examples.val], seq_len)
        info = {**asdict(examples.stats), "train_rows": len(train), "key": examples.fingerprint(),
                "prompts": [e.prompt_ids for e in examples.val[: cfg.samples]],
                "references": [e.ids[len(e.prompt_ids):].tolist() for e in examples.val[: cfg.samples]]}
        return train, val, info
    texts = None
    if not cfg.data:
        texts = statistics_corpus()
        log(f"no data given: adapting to the bundled statistics corpus ({len(texts)} documents: scipy.stats "
            "docstrings, scikit-learn and statsmodels dataset descriptions)")
    kw = dict(sources=cfg.data or None, texts=texts, val_fraction=cfg.val_fraction, min_chars=cfg.min_chars,
              max_chars=cfg.max_chars, near_dedup=cfg.near_dedup, field=cfg.field, glob=cfg.glob)
    data = distributed.main_first(d, lambda: prepare_tokens(out / "data", tokenizer, log=log, **kw))
    info = {k: v for k, v in data.meta.items() if k != "key"} | {"key": data.meta["key"]}
    return TokenWindows(data.tokens("train"), seq_len), TokenWindows(data.tokens("val"), seq_len), info


def _answers(module, tokenizer, prompts: list[list[int]], max_new_tokens: int = 48) -> list[str]:
    """Greedy completions of token-id prompts (for the side-by-side samples)."""
    if not prompts:
        return []
    training = module.training
    module.eval()  # no dropout while answering
    engine = Engine(module, tokenizer, stop_token_ids(tokenizer), pack=False)  # the model is being trained
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    module.train(training)
    return [o.text for o in outs]


def finetune(config: FinetuneConfig | None = None, config_file: str | Path | None = None, resume: bool = False,
             console: Console | None = None, **overrides) -> FinetuneResult:
    """Adapt `model` to `data`; flags (`overrides`) win over the YAML file's values."""
    cfg = config or FinetuneConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    d, log, out = distributed.start(cfg, resume, console)
    mode = cfg.mode if cfg.mode != "auto" else (detect_mode(cfg.data, cfg.glob) if cfg.data else "cpt")
    loaded = load_base(cfg, d.device)
    tokenizer, base = loaded.tokenizer, loaded.module
    max_len = base.config.max_seq_len if loaded.native else getattr(base.config, "max_position_embeddings", None)
    seq_len = min(cfg.seq_len, max_len or cfg.seq_len)
    train, val, data_info = _data(cfg, mode, tokenizer, seq_len, out, d, log)

    if cfg.full:
        if isinstance(base, Transformer):
            base.unpack()
        model = base.train().requires_grad_(True)
    else:
        model = adapters.add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    method = "full fine-tuning" if cfg.full else f"{'QLoRA' if cfg.load_4bit else 'LoRA'} r={cfg.lora_r}"
    log(f"{mode} on {loaded.path} ({'genlab transformer' if loaded.native else type(base).__name__}) with {method}: "
        f"{n_train:,} of {n_all:,} parameters trainable; seq_len {seq_len}; {d.world} process(es) on {d.device}")
    fingerprint = {"base": str(Path(loaded.path).resolve()), "mode": mode, "method": method,
                   "targets": cfg.target_modules, "seq_len": seq_len, "data": data_info["key"], "seed": cfg.seed,
                   "global_batch": cfg.batch_size * cfg.grad_accum * d.world}
    general = general_eval_set(tokenizer, seq_len) if cfg.general_eval else None
    if general is not None and len(general) == 0:
        general = None
    prompts = data_info.pop("prompts", [])
    references = data_info.pop("references", [])
    before = _answers(model, tokenizer, prompts) if d.is_main and not resume else []

    trainer = Trainer(cfg, trainable(model), train, val, out, d, fingerprint, console, keep_frozen=cfg.full)
    start_step = trainer.resume_step() if resume else 0
    if d.is_main:
        cfg.save(out / "config.yaml")
    domain_before = trainer.evaluate()
    general_before = trainer.evaluate(general) if general is not None else None
    log(f"before: held-out domain perplexity {math.exp(min(domain_before, 50)):,.2f}"
        + (f", general {math.exp(min(general_before, 50)):,.2f}" if general is not None else ""))
    result = trainer.run(start_step, initial_val_loss=None if resume else domain_before)
    domain_after = trainer.evaluate()
    general_after = trainer.evaluate(general) if general is not None else None

    after = _answers(model, tokenizer, prompts) if d.is_main else []
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "base": b, "adapted": a,
                "reference": tokenizer.decode(r, skip_special_tokens=True)}
               for p, b, a, r in zip(prompts, before or [""] * len(after), after, references)]
    forgetting = (general is not None
                  and math.exp(general_after - general_before) > 1 + cfg.forgetting_tolerance)
    res = FinetuneResult(out, mode, out / ("model" if cfg.full else "adapter"), result, domain_before, domain_after,
                         general_before, general_after, forgetting, samples, data_info)
    if d.is_main:
        _save(res, cfg, model, loaded, trainer, method)
        _report(res, log, cfg)
    distributed.barrier(d)
    distributed.teardown()
    return res


def _save(res: FinetuneResult, cfg: FinetuneConfig, model, loaded: io.LoadedModel, trainer: Trainer, method: str) -> None:
    metrics = {"domain_loss_before": res.domain_loss_before, "domain_loss_after": res.domain_loss_after,
               "general_loss_before": res.general_loss_before, "general_loss_after": res.general_loss_after,
               "steps": res.result.step, "tokens": res.result.tokens}
    provenance = {"created_by": "genlab finetune", "base": str(loaded.path), "mode": res.mode, "method": method,
                  "config": cfg.to_dict(), "data": {k: v for k, v in res.data.items() if k != "key"}}
    if cfg.full:
        final = model
        if cfg.fsdp:  # sharded parameters: the final checkpoint holds the gathered weights
            from safetensors.torch import load_file

            from genlab.train.checkpoint import list_checkpoints

            final = io.load(cfg.model, dtype=torch.float32).module
            sd = load_file(list_checkpoints(trainer.ckpt_dir)[-1] / "model.safetensors")
            final.load_state_dict({k.removeprefix("lm."): v for k, v in sd.items()}, strict=False)
        meta = {**loaded.meta, "provenance": provenance, "metrics": metrics}
        if isinstance(final, Transformer):
            meta["model_config"] = final.config.to_dict()
        io.save(res.output_dir, final.eval(), loaded.tokenizer, meta=meta, generation=loaded.generation,
                hf_config=loaded.hf_config if loaded.native else None)
    else:
        adapters.save_adapter(model, res.output_dir, Path(loaded.path).resolve(),
                              meta={"provenance": provenance, "metrics": metrics})
    write_json(res.out / "report.json", {"mode": res.mode, "method": method, "output": str(res.output_dir),
                                         "metrics": metrics, "forgetting_warning": res.forgetting,
                                         "samples": res.samples, "data": provenance["data"]})


def _report(res: FinetuneResult, log, cfg: FinetuneConfig) -> None:
    table = Table("held-out perplexity", "before", "after", "change", title=f"{res.mode}: {res.out}")
    rows = [("domain", res.domain_ppl)] + ([("general (Python docs)", res.general_ppl)] if res.general_ppl else [])
    for name, (b, a) in rows:
        table.add_row(name, f"{b:,.2f}", f"{a:,.2f}", f"{(a / b - 1) * 100:+.1f}%")
    log(table)
    if res.forgetting:
        log(f"[bold yellow]warning:[/] general-text perplexity rose by more than {cfg.forgetting_tolerance:.0%} "
            "(forgetting): consider fewer steps, a lower learning rate, LoRA instead of full fine-tuning, or mixing "
            "general text into the data")
    for s in res.samples:
        log(f"[bold]prompt:[/] {s['prompt'][-200:]!r}\n  [dim]base:[/]    {s['base'][:200]!r}\n"
            f"  [green]adapted:[/] {s['adapted'][:200]!r}\n  [dim]reference:[/] {s['reference'][:200]!r}")
    log(f"done: {res.result.step} steps in {res.result.seconds:.0f}s; {'model' if cfg.full else 'adapter'} -> "
        f"{res.output_dir}")


def evaluate_model(model, data, adapter: str | None = None, mode: str = "auto", seq_len: int = 512,
                   batch_size: int = 8, max_batches: int | None = None, field: str = "text",
                   glob: str = "**/*") -> dict:
    """Perplexity of `model` (a LanguageModel or a model folder) on `data` (files / folders).

    Instruction data (JSONL messages / prompt+completion) is scored on the answer tokens only,
    raw text on every token. `adapter`: an adapter folder (with a folder path) or the name of a
    loaded adapter.
    """
    from genlab.data.readers import iter_texts
    from genlab.lm import LanguageModel, load

    lm = model if isinstance(model, LanguageModel) else load(model, adapters=[adapter] if adapter else None)
    name = lm.default_adapter if adapter and not isinstance(model, LanguageModel) else adapter
    mode = detect_mode(data, glob) if mode == "auto" else mode
    seq_len = min(seq_len, lm.max_seq_len)
    if mode == "sft":
        examples = prepare_examples(data, lm.tokenizer, seq_len + 1, glob=glob)
        dataset = PackedExamples([(e.ids, e.labels) for e in examples.train + examples.val], seq_len)
        counted = examples.stats.answer_tokens
    else:
        texts = list(iter_texts(data, field=field, glob=glob))
        if not texts:
            raise GenlabError(f"{', '.join(map(str, data))}: no text to evaluate on")
        dataset = text_windows(texts, lm.tokenizer, seq_len)
        if len(dataset) == 0:  # shorter than one window: score it as a single shorter window
            dataset = TokenWindows(dataset.tokens, len(dataset.tokens) - 1)
        counted = len(dataset) * dataset.seq_len
    with lm.using(name):
        scores = perplexity(trainable(lm.module), dataset, batch_size, max_batches, lm.engine.backend.device)
    return {"mode": mode, "adapter": name, "tokens": counted, **scores}

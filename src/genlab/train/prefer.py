"""Preference tuning from user feedback: DPO, KTO and ORPO (TRL) on LoRA adapters, the implicit
rewards the promotion gate reads, and reward models for best-of-n and win-rate judging.

Rows are the TRL-convention datasets that `genlab.feedback.store` exports: DPO/ORPO rows
{"prompt", "chosen", "rejected"}, KTO rows {"prompt", "completion", "label"}; chat prompts are
message lists (TRL's conversational format), completions-endpoint prompts are strings. Chat rows
are rendered with the chat template the server uses (`codecs.text.render_chat`: the folder's own,
else genlab's), so the model is tuned on the token sequences it sees when serving.

Reference model. A fresh adapter trains against the base with the adapter disabled (TRL's PEFT
path; no second copy of the weights). Given the serving adapter (`adapter_dir`), training
*continues that adapter* (loaded trainable) and the reference is its frozen copy, i.e. exactly
the serving version; TRL adds that copy as a second adapter named "ref". The candidate is thus
one adapter relative to the base, loadable and servable like any other; its genlab.json records
the serving adapter it started from (`on_top_of`). The serving adapter's LoRA shape wins over
`lora_r` / `lora_alpha` then. ORPO needs no reference.

Output folder (written atomically): `adapter/` (PEFT folder), `metrics.jsonl` (one line per
step), `loss.png`, `report.json`.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from genlab.codecs.text import CHAT_TEMPLATE, END, PLAIN_CHAT_TEMPLATE, load_tokenizer
from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_dir, write_json
from genlab.model import adapters, io
from genlab.train.curves import MetricsLog, plot_curves

METHODS = ("dpo", "kto", "orpo")
MIN_PAIRS = 8  # fewer A/B pairs than this: DPO overfits a handful of examples; fall back to KTO ratings
FIELDS = {"dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected"),
          "kto": ("prompt", "completion", "label")}


@dataclass
class PreferConfig:
    method: str = "dpo"  # dpo | kto | orpo
    beta: float = 0.1  # DPO/KTO: strength of the pull towards the reference; ORPO: weight of the odds-ratio term
    lr: float = 5e-4  # LoRA learns at ~10x the full-fine-tuning rate (TRL's 5e-6..5e-5 are for full weights)
    epochs: float = 3.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 8  # pairs (DPO/ORPO) or rated answers (KTO) per step; KTO needs >= 2 for its KL estimate
    grad_accum: int = 1
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    max_length: int = 512  # prompt + completion tokens; longer sequences are cut at the end
    seed: int = 0
    gradient_checkpointing: bool = False  # trade compute for memory (large models on a GPU)
    use_cpu: bool = False  # train on the CPU even when a GPU is available

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidParameterError(f"invalid method {self.method!r}: use {', '.join(METHODS)}")
        if self.beta <= 0 or self.lr <= 0 or self.epochs <= 0 or self.max_length < 2:
            raise InvalidParameterError("beta, lr and epochs must be > 0 and max_length >= 2")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 0:
            raise InvalidParameterError("batch_size and grad_accum must be >= 1, max_steps >= 0")
        if self.method == "kto" and self.batch_size < 2:
            raise InvalidParameterError("KTO estimates its KL term within a batch: batch_size must be >= 2")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise InvalidParameterError("LoRA needs lora_r >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")


@dataclass
class PreferResult:
    out_dir: Path
    adapter_dir: Path
    method: str
    steps: int
    seconds: float
    metrics: dict = field(default_factory=dict)  # the last logged step's values, plus train_loss


def choose_method(dpo_rows: list, kto_rows: list, min_pairs: int = MIN_PAIRS) -> str:
    """"dpo" with at least `min_pairs` preference pairs, else "kto" when rated answers include both
    good and bad ones; otherwise InvalidParameterError saying what feedback is missing."""
    if len(dpo_rows) >= min_pairs:
        return "dpo"
    labels = {bool(r["label"]) for r in kto_rows if "label" in r}
    if labels == {True, False}:
        return "kto"
    rated = ("no rated answers" if not kto_rows
             else f"{len(kto_rows)} rated answer(s), all {'good' if True in labels else 'bad'}")
    raise InvalidParameterError(
        f"not enough feedback to tune on: {len(dpo_rows)} preference pair(s) (DPO needs {min_pairs}; A/B choices "
        f"and corrections make pairs) and {rated} (KTO needs both good and bad ratings)")


def clean_rows(rows: list[dict], method: str, one_kind: bool = True) -> list[dict]:
    """The method's TRL fields only (feedback exports add completion_id, source); a string answer to a
    chat prompt becomes an assistant message. `one_kind`: refuse a mix of chat and plain-text rows,
    which one training dataset cannot hold."""
    keys = FIELDS[method]
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in keys if not isinstance(r, dict) or k not in r]
        if missing:
            raise DataError(f"row {i}: missing field(s) {', '.join(missing)} (a {method} row has {', '.join(keys)})")
        row = {k: r[k] for k in keys}
        chat = isinstance(row["prompt"], list)
        for k in keys[1:]:
            if k == "label":
                row[k] = bool(row[k])
            elif chat and isinstance(row[k], str):
                row[k] = [{"role": "assistant", "content": row[k]}]
            elif not chat and not isinstance(row[k], str):
                raise DataError(f"row {i}: '{k}' must be a string when the prompt is a string")
        out.append(row)
    if not out:
        raise InvalidParameterError(f"no {method} rows to train on")
    chats = sum(isinstance(r["prompt"], list) for r in out)
    if one_kind and 0 < chats < len(out):
        raise DataError(f"rows mix {chats} chat prompts (message lists) and {len(out) - chats} plain-text prompts: "
                        "train on one kind at a time")
    if method == "kto" and len({r["label"] for r in out}) < 2:
        raise InvalidParameterError("KTO needs both desirable (label true) and undesirable (label false) examples")
    return out


# --- tokenizer, models, token ids ------------------------------------------------------------
def policy_tokenizer(model_dir: str | Path):
    """The folder's tokenizer set up as the server uses it: the same chat template (genlab's own when
    the folder has none, as `render_chat` does) and a pad token (eos when it has none)."""
    tokenizer = load_tokenizer(io.resolve(model_dir))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE if END in tokenizer.get_vocab() else PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidParameterError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device(use_cpu: bool = False) -> str:
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def load_causal_lm(model_dir: str | Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(io.resolve(model_dir), dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False).to(device)


def encode_pair(tokenizer, prompt, *completions) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [completion ids ...]) exactly as TRL's DPOTrainer tokenizes a row: a chat through
    the chat template (the prompt with the assistant header), a string prompt with the tokenizer's own
    specials and eos appended to each completion; the completion starts where the tokenized prompt and
    prompt+completion first differ, over all completions (DPO: chosen and rejected together)."""
    from trl.data_utils import common_prefix_length

    if isinstance(prompt, list):
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]

        def ids(messages, **kw):
            return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

        prompt_ids = ids(prompt, add_generation_prompt=True)
        full = [ids(prompt + c) for c in completions]
    else:
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full = [tokenizer(text=prompt + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
    n = min(common_prefix_length(prompt_ids, f) for f in full)
    return prompt_ids[:n], [f[n:] for f in full]


@torch.no_grad()
def completion_logprobs(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 16,
                        max_length: int | None = None) -> list[float]:
    """Sum of log p(completion token | everything before it) for each (prompt ids, completion ids),
    in right-padded batches (causal attention: padding after a sequence cannot change it).
    `max_length` cuts sequences at the end as TRL's collator does."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids = [(p + c)[:max_length] for p, c in chunk]
        width = max(len(s) for s in ids)
        batch = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)  # completion tokens
        for i, ((p, _), s) in enumerate(zip(chunk, ids)):
            batch[i, :len(s)] = torch.tensor(s)
            mask[i, len(p):len(s)] = True
        logits = model(input_ids=batch.to(device))
        logits = (logits if isinstance(logits, torch.Tensor) else logits.logits).float()
        # position t predicts token t+1
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch[:, 1:, None].to(device))[..., 0]
        out += (logp * mask[:, 1:].to(device)).sum(1).tolist()
    return out


def sequence_logprob(model, tokenizer, prompt, completion) -> float:
    """log pi(completion | prompt) over the completion tokens, the prompt rendered as the server does."""
    prompt_ids, (completion_ids,) = encode_pair(tokenizer, prompt, completion)
    return completion_logprobs(model, [(prompt_ids, completion_ids)])[0]


def implicit_rewards(model_dir: str | Path, adapter_dir: str | Path | None, ref_adapter_dir: str | Path | None,
                     rows: list[dict], beta: float, tokenizer=None, batch_size: int = 16,
                     max_length: int | None = None, device: str | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) implicit DPO rewards beta * (log pi(y|x) - log pi_ref(y|x)) per row, with
    pi = base + `adapter_dir` and pi_ref = base + `ref_adapter_dir` (the base when None). The gate's
    preference accuracy is the fraction with chosen > rejected; the margin is their difference."""
    from peft import PeftModel

    rows = clean_rows(rows, "dpo", one_kind=False)
    tokenizer = tokenizer or policy_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device or _device()).eval()
    folders = {name: f for name, f in (("candidate", adapter_dir), ("reference", ref_adapter_dir)) if f is not None}
    for name, folder in folders.items():
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, folder, adapter_name=name).eval()
    sequences = []
    for r in rows:
        prompt_ids, (chosen, rejected) = encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"])
        sequences += [(prompt_ids, chosen), (prompt_ids, rejected)]
    logps = {}
    for name in ("candidate", "reference"):
        with adapters.active(model, name if name in folders else adapters.BASE):
            logps[name] = completion_logprobs(model, sequences, batch_size, max_length)
    diff = [beta * (a - b) for a, b in zip(logps["candidate"], logps["reference"])]
    return list(zip(diff[0::2], diff[1::2]))


# --- training ----------------------------------------------------------------------------------
class _LogSteps(TrainerCallback):
    """Each logged step -> metrics.jsonl and the rich progress line; keeps Trainer's end-of-run summary."""

    def __init__(self, path: Path, console: Console | None, label: str, tokens_per_step: float):
        self.log, self.label, self.tokens_per_step = MetricsLog(path), label, tokens_per_step
        self.start, self.summary, self.last, self.rows_per_step = time.perf_counter(), {}, {}, 1
        self.progress = None if console is None else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} · margin {task.fields[margin]:+.3f} · {task.fields[rate]:.1f} "
                       "rows/s"), TimeRemainingColumn(), console=console)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=state.max_steps, loss=float("nan"), margin=0.0,
                                               rate=0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" not in numbers:  # the summary Trainer logs at the end (train_loss, train_runtime, ...)
            self.summary = numbers
            return
        elapsed = time.perf_counter() - self.start
        self.last = {"step": state.global_step, "elapsed": round(elapsed, 3),
                     "tokens": numbers.pop("num_tokens", None) or round(state.global_step * self.tokens_per_step)}
        self.last |= {("lr" if k == "learning_rate" else k): v for k, v in numbers.items()}
        self.log.write(self.last)
        if self.progress:
            self.progress.update(self.task, completed=state.global_step, loss=self.last["loss"],
                                 margin=self.last.get("rewards/margins", self.last.get("margin", 0.0)),
                                 rate=state.global_step * self.rows_per_step / max(elapsed, 1e-9))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()


def _trl_args(device: str, work: str, seed: int, **kw) -> dict:
    """TrainingArguments every genlab TRL run shares: log each step, save nothing, report nowhere."""
    return dict(output_dir=work, seed=seed, data_seed=seed, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_num_workers=0, use_cpu=device == "cpu",
                # TRL defaults to bf16 autocast, which a CPU emulates ~10x slower than fp32
                bf16=device == "cuda" and torch.cuda.is_bf16_supported(), **kw)


def _run(trainer, out: Path, console: Console | None, label: str, tokens_per_step: float) -> tuple[_LogSteps, float]:
    """Train, logging to out/metrics.jsonl and plotting out/loss.png; returns the log and the seconds taken."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw dicts on stdout; metrics.jsonl and the progress line replace them
    steps = _LogSteps(out / "metrics.jsonl", console, label, tokens_per_step)
    trainer.add_callback(steps)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if records := steps.log.records():
        plot_curves(records, out / "loss.png", title=label, ylabel="loss")
    return steps, seconds


def _trainer(model, tokenizer, rows: list[dict], cfg: PreferConfig, work: str, new_adapter: bool):
    """The TRL trainer for `cfg.method`; `model` is the base (a fresh LoRA is added) or a PEFT model to continue."""
    from datasets import Dataset
    from peft import LoraConfig

    args = _trl_args(_device(cfg.use_cpu), work, cfg.seed, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
                     max_steps=cfg.max_steps or -1, per_device_train_batch_size=cfg.batch_size,
                     gradient_accumulation_steps=cfg.grad_accum, beta=cfg.beta, max_length=cfg.max_length,
                     activation_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules="all-linear", task_type="CAUSAL_LM") if new_adapter else None
    common = dict(model=model, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(args=DPOConfig(**args), **common)
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        # KTO reads batches in order (its KL term pairs neighbours), so mix the labels first; feedback exports
        # are in time order. TRL's advice for unbalanced data (KTO paper, eq. 8): weight the rarer side up.
        rows = random.Random(cfg.seed).sample(rows, len(rows))
        good = sum(r["label"] for r in rows)
        args |= dict(desirable_weight=max(1.0, (len(rows) - good) / good),
                     undesirable_weight=max(1.0, good / (len(rows) - good)))
        return KTOTrainer(args=KTOConfig(**args), **common | {"train_dataset": Dataset.from_list(rows)})
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(args=ORPOConfig(**args, remove_unused_columns=False), **common)


def _tokens_per_row(tokenizer, rows: list[dict]) -> float:
    """Mean tokens a row feeds the model (the prompt once per answer), for loss.png's x axis when the
    trainer does not count tokens itself (ORPO)."""
    sample = rows[:64]
    total = 0
    for r in sample:
        prompt_ids, answers = encode_pair(tokenizer, r["prompt"], *[r[k] for k in ("chosen", "rejected", "completion")
                                                                     if k in r])
        total += sum(len(prompt_ids) + len(a) for a in answers)
    return total / len(sample)


def train_preference(model_dir: str | Path, rows: list[dict], out_dir: str | Path, config: PreferConfig | None = None,
                     adapter_dir: str | Path | None = None, console: Console | None = None) -> PreferResult:
    """Tune a LoRA adapter of `model_dir` on feedback `rows` with `config.method`, continuing the serving
    adapter `adapter_dir` when given (see the module docstring). Writes `out_dir` atomically."""
    from peft import PeftModel

    cfg = config or PreferConfig()
    rows = clean_rows(rows, cfg.method)
    base = io.resolve(model_dir).resolve()
    tokenizer = policy_tokenizer(base)
    model = load_causal_lm(base)
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise InvalidParameterError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)  # TRL copies it as the reference
    out_dir, label = Path(out_dir), f"{cfg.method.upper()} on {len(rows)} feedback rows"
    with tempfile.TemporaryDirectory(prefix="genlab-prefer-") as work, atomic_dir(out_dir) as tmp:
        trainer = _trainer(model, tokenizer, rows, cfg, work, new_adapter=adapter_dir is None)
        log, seconds = _run(trainer, tmp, console, label,
                            _tokens_per_row(tokenizer, rows) * cfg.batch_size * cfg.grad_accum)
        steps = trainer.state.global_step
        metrics = {k: v for k, v in log.last.items() if k not in ("step", "elapsed")}
        metrics["train_loss"] = log.summary.get("train_loss")
        policy = trainer.accelerator.unwrap_model(trainer.model)
        lora = policy.peft_config["default"]
        info = {"created_by": "genlab prefer", "method": cfg.method, "base": str(base), "rows": len(rows),
                "on_top_of": str(Path(adapter_dir).resolve()) if adapter_dir else None, "config": asdict(cfg),
                "lora": {"r": lora.r, "alpha": lora.lora_alpha}}
        adapters.save_adapter(policy, tmp / "adapter", base, meta={**info, "metrics": metrics})
        rate = steps * cfg.batch_size * cfg.grad_accum / max(seconds, 1e-9)
        write_json(tmp / "report.json", {**info, "steps": steps, "seconds": round(seconds, 3),
                                         "rows_per_second": round(rate, 2), "metrics": metrics})
    if console is not None:
        console.print(f"{label}: {steps} steps in {seconds:.1f}s ({rate:.1f} rows/s); adapter -> {out_dir / 'adapter'}")
    return PreferResult(out_dir, out_dir / "adapter", cfg.method, steps, seconds, metrics)


# --- reward models -----------------------------------------------------------------------------
def _reward_ids(tokenizer, prompt, completion) -> list[int]:
    """prompt + completion as TRL's RewardTrainer tokenizes it (chat template, or text + eos)."""
    if isinstance(prompt, list):
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        return tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    eos = tokenizer.eos_token
    return tokenizer(text=prompt + (completion if completion.endswith(eos) else completion + eos))["input_ids"]


def _load_scorer(path: Path, seed: int | None = None):
    """The folder as AutoModelForSequenceClassification with one output (a new, seeded head on an LM)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    config.num_labels = 1  # one scalar: the reward
    if seed is not None:
        set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32,
                                                              use_safetensors=True, trust_remote_code=False)


def train_reward_model(model_dir: str | Path, dpo_rows: list[dict], out_dir: str | Path, epochs: float = 3.0,
                       lr: float = 1e-4, batch_size: int = 8, max_length: int = 512, seed: int = 0,
                       use_cpu: bool = False, console: Console | None = None) -> Path:
    """Train a scalar reward model on chosen/rejected pairs (TRL's RewardTrainer: a one-output head on
    the model, all weights trained; pairs longer than `max_length` tokens are skipped). `out_dir`
    (written atomically) is a Hugging Face AutoModelForSequenceClassification folder, plus genlab.json,
    metrics.jsonl and loss.png."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = clean_rows(dpo_rows, "dpo")
    base = io.resolve(model_dir).resolve()
    tokenizer = policy_tokenizer(base)
    model = _load_scorer(base, seed)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="genlab-reward-") as work, atomic_dir(out_dir) as tmp:
        args = _trl_args(_device(use_cpu), work, seed, learning_rate=lr, num_train_epochs=epochs,
                         per_device_train_batch_size=batch_size, max_length=max_length, activation_checkpointing=False)
        trainer = RewardTrainer(model=model, args=RewardConfig(**args), train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer)
        log, seconds = _run(trainer, tmp, console, f"reward model on {len(rows)} pairs",
                            _tokens_per_row(tokenizer, rows) * batch_size)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "genlab.json", {
            "kind": "reward-model", "created_by": "genlab prefer", "base": str(base), "rows": len(rows),
            "steps": trainer.state.global_step, "seconds": round(seconds, 3),
            "metrics": {k: v for k, v in log.last.items() if k not in ("step", "elapsed")}})
    return out_dir


class RewardModel:
    """A reward model folder (train_reward_model's output): `score(prompts, completions)` -> one scalar
    per pair, higher = preferred; for best-of-n sampling and win-rate judging."""

    def __init__(self, path: str | Path, device: str | None = None):
        path = io.resolve(path)
        self.tokenizer = policy_tokenizer(path)
        self.model = _load_scorer(path).to(device or _device()).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def score(self, prompts: list, completions: list, batch_size: int = 16) -> list[float]:
        if len(prompts) != len(completions):
            raise InvalidParameterError(f"{len(prompts)} prompts but {len(completions)} completions")
        ids = [_reward_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            batch = torch.full((len(chunk), max(map(len, chunk))), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for i, s in enumerate(chunk):
                batch[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            logits = self.model(input_ids=batch.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
            scores += logits[:, 0].float().tolist()
        return scores

"""LoRA SFT step throughput and peak memory: genlab vs TRL's SFTTrainer, in one run.

    python bench/finetune.py                       # ~10M model, CPU, fp32
    python bench/finetune.py --preset 110m --steps 30
    python bench/finetune.py --device cuda --dtype bfloat16 --preset 350m   # on a GPU

Same model folder (a genlab preset saved as a Llama folder), same data (the bundled
statistics Q&A, prompt/completion, loss on completions), same PEFT LoRA config (rank, alpha,
dropout, every block projection), same packed batch (rows x seq_len tokens per step), same
optimizer (AdamW) and learning rate. Each side runs in its own subprocess so that its peak
memory (max RSS on CPU, max allocated on CUDA) is its own; the sides alternate over --rounds.
Throughput counts real (non-padding) tokens per second over the timed steps (after --warmup).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)


def make_inputs(folder: Path, preset_name: str) -> None:
    """A model folder (random weights, tokenizer trained on the data) and the JSONL data."""
    import genlab
    from genlab.data.corpus import statistics_corpus, statistics_instructions
    from genlab.model.presets import preset

    tok = genlab.train_tokenizer(texts=statistics_corpus(), vocab_size=8192, out_dir=folder / "tokenizer")
    genlab.build(preset(preset_name), tok, seed=0).save(folder / "model")
    with open(folder / "data.jsonl", "w") as f:
        for r in statistics_instructions():
            f.write(json.dumps(r) + "\n")


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_genlab(folder: Path, args) -> dict:
    import torch

    from genlab.data.instructions import prepare_examples
    from genlab.model import adapters, io
    from genlab.train import distributed
    from genlab.train.batches import PackedExamples
    from genlab.train.finetune import FinetuneConfig, trainable
    from genlab.train.loop import Trainer

    dtype = getattr(torch, args.dtype)
    loaded = io.load(folder / "model", dtype=dtype, device=args.device)
    examples = prepare_examples([folder / "data.jsonl"], loaded.tokenizer, args.seq_len + 1, val_fraction=0.05)
    train = PackedExamples([(e.ids, e.labels) for e in examples.train], args.seq_len)
    val = PackedExamples([(e.ids, e.labels) for e in examples.val], args.seq_len)
    model = adapters.add_lora(loaded.module, LORA["r"], LORA["lora_alpha"], LORA["lora_dropout"])
    cfg = FinetuneConfig(model=str(folder / "model"), out=str(folder / "genlab-run"), batch_size=args.batch,
                         seq_len=args.seq_len, max_steps=args.warmup + args.steps, lr=args.lr, warmup_steps=0,
                         device=args.device, bf16=args.dtype == "bfloat16")
    trainer = Trainer(cfg, trainable(model), train, val, Path(cfg.out), distributed.setup(args.device), {},
                      keep_frozen=False)
    trainer.model.train()
    tokens, seconds = 0, 0.0
    for step in range(args.warmup + args.steps):
        rows = trainer.sampler.windows(step, 0)
        sync(args.device)
        start = time.perf_counter()
        trainer._train_step(step)
        sync(args.device)
        if step >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += int((train.segments[rows] != -1).sum())
    return {"tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds / args.steps, "peak_mb": peak_memory_mb(args.device),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_trl(folder: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from genlab.model.adapters import NATIVE_TARGETS

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=dtype).to(args.device)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    records = [json.loads(line) for line in open(folder / "data.jsonl")]
    data = Dataset.from_list(records)
    config = SFTConfig(output_dir=str(folder / "trl-run"), max_steps=args.warmup + args.steps,
                       per_device_train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="cosine",
                       packing=True, max_length=args.seq_len, completion_only_loss=True, save_strategy="no",
                       logging_steps=10_000, report_to=[], use_cpu=not args.device.startswith("cuda"),
                       bf16=args.dtype == "bfloat16", dataloader_num_workers=0, disable_tqdm=True, seed=0,
                       optim="adamw_torch_fused" if args.device.startswith("cuda") else "adamw_torch")
    state = {"tokens": 0, "seconds": 0.0, "step": 0, "start": 0.0, "batch_tokens": 0}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(args.device)
            state["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(args.device)
            if state["step"] >= args.warmup:
                state["seconds"] += time.perf_counter() - state["start"]
                state["tokens"] += state["batch_tokens"]
            state["step"] += 1

    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(**LORA, target_modules=NATIVE_TARGETS, task_type="CAUSAL_LM"),
                         callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        state["batch_tokens"] = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {"tokens_per_s": state["tokens"] / state["seconds"], "step_ms": 1000 * state["seconds"] / args.steps,
            "peak_mb": peak_memory_mb(args.device),
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side (median reported)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", choices=["genlab", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one side, in its own process
        result = (run_genlab if args.side == "genlab" else run_trl)(args.folder, args)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder, args.preset)
        runs = {"genlab": [], "trl": []}
        child = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("json", "side", "folder") and v is not None]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        for _ in range(args.rounds):
            for side in runs:
                out = subprocess.run([sys.executable, __file__, *child, "--side", side, "--folder", str(folder)],
                                     capture_output=True, text=True, env=env)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
                runs[side].append(json.loads(line[7:]))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    machine = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores" if args.device == "cpu"
               else args.device)
    print(f"# LoRA SFT: genlab vs TRL SFTTrainer — {date.today()} — {machine} — {args.preset}, {args.dtype}, "
          f"batch {args.batch} x {args.seq_len} packed, r={LORA['r']}, {args.steps} timed steps x {args.rounds} rounds")
    print(f"{'':8} {'tokens/s':>10} {'step ms':>9} {'peak MB':>9} {'trainable':>10}")
    for side, m in med.items():
        print(f"{side:8} {m['tokens_per_s']:>10,.0f} {m['step_ms']:>9,.1f} {m['peak_mb']:>9,.0f} {int(m['trainable']):>10,}")
    ratio = med["genlab"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
    print(f"throughput ratio genlab / TRL: {ratio:.2f}x; peak memory genlab / TRL: "
          f"{med['genlab']['peak_mb'] / med['trl']['peak_mb']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(date.today()), "machine": machine, "args": vars(args) | {"folder": None},
                       "runs": runs, "median": med, "ratio": ratio}, f, indent=2, default=str)


if __name__ == "__main__":
    main()

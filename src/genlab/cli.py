"""The `genlab` command: one sub-command per verb, mirroring the Python API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from genlab.errors import GenlabError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="genlab: build, adapt, ground and serve generative models on your own machine.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")
model_app = typer.Typer(no_args_is_help=True, help="Model presets, new models, model folders.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
out = Console()
err = Console(stderr=True)

# Sampling options shared by `generate` and `chat` (SamplingParams fields).
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-m", help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepPenalty = Annotated[float, typer.Option(help="Penalise tokens already seen (1 = off).")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")]
Seed = Annotated[Optional[int], typer.Option(help="Same seed -> same output.")]
Dtype = Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")]
Device = Annotated[str, typer.Option(help="cpu | cuda | cuda:1 ...")]


def main() -> None:
    """Entry point: bad input (a GenlabError) is one line on stderr and exit code 2."""
    try:
        app()
    except GenlabError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


@tokenizer_app.command("train")
def tokenizer_train(
    sources: Annotated[list[Path], typer.Argument(help="Text files, folders (recursive) or JSONL files.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the tokenizer to.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(help="Minimum pair count for a merge.")] = 2,
    special: Annotated[Optional[list[str]], typer.Option("--special", help="Extra special token (repeatable).")] = None,
):
    """Train a byte-level BPE tokenizer (lossless on any UTF-8 text).

    Example: genlab tokenizer train docs/ notes.jsonl --vocab-size 8192 --out tok/
    """
    from genlab.codecs.text import train_tokenizer

    tok = train_tokenizer(sources, vocab_size=vocab_size, min_frequency=min_frequency,
                          extra_special_tokens=special or (), out_dir=out_dir)
    out.print(f"tokenizer with {len(tok)} tokens written to {out_dir}")


@model_app.command("presets")
def model_presets(vocab_size: Annotated[Optional[int], typer.Option(help="Count parameters for this vocabulary.")] = None):
    """List model size presets with their parameter counts.

    Example: genlab model presets --vocab-size 8192
    """
    from dataclasses import replace

    from genlab.model.presets import PRESETS, count_params

    table = Table("preset", "params", "hidden", "layers", "heads", "kv heads", "mlp", "context", "vocab", "tied")
    for name, cfg in PRESETS.items():
        cfg = replace(cfg, vocab_size=vocab_size or cfg.vocab_size)
        table.add_row(name, f"{count_params(cfg) / 1e6:,.1f}M", str(cfg.hidden_size), str(cfg.num_layers),
                      str(cfg.num_heads), str(cfg.num_kv_heads), str(cfg.intermediate_size), str(cfg.max_seq_len),
                      str(cfg.vocab_size), "yes" if cfg.tie_embeddings else "no")
    out.print(table)


@model_app.command("init")
def model_init(
    preset: Annotated[str, typer.Argument(help="Preset name (see `genlab model presets`).")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer folder.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
):
    """Create a new, randomly initialised model folder (HF Llama layout).

    Example: genlab model init 10m --tokenizer tok/ --out my-model/
    """
    import genlab

    model = genlab.build(preset, genlab.load_tokenizer(tokenizer), seed=seed)
    model.save(out_dir)
    out.print(f"{preset}: {model.module.num_params() / 1e6:,.2f}M parameters written to {out_dir}")


@model_app.command("info")
def model_info(model_path: Annotated[str, typer.Argument(help="Model folder.")]):
    """Describe a model folder: architecture, size, context, tokenizer.

    Example: genlab model info my-model/
    """
    import genlab

    model = genlab.load(model_path)
    n = sum(p.numel() for p in model.module.parameters())
    kind = "genlab transformer" if model.native else f"transformers {type(model.module).__name__}"
    out.print(f"{model_path}: {kind}, {n / 1e6:,.2f}M parameters, context {model.max_seq_len}, "
              f"vocabulary {len(model.tokenizer)}, eos ids {model.eos_token_ids}")


@app.command()
def generate(
    model_path: Annotated[str, typer.Argument(help="Model folder (genlab or any HF causal LM).")],
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts (batched together).")],
    max_new_tokens: MaxNew = 128,
    temperature: Temperature = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    n: Annotated[int, typer.Option("-n", help="Samples per prompt.")] = 1,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Report per-token log-probabilities (JSON).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per completion.")] = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
):
    """Complete prompts. One prompt streams to the terminal; several are batched.

    Example: genlab generate my-model/ "The history of Python" --max-new-tokens 60 --temperature 0.7 --seed 1
    """
    import genlab

    model = genlab.load(model_path, dtype=dtype, device=device)
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, stop=stop or [], seed=seed, n=n, logprobs=logprobs)
    if len(prompts) == 1 and n == 1 and not as_json and not logprobs:
        for piece in model.stream(prompts[0], **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    results = model.generate(list(prompts), **params)
    for c in results:
        if as_json or logprobs:
            record = {"prompt": c.prompt_index, "sample": c.sample_index, "text": c.text,
                      "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                      "completion_tokens": len(c.token_ids)}
            if logprobs:
                record.update(token_ids=c.token_ids, logprobs=c.logprobs)
            print(json.dumps(record, ensure_ascii=False))
        else:
            out.rule(f"prompt {c.prompt_index} · sample {c.sample_index} · {c.finish_reason}")
            print(prompts[c.prompt_index] + c.text)


@app.command()
def chat(
    model_path: Annotated[str, typer.Argument(help="Model folder with a chat template.")],
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.95,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
):
    """Interactive chat with streaming replies. /reset clears the history, /exit (or Ctrl-D) quits.

    Example: genlab chat my-model/ --system "You are a concise assistant."
    """
    import genlab

    model = genlab.load(model_path, dtype=dtype, device=device)
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, seed=seed)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply = []
        for piece in model.stream(history, **params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def pretrain(
    data: Annotated[Optional[list[Path]], typer.Argument(help="Files / folders / JSONL / CSV / Parquet; none = bundled Python docs.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (model/, metrics.jsonl, loss.png ...).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of TrainConfig fields; flags win.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Model size preset (genlab model presets).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Existing tokenizer folder (default: train one).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary of the tokenizer trained on the data.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per training sequence.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per micro-batch per process.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop cleanly after this many minutes.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Validate every N steps.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    near_dedup: Annotated[Optional[float], typer.Option(help="Drop near-duplicates above this MinHash similarity.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for init and data order.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (GPU).")] = None,
    fsdp: Annotated[Optional[bool], typer.Option("--fsdp/--no-fsdp", help="Shard parameters across torchrun processes.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
):
    """Pretrain a new model from scratch (tokenizer -> token files -> transformer -> curves -> samples).

    Example: genlab pretrain docs/ --out runs/mine --preset 10m --max-steps 2000
    Example (2 GPUs): torchrun --nproc_per_node 2 -m genlab.cli pretrain docs/ --out runs/mine
    """
    import genlab
    from genlab.train.pretrain import pretrain as run_pretrain

    overrides = dict(out=str(out) if out else None, data=[str(p) for p in data] if data else None, preset=preset,
                     tokenizer=str(tokenizer) if tokenizer else None, vocab_size=vocab_size, seq_len=seq_len,
                     batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, max_minutes=max_minutes, lr=lr,
                     warmup_steps=warmup_steps, eval_every=eval_every, checkpoint_every=checkpoint_every,
                     near_dedup=near_dedup, seed=seed, device=device, compile=compile, fsdp=fsdp)
    result = run_pretrain(config_file=config, resume=resume, console=err, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        model = genlab.load(result.model_dir)
        for prompt in ("The for statement", "def "):
            sample = model.generate(prompt, max_new_tokens=40, temperature=0.8, top_p=0.95, seed=0).text
            print(f"--- sample ---\n{prompt}{sample}")


if __name__ == "__main__":
    main()

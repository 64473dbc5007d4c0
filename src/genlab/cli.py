"""The `genlab` command: one sub-command per verb, mirroring the Python API."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from genlab.cli_options import (
    Preset, Adapter, BatchSize, CkptEvery, Compile, Config, Device, Dtype, EvalEvery, Fsdp, GradAccum, Lr, MaxMinutes, TimeSchedule, MaxNew,
    MaxSteps, MinP, Out, RepPenalty, Resume, Seed, SeqLen, Stop, Temperature, TopK, TopP, TrainDevice, TrainSeed, Warmup,
    err, out,
)
from genlab.errors import GenlabError
from genlab.image.cli import image_app
from genlab.music.cli import music_app
from genlab.series.cli import series_app
from genlab.synth.cli import synth_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="genlab: build, adapt, ground and serve generative models on your own machine.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")
model_app = typer.Typer(no_args_is_help=True, help="Model presets, new models, model folders.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
rag_app = typer.Typer(no_args_is_help=True, help="Retrieval quality.")
app.add_typer(rag_app, name="rag")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for genlab serve (stored hashed).")
app.add_typer(keys_app, name="keys")
feedback_app = typer.Typer(no_args_is_help=True, help="Recorded feedback: list it, export training sets.")
app.add_typer(feedback_app, name="feedback")
reward_app = typer.Typer(no_args_is_help=True, help="Reward models trained on recorded preferences.")
app.add_typer(reward_app, name="reward")
app.add_typer(series_app, name="series")
app.add_typer(synth_app, name="synth")
app.add_typer(image_app, name="image")
app.add_typer(music_app, name="music")


def _adapters(specs: list[str] | None) -> dict[str, str]:
    """--adapter values ("FOLDER" or "NAME=FOLDER") -> {name: folder}, in order."""
    named = {}
    for spec in specs or []:
        name, _, folder = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        named[name] = folder
    return named


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
    adapter: Adapter = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
):
    """Complete prompts. One prompt streams to the terminal; several are batched.

    Example: genlab generate my-model/ "The history of Python" --max-new-tokens 60 --temperature 0.7 --seed 1
    Example: genlab generate base/ "What does scipy.stats.norm do?" --adapter runs/ft/adapter --temperature 0
    """
    import genlab

    model = genlab.load(model_path, dtype=dtype, device=device, adapters=_adapters(adapter))
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
    adapter: Adapter = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
):
    """Interactive chat with streaming replies. /reset clears the history, /exit (or Ctrl-D) quits.

    Example: genlab chat my-model/ --system "You are a concise assistant." --adapter runs/ft/adapter
    """
    import genlab

    model = genlab.load(model_path, dtype=dtype, device=device, adapters=_adapters(adapter))
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
    out: Out = None,
    config: Config = None,
    preset: Preset = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Existing tokenizer folder (default: train one).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary of the tokenizer trained on the data.")] = None,
    seq_len: SeqLen = None,
    batch_size: BatchSize = None,
    grad_accum: GradAccum = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    time_schedule: TimeSchedule = None,
    lr: Lr = None,
    warmup_steps: Warmup = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CkptEvery = None,
    near_dedup: Annotated[Optional[float], typer.Option(help="Drop near-duplicates above this MinHash similarity.")] = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    compile: Compile = None,
    fsdp: Fsdp = None,
    resume: Resume = False,
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
                     time_schedule=time_schedule, warmup_steps=warmup_steps, eval_every=eval_every,
                     checkpoint_every=checkpoint_every, near_dedup=near_dedup, seed=seed, device=device, compile=compile, fsdp=fsdp)
    result = run_pretrain(config_file=config, resume=resume, console=err, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        model = genlab.load(result.model_dir)
        for prompt in ("The for statement", "def "):
            sample = model.generate(prompt, max_new_tokens=40, temperature=0.8, top_p=0.95, seed=0).text
            print(f"--- sample ---\n{prompt}{sample}")


@app.command()
def finetune(
    model_path: Annotated[str, typer.Argument(help="Base model folder (genlab or any HF causal LM).")],
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="Text files / folders / JSONL (repeatable); none = the bundled statistics demo.")] = None,
    out: Out = None,
    config: Config = None,
    mode: Annotated[Optional[str], typer.Option(help="auto | cpt (raw text) | sft (messages or prompt/completion JSONL).")] = None,
    full: Annotated[Optional[bool], typer.Option("--full/--lora", help="Full fine-tuning instead of LoRA.")] = None,
    load_4bit: Annotated[Optional[bool], typer.Option("--4bit", help="QLoRA: 4-bit base (needs CUDA + bitsandbytes).")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (scale = alpha / rank).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="Dropout on the LoRA path.")] = None,
    target_module: Annotated[Optional[list[str]], typer.Option("--target-module", help="Module name to adapt (repeatable; default: every block projection).")] = None,
    overlong: Annotated[Optional[str], typer.Option(help="SFT examples longer than --seq-len: truncate | drop.")] = None,
    general_eval: Annotated[Optional[bool], typer.Option("--general-eval/--no-general-eval", help="Measure general-text perplexity before/after (forgetting).")] = None,
    seq_len: SeqLen = None,
    batch_size: BatchSize = None,
    grad_accum: GradAccum = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    lr: Lr = None,
    warmup_steps: Warmup = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CkptEvery = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    compile: Compile = None,
    fsdp: Fsdp = None,
    resume: Resume = False,
):
    """Adapt a model to a domain: continued pretraining or instruction SFT, with LoRA (default) or fully.

    Example: genlab finetune runs/quickstart/pretrain/model --data notes/ --out runs/ft --max-steps 300
    Example: genlab finetune my-model/ --data chats.jsonl --out runs/sft --lora-r 16 --lr 1e-3
    """
    from genlab.train.finetune import finetune as run_finetune

    overrides = dict(model=model_path, out=str(out) if out else None, data=[str(p) for p in data] if data else None,
                     mode=mode, full=full, load_4bit=load_4bit, lora_r=lora_r, lora_alpha=lora_alpha,
                     lora_dropout=lora_dropout, target_modules=target_module or None, overlong=overlong,
                     general_eval=general_eval, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                     max_steps=max_steps, max_minutes=max_minutes, lr=lr, warmup_steps=warmup_steps,
                     eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, device=device,
                     compile=compile, fsdp=fsdp)
    result = run_finetune(config_file=config, resume=resume, console=err, **overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.output_dir)


@app.command()
def merge(
    base: Annotated[str, typer.Argument(help="Base model folder.")],
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter folder (PEFT).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the merged model.")],
):
    """Fold a LoRA adapter into its base and write a plain Hugging Face model folder.

    Example: genlab merge runs/quickstart/pretrain/model runs/ft/adapter merged-model/
    """
    import genlab

    model = genlab.load(base, adapters=[str(adapter)])
    model.merge().save(out_dir)
    out.print(f"merged {adapter} into {base} -> {out_dir}")


@app.command("eval")
def evaluate(
    model_path: Annotated[str, typer.Argument(help="Model folder.")],
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Text files / folders / JSONL (repeatable).")],
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter folder to evaluate with.")] = None,
    mode: Annotated[str, typer.Option(help="auto | cpt (every token) | sft (answer tokens only).")] = "auto",
    seq_len: Annotated[int, typer.Option(help="Tokens per scored window.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    max_batches: Annotated[Optional[int], typer.Option(help="Score only the first N batches.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Perplexity of a model (optionally with an adapter) on any data.

    Example: genlab eval runs/quickstart/pretrain/model --data notes/ --adapter runs/ft/adapter
    """
    from genlab.train.finetune import evaluate_model

    r = evaluate_model(str(model_path), [str(p) for p in data], adapter=str(adapter) if adapter else None, mode=mode,
                       seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    if as_json:
        print(json.dumps(r))
    else:
        out.print(f"{model_path}{' + ' + str(adapter) if adapter else ''}: perplexity {r['ppl']:,.3f} "
                  f"(loss {r['loss']:.4f}) on {r['tokens']:,} {'answer ' if r['mode'] == 'sft' else ''}tokens "
                  f"of {', '.join(map(str, data))}")


Embedder = Annotated[Optional[str], typer.Option(help="Local sentence-transformers folder (default: all-MiniLM-L6-v2, bundled).")]
PathGlob = Annotated[Optional[str], typer.Option("--path", help="Only sources whose path matches this glob.")]
Kinds = Annotated[Optional[list[str]], typer.Option("--type", help="Only these file types, e.g. md, pdf (repeatable).")]
Method = Annotated[str, typer.Option(help="hybrid | dense | bm25.")]


@app.command("index")
def index_cmd(
    docs: Annotated[list[Path], typer.Argument(help="Files and folders (recursive) to index.")],
    store: Annotated[Path, typer.Option(help="Store folder (created if new; updated incrementally).")],
    embedder: Embedder = None,
    glob: Annotated[str, typer.Option(help="Which files of a folder.")] = "**/*",
    column: Annotated[Optional[list[str]], typer.Option("--column", help="Text column of CSV / JSONL files (repeatable).")] = None,
    chunk_tokens: Annotated[int, typer.Option(help="Chunk size in embedder tokens.")] = 200,
    overlap: Annotated[int, typer.Option(help="Tokens repeated between neighbouring chunks.")] = 32,
):
    """Index documents for retrieval (.txt .md .rst .html .pdf .py .csv .jsonl); re-runs only embed what changed.

    Example: genlab index docs/ papers/ --store runs/store
    """
    from genlab.rag.indexer import index

    r = index([str(d) for d in docs], store, embedder, glob, tuple(column or ["text"]), chunk_tokens, overlap, console=err)
    table = Table("files", "count", title=f"index {store}")
    for name in ("added", "updated", "removed", "unchanged", "skipped"):
        table.add_row(name, str(len(getattr(r, name))))
    table.add_row("chunks embedded", f"{r.chunks_embedded:,}")
    table.add_row("chunks in store", f"{r.chunks_total:,}")
    out.print(table)
    for path, why in r.skipped:
        out.print(f"skipped {escape(path)}: {why}", highlight=False, soft_wrap=True)
    out.print(f"done in {r.seconds:.1f}s")


@app.command()
def search(
    store: Annotated[Path, typer.Argument(help="Store folder.")],
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", help="Chunks to return.")] = 5,
    method: Method = "hybrid",
    path: PathGlob = None,
    kind: Kinds = None,
    embedder: Embedder = None,
    reranker: Annotated[Optional[str], typer.Option(help="Local cross-encoder folder to re-rank with.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per chunk.")] = False,
):
    """Ranked chunks for a query, with scores and sources.

    Example: genlab search runs/store "how do I open a file" -k 3 --method bm25 --type md
    """
    from genlab.rag.retrieve import Retriever

    hits = Retriever(store, embedder, reranker).search(query, k=k, method=method, path_glob=path, kinds=kind)
    for rank, h in enumerate(hits, 1):
        if as_json:
            print(json.dumps({"rank": rank, "score": h.score, "path": h.path, "page": h.page, "heading": h.heading,
                              "start": h.start, "end": h.end, "text": h.text}, ensure_ascii=False))
        else:
            out.rule(f"{rank} · {h.score:.4f} · {escape(h.source)}")
            out.print(escape(h.text[:600]), highlight=False)


@app.command()
def ask(
    model_path: Annotated[str, typer.Argument(help="Model folder.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    store: Annotated[Path, typer.Option(help="Store folder built by genlab index.")],
    k: Annotated[int, typer.Option("-k", help="Chunks to retrieve.")] = 5,
    template: Annotated[Optional[str], typer.Option(help="Built-in template (qa, context) or a Jinja2 file.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    method: Method = "hybrid",
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt through the model's chat template.")] = False,
    embedder: Embedder = None,
    adapter: Adapter = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.0,
    seed: Seed = None,
):
    """Answer a question from retrieved chunks (streams), then list the sources its [n] markers cite.

    Example: genlab ask my-model/ "What does the with statement do?" --store runs/store
    """
    import genlab
    from genlab.rag.prompts import ask as run_ask
    from genlab.rag.retrieve import Retriever

    model = genlab.load(model_path, adapters=_adapters(adapter))
    retriever = Retriever(store, embedder)
    answer = run_ask(model, retriever, question, k=k, template=template, system=system, method=method, chat=chat,
                     on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed)
    sys.stdout.write("\n")
    out.rule("sources")
    for n, h in enumerate(answer.sources, 1):
        out.print(f"[{n}]{' (cited)' if n in answer.cited else ''} {escape(h.source)}", highlight=False)
    if answer.invalid:
        out.print(f"[bold yellow]warning:[/] the answer cites {', '.join(f'[{n}]' for n in answer.invalid)}, "
                  f"which match no retrieved source (there are {len(answer.sources)})")


@rag_app.command("eval")
def rag_eval(
    store: Annotated[Path, typer.Argument(help="Store folder.")],
    qrels: Annotated[Path, typer.Option(help="JSONL of {query, relevant: [source, ...]}.")],
    embedder: Embedder = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Recall@1/5/10, MRR@10 and nDCG@10 of dense, BM25 and hybrid retrieval, side by side.

    Example: genlab rag eval runs/store --qrels tests/data/pydoc_qrels.jsonl
    """
    from genlab.evaluate.retrieval import evaluate_retrieval, read_qrels
    from genlab.rag.retrieve import Retriever

    queries = read_qrels(qrels)
    results = evaluate_retrieval(Retriever(store, embedder), queries)
    if as_json:
        print(json.dumps(results))
        return
    metrics = list(next(iter(results.values())))
    table = Table("method", *metrics, title=f"{len(queries)} queries, {qrels}")
    for method, values in results.items():
        table.add_row(method, *(f"{values[m]:.3f}" for m in metrics))
    out.print(table)


FeedbackDb = Annotated[Path, typer.Option("--db", help="Feedback database written by genlab serve.")]


@app.command()
def serve(
    model_path: Annotated[str, typer.Argument(help="Model folder.")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="LoRA adapter folder, or NAME=FOLDER (repeatable; the first is the default).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="RAG store (genlab index): enables rag and the MODEL+docs models.")] = None,
    embedder: Embedder = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    db: Annotated[Path, typer.Option(help="Feedback database (every exchange and rating).")] = Path("genlab-feedback.db"),
    name: Annotated[Optional[str], typer.Option(help="Model id clients use (default: the folder name).")] = None,
    api_key: Annotated[Optional[list[str]], typer.Option("--api-key", help="Accepted bearer key, or USER=KEY (repeatable). Prefer --api-keys-file.")] = None,
    api_keys_file: Annotated[Optional[Path], typer.Option(help="Keys file from genlab keys create (hashed keys).")] = None,
    engine: Annotated[str, typer.Option(help="batch (continuous batching) | sequential (transformers generate per request).")] = "batch",
    slots: Annotated[int, typer.Option(help="Requests decoded together at most.")] = 16,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for decoding (default: all cores but one; one is left to HTTP).")] = None,
    max_queue: Annotated[int, typer.Option(help="Waiting requests beyond which the server answers 503.")] = 64,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="Allow browser pages from this origin (repeatable; default: CORS off).")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="Version registry (genlab improve writes it): serve its promoted version and switch when it changes.")] = None,
    reward_model: Annotated[Optional[Path], typer.Option(help="Reward model folder for best_of (default: the serving version's).")] = None,
    improve_every: Annotated[Optional[int], typer.Option(help="Run genlab improve in the background after every N new feedback rows (promotes only winners).")] = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
):
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models),
    feedback API (/v1/feedback) and web UI (/), recording every exchange in --db.

    Example: genlab serve my-model/ --adapter stats=runs/sft/adapter --store runs/store --port 8000
    """
    import genlab
    from genlab.serve.app import ServeConfig
    from genlab.serve.app import serve as run_server

    model = genlab.load(model_path, dtype=dtype, device=device, adapters=_adapters(adapter))
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    config = ServeConfig(name=name, engine=engine, slots=slots, max_queue=max_queue, threads=threads, db=db, store=store,
                         embedder=embedder, api_keys=api_key or [], api_keys_file=api_keys_file,
                         cors_origins=cors_origin or [], registry=registry, reward_model=reward_model,
                         improve_every=improve_every)
    err.print(f"genlab: serving {escape(str(model_path))} on http://{host}:{port} (UI at /, API at /v1, feedback in {db})")
    run_server(model, config, host=host, port=port)


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Argument(help="Who the key is for (recorded with their feedback).")],
    file: Annotated[Path, typer.Option("--file", help="Keys file (created if missing; holds only hashes).")],
):
    """Create an API key: its hash is appended to --file, the key is printed once.

    Example: genlab keys create alice --file keys.txt && genlab serve my-model/ --api-keys-file keys.txt
    """
    from genlab.serve.auth import create_key

    print(create_key(user, file))


@feedback_app.command("export")
def feedback_export(
    out_file: Annotated[Path, typer.Argument(help="JSONL file to write.")],
    db: FeedbackDb = Path("genlab-feedback.db"),
    format: Annotated[str, typer.Option("--format", help="dpo (preference pairs) | kto (rated answers) | sft (corrections, liked answers).")] = "dpo",
):
    """Write recorded feedback as a TRL-convention dataset.

    Example: genlab feedback export prefs.jsonl --db genlab-feedback.db --format dpo
    """
    from genlab.feedback.store import FeedbackStore

    with FeedbackStore(_existing(db)) as store:
        rows = store.export(format, out_file)
    err.print(f"wrote {rows} {format} rows to {escape(str(out_file))}")


@feedback_app.command("list")
def feedback_list(
    db: FeedbackDb = Path("genlab-feedback.db"),
    limit: Annotated[int, typer.Option(help="Rows to show (newest first).")] = 20,
):
    """Show the newest feedback with the answers it is about.

    Example: genlab feedback list --db genlab-feedback.db
    """
    from genlab.feedback.store import FeedbackStore

    with FeedbackStore(_existing(db)) as store:
        rows = store.list_feedback(limit=limit)
        table = Table("id", "completion", "rating", "correction", "preferred/rejected", "comment",
                      title=f"{store.count_feedback()} feedback rows, {store.count_completions()} completions")
    for r in rows:
        pair = f"{r['preferred']} > {r['rejected']}" if r.get("preferred") else ""
        rating = "" if r.get("rating") is None else f"{r['rating']} ({r.get('rating_scale')})"
        table.add_row(str(r["id"]), r["completion_id"], rating, escape((r.get("correction") or "")[:60]), pair,
                      escape((r.get("comment") or "")[:40]))
    out.print(table)


RegistryDb = Annotated[Optional[Path], typer.Option("--registry", help="Version registry (default: registry.db beside --feedback).")]
FeedbackFile = Annotated[Path, typer.Option("--feedback", help="Feedback database written by genlab serve.")]


def _registry_path(registry: Optional[Path], feedback: Path) -> Path:
    return registry or feedback.with_name("registry.db")


@app.command()
def improve(
    model_path: Annotated[str, typer.Argument(help="Base model folder (the one genlab serve serves).")],
    feedback: FeedbackFile = Path("genlab-feedback.db"),
    registry: RegistryDb = None,
    runs: Annotated[Path, typer.Option("--out", "-o", help="Runs folder (candidate adapter, reward model, report, gate.png).")] = Path("runs/improve"),
    method: Annotated[Optional[str], typer.Option(help="dpo | kto | orpo (default: chosen from what the feedback holds).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the training feedback.")] = 3.0,
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = 5e-4,
    beta: Annotated[float, typer.Option(help="DPO/KTO beta (ORPO: odds-ratio weight).")] = 0.1,
    heldout: Annotated[float, typer.Option(help="Fraction of prompts held out for the gate.")] = 0.25,
    min_pref_accuracy: Annotated[float, typer.Option(help="Gate: held-out preference accuracy needed.")] = 0.6,
    min_win_rate: Annotated[float, typer.Option(help="Gate: reward-model win rate needed.")] = 0.55,
    max_ppl_increase: Annotated[float, typer.Option(help="Gate: largest relative rise of general perplexity.")] = 0.2,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Evaluate only; never promote.")] = False,
):
    """Tune a candidate on recorded feedback (DPO/KTO/ORPO LoRA), gate it against the serving
    version on held-out feedback, and promote it only if it wins.

    Example: genlab improve my-model/ --feedback genlab-feedback.db
    """
    from genlab.feedback.loop import GateConfig
    from genlab.feedback.loop import improve as run_improve
    from genlab.train.prefer import PreferConfig

    report = run_improve(model_path, _existing(feedback), _registry_path(registry, feedback), out_dir=runs, method=method,
                         prefer=PreferConfig(epochs=epochs, lr=lr, beta=beta), heldout_fraction=heldout,
                         gate=GateConfig(min_pref_accuracy=min_pref_accuracy, min_win_rate=min_win_rate,
                                         max_ppl_increase=max_ppl_increase),
                         promote=not no_promote, console=err)
    table = Table("metric", "value", title=f"{report.version['name']}: {'promoted' if report.promoted else 'not promoted'}")
    for key, value in report.metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)
    out.print(f"report: {report.out_dir / 'report.json'}, {report.out_dir / 'gate.png'}")


@reward_app.command("train")
def reward_train(
    model_path: Annotated[str, typer.Argument(help="Model folder the reward model starts from.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Reward model folder to write.")],
    feedback: FeedbackFile = Path("genlab-feedback.db"),
    epochs: Annotated[float, typer.Option(help="Passes over the preference pairs.")] = 3.0,
):
    """Fit a reward model (TRL RewardTrainer) on the preference pairs in the feedback database.

    Example: genlab reward train my-model/ --feedback genlab-feedback.db --out runs/reward
    """
    from genlab.feedback.store import FeedbackStore
    from genlab.train.prefer import train_reward_model

    with FeedbackStore(_existing(feedback)) as store:
        pairs = store.dataset("dpo")
    if not pairs:
        raise GenlabError(f"{feedback}: no preference pairs (A/B choices or corrections) to train on")
    train_reward_model(model_path, pairs, out_dir, epochs=epochs, console=err)
    err.print(f"reward model on {len(pairs)} pairs -> {escape(str(out_dir))}")


def _version_table(rows: list[dict], serving: int | None) -> Table:
    table = Table("version", "serving", "status", "method", "parent", "adapter", "created", "note")
    for v in rows:
        table.add_row(v["name"], "yes" if v["id"] == serving else "", v["status"], v.get("method") or "",
                      str(v.get("parent") or ""),
                      escape(str(v.get("adapter") or "(base)")), time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created"])),
                      escape((v.get("note") or "")[:80]))
    return table


@app.command()
def versions(registry: Annotated[Path, typer.Option("--registry", help="Version registry.")] = Path("registry.db")):
    """List model versions with their lineage and which one serves.

    Example: genlab versions --registry registry.db
    """
    from genlab.feedback.registry import Registry

    with Registry(_existing(registry)) as reg:
        out.print(_version_table(reg.list(), reg.serving_id()))


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Version name (v3) or number.")],
    registry: Annotated[Path, typer.Option("--registry", help="Version registry.")] = Path("registry.db"),
    force: Annotated[bool, typer.Option("--force", help="Promote even a version the gate rejected.")] = False,
):
    """Serve VERSION from now on (a running server switches between requests).

    Example: genlab promote v3 --registry registry.db
    """
    from genlab.feedback.registry import Registry

    with Registry(_existing(registry)) as reg:
        v = reg.promote(int(version) if version.isdigit() else version, note="promoted by hand", force=force)
    err.print(f"serving {v['name']}")


@app.command()
def rollback(registry: Annotated[Path, typer.Option("--registry", help="Version registry.")] = Path("registry.db")):
    """Go back to the version that served before the current one.

    Example: genlab rollback --registry registry.db
    """
    from genlab.feedback.registry import Registry

    with Registry(_existing(registry)) as reg:
        v = reg.rollback()
    err.print(f"serving {v['name']} again")


def _existing(db: Path) -> Path:
    if not db.is_file():
        raise GenlabError(f"{db}: no such database (genlab serve --db and genlab improve write them)")
    return db


if __name__ == "__main__":
    main()

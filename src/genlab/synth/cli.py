"""`genlab synth ...`: fit a table model, sample synthetic records, report on them; draft
grounded instruction pairs from a document store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from genlab.errors import InvalidParameterError

from genlab.cli_options import (
    Preset, BatchSize, Config, EvalEvery, Lr, MaxMinutes, MaxSteps, Out, Resume, TrainDevice, TrainSeed, err, out,
)

synth_app = typer.Typer(no_args_is_help=True, help="Synthetic data: fit a table model, sample records, report fidelity / utility / privacy; draft grounded Q/A pairs.")


@synth_app.command("fit")
def synth_fit(
    data: Annotated[Path, typer.Argument(help="CSV or Parquet table.")],
    out_dir: Out = None,
    config: Config = None,
    preset: Preset = None,
    base: Annotated[Optional[str], typer.Option(help="Fine-tune this foundation model (a local HF or genlab text model folder, LoRA) on the rows as GReaT text instead of training a small model from scratch.")] = None,
    permutations: Annotated[Optional[int], typer.Option(help="Random column orders per training row.")] = None,
    max_categories: Annotated[Optional[int], typer.Option(help="More distinct strings than this: a free-text column (excluded).")] = None,
    max_levels: Annotated[Optional[int], typer.Option(help="Number columns with at most this many distinct values (4+ rows each) write one token per value (0: always spell numbers).")] = None,
    dp_epsilon: Annotated[Optional[float], typer.Option(help="Train with DP-SGD to this privacy budget (one row = one person); the spent epsilon goes in genlab.json.")] = None,
    dp_delta: Annotated[Optional[float], typer.Option(help="DP delta (default 1 / (10 x rows)).")] = None,
    batch_size: BatchSize = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    lr: Lr = None,
    eval_every: EvalEvery = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    resume: Resume = False,
):
    """Learn a table from scratch: schema inferred (identifier, free-text and mixed-type columns
    excluded with a warning), rows as tokens in random column orders, a small transformer.

    Example: genlab synth fit patients.csv --out runs/synth --max-steps 800 [--dp-epsilon 8]
    """
    if base:
        from genlab.synth.text_table import fit_text_table

        if dp_epsilon is not None or config or resume:
            raise InvalidParameterError("--base fine-tunes a text model; --dp-epsilon, --config and --resume are for "
                                        "table models trained from scratch")
        options = {k: v for k, v in dict(permutations=permutations, max_categories=max_categories, max_levels=max_levels,
                                          batch_size=batch_size, max_steps=max_steps, max_minutes=max_minutes, lr=lr,
                                          eval_every=eval_every, seed=seed, device=device).items() if v is not None}
        print(fit_text_table(data, base, out_dir or "runs/synth-text", console=err, **options).model_dir)
        return
    from genlab.synth.model import fit_table

    overrides = dict(out=str(out_dir) if out_dir else None, preset=preset, permutations=permutations,
                     max_categories=max_categories, max_levels=max_levels, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
                     batch_size=batch_size, max_steps=max_steps,
                     max_minutes=max_minutes, lr=lr, eval_every=eval_every, seed=seed, device=device)
    result = fit_table(data, config_file=config, resume=resume, console=err, **overrides)
    print(result.model_dir)


@synth_app.command("sample")
def synth_sample(
    model: Annotated[str, typer.Argument(help="Table model folder (genlab synth fit).")],
    n: Annotated[int, typer.Option("-n", help="Rows to sample.")] = 1000,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="CSV or Parquet file for the rows.")] = Path("synthetic.csv"),
    where: Annotated[Optional[list[str]], typer.Option("--where", help="COLUMN=VALUE or COLUMN=LOW..HIGH (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed -> same rows.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows decoded together.")] = 1024,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    no_copies_of: Annotated[Optional[Path], typer.Option("--no-copies-of", help="A table (e.g. the training data): drawn rows equal to one of its rows are dropped and redrawn.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
):
    """Sample synthetic rows; constrained decoding makes every row respect the schema's types,
    ranges and categories (and the --where conditions).

    Example: genlab synth sample runs/synth/model -n 5000 --where sex=F --where age=40..60 --out synth.csv --no-copies-of patients.csv
    """
    import time

    from genlab.data.tables import read_table
    from genlab.fsutil import atomic_file, atomic_write_text
    from genlab.synth.model import TableModel, load_table_model

    table_model = load_table_model(model, device=device)
    excluded = read_table(no_copies_of) if no_copies_of else None
    if excluded is not None and not isinstance(table_model, TableModel):
        raise InvalidParameterError("--no-copies-of works with table models fitted from scratch (not with --base)")
    copies = {"no_copies_of": excluded} if excluded is not None else {}
    start = time.perf_counter()
    rows = table_model.sample(n, where=where, seed=seed, batch_size=batch_size, temperature=temperature, **copies)
    seconds = time.perf_counter() - start
    if excluded is not None:
        dropped = rows.attrs["copies_dropped"]
        err.print(f"dropped {dropped:,} drawn rows equal to a row of {no_copies_of} "
                  f"({dropped / (dropped + n):.1%} of draws)", highlight=False)
    if out_file.suffix == ".parquet":
        with atomic_file(out_file) as tmp:
            rows.to_parquet(tmp, index=False)
    else:
        atomic_write_text(out_file, rows.to_csv(index=False))
    out.print(f"{n:,} rows x {rows.shape[1]} columns in {seconds:.1f}s ({n / seconds:,.0f} rows/s) -> {out_file}")


@synth_app.command("report")
def synth_report(
    real: Annotated[Path, typer.Argument(help="The real training table (CSV / Parquet).")],
    synth: Annotated[Path, typer.Argument(help="The synthetic table (CSV / Parquet).")],
    holdout: Annotated[Optional[Path], typer.Option(help="Real rows never trained on (privacy and utility tests).")] = None,
    target: Annotated[Optional[str], typer.Option(help="Column to predict for the utility test (needs --holdout).")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also score independent marginals and a Gaussian copula.")] = True,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.html, report.json and the PNG plots.")] = Path("runs/synth-report"),
    seed: Annotated[int, typer.Option(help="Seed for the baselines and the pair sample.")] = 0,
):
    """Fidelity (column shapes, pair trends), utility (train on synthetic, test on real) and
    privacy (exact copies, distance to closest record, NNDR, membership-inference AUC), with
    baselines side by side.

    Example: genlab synth report train.csv synthetic.csv --holdout holdout.csv --target mdvis --out runs/report
    """
    from rich.table import Table

    from genlab.data.tables import read_table
    from genlab.errors import DataError
    from genlab.synth.report import report

    frames = [read_table(p) if p is not None else None for p in (real, synth, holdout)]
    shared = [c for c in frames[0].columns if c in frames[1].columns]
    if not shared:
        raise DataError(f"{synth}: no column in common with {real}")
    frames = [f[shared] if f is not None else None for f in frames]
    rep = report(frames[0], frames[1], frames[2], target=target, baselines=baselines, seed=seed, out=out_dir)
    keys = sorted({k for row in rep["summary"].values() for k in row})
    table = Table("measure", *rep["summary"], title=f"{synth} vs {real}")
    for key in keys:
        cells = [rep["summary"][g].get(key) for g in rep["summary"]]
        table.add_row(key, *("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells))
    out.print(table)
    out.print(f"wrote {out_dir / 'report.html'} and {out_dir / 'report.json'}")


@synth_app.command("instructions")
def synth_instructions(
    store: Annotated[Path, typer.Argument(help="Store folder built by genlab index (the documents to draft from).")],
    model: Annotated[str, typer.Option("--model", help="Model folder (genlab or Hugging Face) that drafts the pairs.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="JSONL file for the pairs; a .summary.json goes beside it.")] = Path("pairs.jsonl"),
    n: Annotated[Optional[int], typer.Option("-n", help="Chunks to sample (seeded; default: every chunk).")] = None,
    per_chunk: Annotated[int, typer.Option(help="Drafts per chunk (more than one needs a temperature > 0).")] = 1,
    seed: Annotated[int, typer.Option(help="Same seed -> same chunks and drafts.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per draft at most.")] = 160,
    batch_size: Annotated[int, typer.Option(help="Chunks prompted together.")] = 8,
    min_overlap: Annotated[float, typer.Option(help="Least fraction of the answer's content words found in its chunk.")] = 0.5,
    max_similarity: Annotated[float, typer.Option(help="Questions this similar to a kept one (word Jaccard) are dropped.")] = 0.7,
    check_retrieval: Annotated[bool, typer.Option("--check-retrieval", help="Keep only questions for which the store's retriever finds their chunk.")] = False,
    retrieval_k: Annotated[int, typer.Option(help="Retrieved chunks --check-retrieval looks among.")] = 5,
    embedder: Annotated[Optional[str], typer.Option(help="The store's embedder folder, for --check-retrieval (default: all-MiniLM-L6-v2).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--plain", help="Prompt through the chat template, or plainly (default: chat if the model has a template).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
):
    """Draft question/answer pairs grounded in the chunks of a store (self-instruct style), drop
    unparsable, too short / long, non-question, ungrounded, near-duplicate (and, with
    --check-retrieval, unretrievable) ones, and write the rest as `messages` JSONL for genlab finetune.

    Example: genlab synth instructions runs/store --model my-chat-model/ --out runs/qa.jsonl -n 500 --per-chunk 2 --check-retrieval
    """
    from rich.markup import escape
    from rich.table import Table

    from genlab.synth.instructions import DraftConfig, draft_instructions

    cfg = DraftConfig(chunks=n, per_chunk=per_chunk, seed=seed, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, min_overlap=min_overlap,
                      max_similarity=max_similarity, check_retrieval=check_retrieval, retrieval_k=retrieval_k)
    summary = draft_instructions(store, model, out_file, cfg, embedder=embedder, chat=chat, device=device,
                                 console=err).summary
    table = Table("drafts", "count", title=f"{summary['chunks']:,} chunks of {escape(str(store))}")
    table.add_row("drafted", f"{summary['drafted']:,}")
    for reason, count in summary["dropped"].items():
        table.add_row(f"dropped: {reason.replace('_', ' ')}", f"{count:,}")
    table.add_row("[bold]kept", f"[bold]{summary['kept']:,}")
    out.print(table)
    if not summary["kept"]:
        out.print("[bold yellow]warning:[/] no pair passed the filters; the summary shows a few dropped drafts per reason",
                  soft_wrap=True)
    out.print(f"{summary['kept']:,} pairs -> {escape(str(out_file))} (summary: "
              f"{escape(str(out_file.with_suffix('.summary.json')))})", highlight=False, soft_wrap=True)

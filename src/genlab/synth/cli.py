"""`genlab synth ...`: fit a table model, sample synthetic records, report on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from genlab.cli_options import (
    Preset, BatchSize, Config, EvalEvery, Lr, MaxMinutes, MaxSteps, Out, Resume, TrainDevice, TrainSeed, err, out,
)

synth_app = typer.Typer(no_args_is_help=True, help="Synthetic tables: fit a model, sample records, report fidelity / utility / privacy.")


@synth_app.command("fit")
def synth_fit(
    data: Annotated[Path, typer.Argument(help="CSV or Parquet table.")],
    out_dir: Out = None,
    config: Config = None,
    preset: Preset = None,
    permutations: Annotated[Optional[int], typer.Option(help="Random column orders per training row.")] = None,
    max_categories: Annotated[Optional[int], typer.Option(help="More distinct strings than this: a free-text column (excluded).")] = None,
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

    Example: genlab synth fit patients.csv --out runs/synth --max-steps 800
    """
    from genlab.synth.model import fit_table

    overrides = dict(out=str(out_dir) if out_dir else None, preset=preset, permutations=permutations,
                     max_categories=max_categories, batch_size=batch_size, max_steps=max_steps,
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
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
):
    """Sample synthetic rows; constrained decoding makes every row respect the schema's types,
    ranges and categories (and the --where conditions).

    Example: genlab synth sample runs/synth/model -n 5000 --where sex=F --where age=40..60 --out synth.csv
    """
    import time

    from genlab.fsutil import atomic_write_text
    from genlab.synth.model import TableModel

    start = time.perf_counter()
    rows = TableModel.load(model, device=device).sample(n, where=where, seed=seed, batch_size=batch_size,
                                                        temperature=temperature)
    seconds = time.perf_counter() - start
    if out_file.suffix == ".parquet":
        tmp = out_file.with_name(f".{out_file.name}.tmp")
        rows.to_parquet(tmp, index=False)
        tmp.replace(out_file)
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

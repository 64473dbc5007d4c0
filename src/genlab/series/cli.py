"""`genlab series ...`: pretrain, forecast, generate, finetune and eval for time series."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from genlab.cli_options import (
    Preset, BatchSize, CkptEvery, Compile, Config, EvalEvery, Lr, MaxMinutes, MaxSteps, Out, Resume, TrainDevice,
    TrainSeed, Warmup, err, out,
)
from genlab.errors import InvalidParameterError

series_app = typer.Typer(no_args_is_help=True, help="Time series as tokens: pretrain, forecast, generate, fine-tune, backtest.")

Data = Annotated[Path, typer.Option("--data", "-d", help="CSV or Parquet file with a timestamp column and value columns.")]
Column = Annotated[Optional[str], typer.Option("--column", "-c", help="Value column (needed when the file has several).")]
Columns = Annotated[Optional[list[str]], typer.Option("--column", help="Value column (repeatable; default: every numeric one).")]
Timestamp = Annotated[Optional[str], typer.Option(help="Timestamp column (default: detected by name or content).")]
Samples = Annotated[int, typer.Option("--samples", "-s", help="Sampled paths per forecast.")]
AdapterDir = Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter folder of a series fine-tune.")]
SeriesSeed = Annotated[int, typer.Option("--seed", help="Same seed -> same paths.")]
SeriesDevice = Annotated[str, typer.Option("--device", help="cpu | cuda.")]
SeriesModelArg = Annotated[str, typer.Argument(help="Series model folder (or a series fine-tune's adapter folder).")]


def _one_series(path: Path, column: str | None, timestamp: str | None):
    from genlab.series.data import read_series

    found = read_series(path, columns=[column] if column else None, timestamp=timestamp,
                        warn=lambda m: err.print(f"[yellow]note:[/] {m}"))
    if len(found) > 1:
        raise InvalidParameterError(f"{path}: several value columns ({', '.join(s.name for s in found)}); choose one "
                                    "with --column")
    return found[0]


def _model(model: str, adapter: Path | None, samples: int, seed: int, device: str, temperature: float = 1.0):
    from genlab.series.model import SeriesModel

    return SeriesModel.load(model, adapter=adapter, device=device, num_samples=samples, seed=seed, temperature=temperature)


def _train_overrides(**kw) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}


@series_app.command("pretrain")
def series_pretrain(
    out_dir: Out = None,
    config: Config = None,
    preset: Preset = None,
    bins: Annotated[Optional[int], typer.Option(help="Quantisation bins (vocabulary = bins + 3).")] = None,
    synthetic: Annotated[Optional[int], typer.Option(help="KernelSynth series to generate.")] = None,
    mixup: Annotated[Optional[int], typer.Option(help="TSMixup windows of the bundled statsmodels series.")] = None,
    center: Annotated[Optional[bool], typer.Option("--center/--no-center", help="Subtract the context mean before mean scaling (--no-center: Chronos' pure mean scaling).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="Extra CSV / Parquet series files (repeatable).")] = None,
    column: Columns = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Values per training window (context + prediction).")] = None,
    prediction_length: Annotated[Optional[int], typer.Option(help="Values after the context in each window.")] = None,
    batch_size: BatchSize = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    lr: Lr = None,
    warmup_steps: Warmup = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CkptEvery = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    compile: Compile = None,
    resume: Resume = False,
):
    """Pretrain a series model from scratch on synthetic series (KernelSynth + TSMixup); no download.

    Example: genlab series pretrain --out runs/series --max-steps 600
    Example (GPU): genlab series pretrain --out runs/series-30m --preset 30m --max-steps 20000 --batch-size 64
    """
    from genlab.series.train import pretrain_series

    overrides = _train_overrides(out=out_dir, preset=preset, bins=bins, synthetic=synthetic, mixup=mixup, center=center,
                                 data=[str(p) for p in data] if data else None, columns=column or None,
                                 seq_len=seq_len, prediction_length=prediction_length, batch_size=batch_size,
                                 max_steps=max_steps, max_minutes=max_minutes, lr=lr, warmup_steps=warmup_steps,
                                 eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, device=device,
                                 compile=compile)
    result = pretrain_series(config_file=config, resume=resume, console=err, **overrides)
    print(result.output_dir)


@series_app.command("forecast")
def series_forecast(
    model: SeriesModelArg,
    data: Data,
    horizon: Annotated[int, typer.Option("--horizon", "-H", help="Steps to forecast.")],
    column: Column = None,
    timestamp: Timestamp = None,
    samples: Samples = 100,
    adapter: AdapterDir = None,
    out_csv: Annotated[Path, typer.Option("--out", "-o", help="Forecast CSV (mean, median, quantiles 0.1-0.9).")] = Path("forecast.csv"),
    plot: Annotated[Optional[Path], typer.Option(help="Fan-chart PNG (default: beside --out).")] = None,
    seed: SeriesSeed = 0,
    device: SeriesDevice = "cpu",
):
    """Probabilistic forecast: sample many future paths, write mean/median/quantiles and a fan chart.

    Example: genlab series forecast runs/series/model --data co2.csv --column co2 --horizon 52
    """
    import pandas as pd

    from genlab.fsutil import atomic_write_text
    from genlab.series.backtest import QUANTILES
    from genlab.series.model import summarise
    from genlab.series.plots import fan_chart

    s = _one_series(data, column, timestamp)
    forecaster = _model(model, adapter, samples, seed, device)
    paths = forecaster.sample(s.values, horizon)
    fc = summarise(paths)
    future = s.future_index(horizon)
    table = pd.DataFrame({"timestamp": future, "mean": fc.mean, "median": fc.median,
                          **{f"q{q:.1f}": fc.quantiles[i] for i, q in enumerate(QUANTILES)}})
    atomic_write_text(out_csv, table.to_csv(index=False))
    png = plot or out_csv.with_suffix(".png")
    shown = min(len(s), max(3 * horizon, 60))
    fan_chart(s.index[-shown:], s.values[-shown:], future, fc, png,
              f"{s.name}: {samples} sampled paths, {horizon} steps ({forecaster.name})")
    used = min(len(s), forecaster.context_length)
    missing = int(np.isnan(s.values[-used:]).sum())
    out.print(f"{s.name}: forecast {horizon} steps from the last {used} values"
              + (f" ({missing} missing, given to the model as missing tokens)" if missing else "")
              + f"; median of the last step {fc.median[-1]:.4g} (80% band {fc.quantiles[0][-1]:.4g} .. "
              f"{fc.quantiles[-1][-1]:.4g})")
    out.print(f"wrote {out_csv} and {png}")


@series_app.command("generate")
def series_generate(
    model: SeriesModelArg,
    data: Data,
    length: Annotated[int, typer.Option("--length", "-l", help="Values to generate per series.")],
    column: Column = None,
    timestamp: Timestamp = None,
    n: Annotated[int, typer.Option("-n", help="Synthetic series to generate.")] = 5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    adapter: AdapterDir = None,
    out_csv: Annotated[Path, typer.Option("--out", "-o", help="CSV: timestamp + one column per generated series.")] = Path("generated.csv"),
    plot: Annotated[Optional[Path], typer.Option(help="PNG of the context and the paths (default: beside --out).")] = None,
    seed: SeriesSeed = 0,
    device: SeriesDevice = "cpu",
):
    """Synthetic series of a given length, continuing the context in --data (any length: the
    model's window slides).

    Example: genlab series generate runs/series/model --data co2.csv --length 520 -n 10 --out synthetic.csv
    """
    import pandas as pd

    from genlab.fsutil import atomic_write_text
    from genlab.series.plots import paths_chart

    s = _one_series(data, column, timestamp)
    forecaster = _model(model, adapter, n, seed, device, temperature)
    paths = forecaster.sample(s.values, length)
    future = s.future_index(length)
    table = pd.DataFrame({"timestamp": future, **{f"{s.name}_{i + 1}": p for i, p in enumerate(paths)}})
    atomic_write_text(out_csv, table.to_csv(index=False))
    png = plot or out_csv.with_suffix(".png")
    shown = min(len(s), max(length, 60))
    paths_chart(s.index[-shown:], s.values[-shown:], future, paths, png, f"{s.name}: {n} generated series of {length}")
    out.print(f"{n} series of {length} values after {s.name} (mean {np.nanmean(paths):.4g}, context mean "
              f"{np.nanmean(s.values[-forecaster.context_length:]):.4g}); wrote {out_csv} and {png}")


@series_app.command("finetune")
def series_finetune(
    model: Annotated[str, typer.Argument(help="Series model folder to adapt.")],
    data: Annotated[list[Path], typer.Option("--data", "-d", help="CSV / Parquet series files (repeatable).")],
    column: Columns = None,
    timestamp: Timestamp = None,
    out_dir: Out = None,
    config: Config = None,
    full: Annotated[Optional[bool], typer.Option("--full/--lora", help="Full fine-tuning instead of LoRA.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    batch_size: BatchSize = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    lr: Lr = None,
    eval_every: EvalEvery = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    resume: Resume = False,
):
    """Adapt a series model to your own series (LoRA by default, or --full), in the training loop
    of `genlab finetune` (progress, metrics, checkpoints, --resume).

    Example: genlab series finetune runs/series/model --data sensors.csv --out runs/series-ft --max-steps 200
    """
    from genlab.series.train import finetune_series

    overrides = _train_overrides(model=model, data=[str(p) for p in data], columns=column or None, timestamp=timestamp,
                                 out=out_dir, full=full, lora_r=lora_r, batch_size=batch_size, max_steps=max_steps,
                                 max_minutes=max_minutes, lr=lr, eval_every=eval_every, seed=seed, device=device)
    result = finetune_series(config_file=config, resume=resume, console=err, **overrides)
    print(result.output_dir)


@series_app.command("eval")
def series_eval(
    model: Annotated[str, typer.Argument(help="Series model folder.")],
    series: Annotated[Optional[list[str]], typer.Option("--series", help="Bundled series (repeatable; default: all of co2, elnino, sunspots, realgdp, cpi, unemp; 'none' for only --data).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="Your own CSV / Parquet series files (repeatable).")] = None,
    column: Columns = None,
    horizon: Annotated[Optional[int], typer.Option("--horizon", "-H", help="Steps per window (default: by frequency, M4 style).")] = None,
    windows: Annotated[int, typer.Option(help="Rolling-origin windows per series.")] = 3,
    samples: Samples = 100,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Also evaluate a per-series fine-tune.")] = True,
    finetune_steps: Annotated[int, typer.Option(help="Fine-tuning steps per series.")] = 100,
    arima: Annotated[bool, typer.Option("--arima/--no-arima", help="Include the ARIMA baseline.")] = True,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for backtest.json/.csv and relative.png.")] = Path("runs/series-eval"),
    seed: SeriesSeed = 0,
    device: SeriesDevice = "cpu",
):
    """Rolling-origin backtests: MASE and WQL of genlab (zero-shot, fine-tuned) against seasonal
    naive, ETS and ARIMA, with geometric means relative to seasonal naive.

    Example: genlab series eval runs/series/model --windows 3 --out runs/series-eval
    """
    from genlab.series.data import BUNDLED, bundled, read_series
    from genlab.series.evaluate import evaluate_series

    names = [] if series == ["none"] else (series or list(BUNDLED))
    chosen = bundled(names) if names else {}
    for path in data or []:
        for s in read_series(path, columns=column or None, warn=lambda m: err.print(f"[yellow]note:[/] {m}")):
            chosen[f"{path.stem}:{s.name}"] = s
    if not chosen:
        raise InvalidParameterError("no series to evaluate: choose --series and/or --data")
    result = evaluate_series(model, chosen, out_dir, horizon, windows, samples, finetune, finetune_steps, arima=arima,
                             seed=seed, device=device, console=err)
    out.print(result.table())
    out.print(f"wrote {out_dir / 'backtest.json'}, {out_dir / 'backtest.csv'} and {out_dir / 'relative.png'}")

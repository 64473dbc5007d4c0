"""Time series as tokens, measured: pretrain a series model on synthetic series, then backtest it
zero-shot and fine-tuned per series against seasonal naive, ETS and ARIMA on the bundled
statsmodels series (co2, elnino, sunspots, realgdp, cpi, unemp).

    python bench/series.py                                  # 1m model, 600 steps on CPU (~8 min on 2 cores)
    python bench/series.py --model runs/series/model        # evaluate an existing model
    python bench/series.py --preset 10m --max-steps 4000 --device cuda --batch-size 64   # GPU

The anchor is seasonal naive, measured in the same run: relative scores are geometric means over
series of error / seasonal-naive error (the Chronos / fev convention). Floors (issue 8):
zero-shot relative MASE <= 0.95 and relative WQL <= 0.85; fine-tuned better than zero-shot and
than ETS on the majority of series.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an existing series model folder (skip pretraining)")
    ap.add_argument("--out", default="runs/bench-series")
    ap.add_argument("--preset", default="1m")
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--synthetic", type=int, default=3000)
    ap.add_argument("--mixup", type=int, default=1500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=100)
    args = ap.parse_args()

    from rich.console import Console

    from genlab.series.evaluate import evaluate_series, wins
    from genlab.series.train import pretrain_series

    console = Console(stderr=True)
    out = Path(args.out)
    started = time.perf_counter()
    model, pretrain_s = args.model, 0.0
    if model is None:
        run = pretrain_series(out=str(out / "pretrain"), preset=args.preset, max_steps=args.max_steps,
                              max_minutes=args.max_minutes, batch_size=args.batch_size, synthetic=args.synthetic,
                              mixup=args.mixup, device=args.device, console=console)
        model, pretrain_s = str(run.output_dir), time.perf_counter() - started
    t0 = time.perf_counter()
    result = evaluate_series(model, out=out / "eval", windows=args.windows, num_samples=args.samples,
                             finetune_steps=args.finetune_steps, device=args.device, console=console)
    eval_s = time.perf_counter() - t0
    console.print(result.table())
    rel = result.relative()
    zs = rel["genlab-zero-shot"]
    beats = {f"{metric} vs {other}": wins(result, "genlab-finetuned", other, metric)
             for other in ("genlab-zero-shot", "ets") for metric in ("mase", "wql")}
    checks = {
        "zero-shot relative MASE <= 0.95": zs["mase"] <= 0.95,
        "zero-shot relative WQL <= 0.85": zs["wql"] <= 0.85,
        **{f"fine-tuned beats {k} on the majority": w > n / 2 for k, (w, n) in beats.items()},
    }
    summary = {"date": str(date.today()), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
               "device": args.device, "model": model, "pretrain_s": round(pretrain_s, 1), "eval_s": round(eval_s, 1),
               "windows": args.windows, "samples": args.samples, "relative": rel,
               "finetuned_wins": {k: f"{w}/{n}" for k, (w, n) in beats.items()}, "floors": checks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, scores in rel.items():
        print(f"{name:>18}: relative MASE {scores['mase']:.3f}  relative WQL {scores['wql']:.3f}")
    for k, (w, n) in beats.items():
        print(f"fine-tuned beats {k}: {w}/{n} series")
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    print(f"pretrain {pretrain_s:.0f}s, backtests {eval_s:.0f}s; summary -> {out / 'summary.json'}")


if __name__ == "__main__":
    main()

"""Synthetic tables, measured: fit a table model on 80% of statsmodels' randhie (health
insurance, 20,190 rows x 10 columns), sample as many rows as it trained on, and report
fidelity, utility and privacy against the 20% holdout, side by side with independent marginals
and a Gaussian copula; sampling speed against the 1,000 rows/s floor on this machine.

    python bench/synth.py                        # ~12 minutes on 2 cores (2,500 steps)
    python bench/synth.py --max-steps 2000 --table randhie --target mdvis
    python bench/synth.py --model runs/bench-synth/model/model   # score / time a fitted model again
    python bench/synth.py --device cuda --max-minutes 4.5 --max-steps 12000 --train-batch-size 32 --permutations 6

Floors (issue 9, randhie): shape >= 0.85, pair trends >= 0.80, utility within 5 points of real,
zero exact copies, synthetic->train DCR median >= holdout->train DCR median, membership-inference
AUC <= 0.6; sampling >= 1,000 rows/s.
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
    ap.add_argument("--table", default="randhie")
    ap.add_argument("--target", default="mdvis")
    ap.add_argument("--out", default="runs/bench-synth")
    ap.add_argument("--preset", default="1m")
    ap.add_argument("--max-steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=1024, help="rows sampled together")
    ap.add_argument("--train-batch-size", type=int, default=None, help="packed sequences per training step (SynthConfig's default)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--permutations", type=int, default=None, help="column orders per training row")
    ap.add_argument("--max-minutes", type=float, default=None, help="training stops cleanly after this long")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", help="a table model folder fitted on this split before (skips fitting)")
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console

    from genlab.data.tables import bundled_table
    from genlab.synth.baselines import GaussianCopula
    from genlab.synth.model import TableModel, fit_table
    from genlab.synth.report import report

    console = Console(stderr=True)
    out = Path(args.out)
    df = bundled_table(args.table)
    order = np.random.default_rng(0).permutation(len(df))
    cut = int(len(df) * 0.8)
    train, holdout = df.iloc[order[:cut]].reset_index(drop=True), df.iloc[order[cut:]].reset_index(drop=True)
    t0 = time.perf_counter()
    if args.model:
        model_dir, val_loss = Path(args.model), None
    else:
        tuned = {k: v for k, v in (("batch_size", args.train_batch_size), ("lr", args.lr),
                                   ("permutations", args.permutations),
                                   ("max_minutes", args.max_minutes)) if v is not None}
        run = fit_table(train, out=str(out / "model"), preset=args.preset, max_steps=args.max_steps, device=args.device,
                        console=console, **tuned)
        model_dir, val_loss = run.model_dir, run.result.val_loss
    fit_s = time.perf_counter() - t0
    model = TableModel.load(model_dir, device=args.device)
    model.sample(256, seed=99, batch_size=256)  # warm-up
    t0 = time.perf_counter()
    raw = model.sample(len(train), seed=1, batch_size=args.batch_size)
    rows_per_s = len(train) / (time.perf_counter() - t0)
    # randhie repeats itself (many people share a row), so a faithful sampler redraws training
    # rows as often as a fresh real sample would: count that base rate, then filter copies out.
    train_rows = set(model.row_texts(train))
    raw_copies = sum(t in train_rows for t in model.row_texts(raw))
    holdout_copies = sum(t in train_rows for t in model.row_texts(holdout))
    synth = model.sample(len(train), seed=1, batch_size=args.batch_size, no_copies_of=train)
    t0 = time.perf_counter()
    GaussianCopula().fit(train).sample(len(train), seed=1)
    copula_rows_per_s = len(train) / (time.perf_counter() - t0)
    cols = [c for c in train.columns if c in synth.columns]
    # Scored twice: the model's own rows (baselines beside them) and the same draw with copies of
    # training rows dropped and redrawn (--no-copies-of), which on a table that repeats itself
    # removes its most common rows.
    rep = report(train[cols], raw[cols], holdout[cols], target=args.target, out=out / "report")
    filtered = report(train[cols], synth[cols], holdout[cols], target=args.target, baselines=False,
                      out=out / "report-no-copies")["summary"]["synthetic"]
    rep["summary"]["synthetic_no_copies"] = filtered
    checks = {}
    for name in ("synthetic", "synthetic_no_copies"):
        s = rep["summary"][name]
        checks |= {
            f"{name}: shape >= 0.85": s["fidelity.shape"] >= 0.85,
            f"{name}: pair trends >= 0.80": s["fidelity.pair_trends"] >= 0.80,
            f"{name}: utility within 5 points": abs(s["utility.gap_points"]) <= 5,
            f"{name}: zero exact copies": s["privacy.exact_copies"] == 0,
            f"{name}: DCR synthetic >= holdout (medians)": s["privacy.dcr_synthetic_median"] >= s["privacy.dcr_holdout_median"],
            f"{name}: membership-inference AUC <= 0.6": s["privacy.mia_auc"] <= 0.6,
        }
    checks["sampling >= 1,000 rows/s"] = rows_per_s >= 1000
    summary = {"date": str(date.today()), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
               "table": args.table, "rows_train": len(train), "rows_holdout": len(holdout), "fit_s": round(fit_s, 1),
               "val_loss": val_loss, "rows_per_s": round(rows_per_s), "ratio_vs_floor": round(rows_per_s / 1000, 2),
               "copula_rows_per_s": round(copula_rows_per_s), "copies_before_filter": raw_copies,
               "copies_before_filter_share": round(raw_copies / len(raw), 4),
               "holdout_rows_equal_to_a_train_row_share": round(holdout_copies / len(holdout), 4),
               "copies_dropped_by_filter": synth.attrs["copies_dropped"], "summary": rep["summary"], "floors": checks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    for generator, values in rep["summary"].items():
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}
        print(generator, shown)
    print(f"exact copies before the filter: {raw_copies:,} of {len(raw):,} ({raw_copies / len(raw):.1%}); "
          f"holdout rows equal to a training row: {holdout_copies / len(holdout):.1%} (the base rate)")
    print(f"sampling: {rows_per_s:,.0f} rows/s ({rows_per_s / 1000:.2f}x the 1,000 rows/s floor; Gaussian copula "
          f"{copula_rows_per_s:,.0f} rows/s); fit {fit_s:.0f}s")
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")


if __name__ == "__main__":
    main()

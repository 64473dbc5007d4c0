"""The scene checker, measured: is it a trustworthy judge of text-to-image samples (issue 10)?

    OMP_NUM_THREADS=1 python bench/scene_checker.py                 # train (800 steps, ~2-3 min on 1 thread) and measure
    python bench/scene_checker.py --checker runs/scene-checker      # measure an existing checker

Trains the checker on train-split renders only, then scores rendered held-out-split images (caption
combinations the checker never saw) against their TRUE captions (floor: >= 0.95 compositional
accuracy) and against shuffled captions (the chance-level anchor: should be low). FID in the
checker's feature space: two independent sets of real renders (the noise floor), real vs renders
paired with shuffled captions (plain FID cannot see the mismatch; the joint FID, which adds the
caption, can), and real vs uniform noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checker", help="an existing checker folder (skip training)")
    ap.add_argument("--out", default="runs/scene-checker", help="where the trained checker and results.json go")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2000, help="images per evaluation set")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from genlab.data import scenes as S
    from genlab.evaluate.scene_checker import SceneChecker, condition_vectors, fid, joint_fid

    t0 = time.perf_counter()
    if args.checker:
        checker = SceneChecker.load(args.checker)
    else:
        checker = SceneChecker.train(steps=args.steps, seed=args.seed, batch_size=args.batch_size, progress=True)
        checker.save(args.out)
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    held, held_caps, held_specs = S.make_dataset(args.n, "heldout", seed=1001)
    held_b, _, held_specs_b = S.make_dataset(args.n, "heldout", seed=1002)
    train_imgs, _, train_specs = S.make_dataset(args.n, "train", seed=1003)
    shuffled = [held_specs[i] for i in np.random.default_rng(7).permutation(args.n)]
    results = {
        "checker": checker.meta,
        "heldout_true": checker.compositional_accuracy(held, held_specs),
        "train_true": checker.compositional_accuracy(train_imgs, train_specs),
        "heldout_shuffled": checker.compositional_accuracy(held, shuffled),
        "requirements_true": checker.requirement_accuracy(held, held_specs),
        "requirements_shuffled": checker.requirement_accuracy(held, shuffled),
    }
    by_part: dict[str, list[bool]] = {}  # accuracy per held-out kind of combination
    for spec, req in zip(held_specs, checker.check_all(held, held_specs)):
        for part in {p[0] for p in S.heldout_parts(spec)}:
            by_part.setdefault(part, []).append(all(req.values()))
    results["heldout_true_by_combination"] = {k: float(np.mean(v)) for k, v in sorted(by_part.items())}

    feats_a, feats_b = checker.features(held), checker.features(held_b)
    conds_a, conds_b = condition_vectors(held_specs), condition_vectors(held_specs_b)
    conds_b_shuffled = conds_b[np.random.default_rng(8).permutation(args.n)]
    noise = np.random.default_rng(9).integers(0, 256, size=held.shape, dtype=np.uint8)
    results["fid"] = {
        "real_vs_real": fid(feats_a, feats_b),
        "real_vs_shuffled_captions": fid(feats_a, feats_b),  # same images, other captions: plain FID is blind
        "real_vs_train_split": fid(feats_a, checker.features(train_imgs)),
        "real_vs_noise": fid(feats_a, checker.features(noise)),
    }
    results["joint_fid"] = {
        "real_vs_real": joint_fid(feats_a, conds_a, feats_b, conds_b),
        "real_vs_shuffled_captions": joint_fid(feats_a, conds_a, feats_b, conds_b_shuffled),
    }
    results["seconds"] = {"train": round(train_s, 1), "evaluate": round(time.perf_counter() - t1, 1)}

    print(f"checker: {checker.meta.get('steps')} steps on split {checker.meta.get('split')!r}, "
          f"trained in {train_s:.0f} s ({torch.get_num_threads()} thread)")
    print(f"compositional accuracy, held-out renders, true captions:     {results['heldout_true']:.3f}  (floor 0.95)")
    print(f"compositional accuracy, train-split renders, true captions:  {results['train_true']:.3f}")
    print(f"compositional accuracy, held-out renders, shuffled captions: {results['heldout_shuffled']:.3f}  (should be low)")
    print("per held-out combination:", _fmt(results["heldout_true_by_combination"]))
    print("per requirement (true):    ", _fmt(results["requirements_true"]))
    print("per requirement (shuffled):", _fmt(results["requirements_shuffled"]))
    print("FID in checker space:      ", _fmt(results["fid"], 2))
    print("joint FID (+ caption):     ", _fmt(results["joint_fid"], 2))
    print(f"time: train {results['seconds']['train']} s, evaluate {results['seconds']['evaluate']} s")
    out = Path(args.checker or args.out)
    if not args.checker:
        from genlab.fsutil import write_json

        write_json(out / "results.json", results)
        print(f"wrote {out}/ (checker.safetensors, checker.json, results.json)")


def _fmt(d: dict, digits: int = 3) -> str:
    return "  ".join(f"{k} {v:.{digits}f}" for k, v in d.items())


if __name__ == "__main__":
    main()

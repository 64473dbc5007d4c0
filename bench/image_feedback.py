"""Feedback on images, end to end: a scripted user who wants sunglasses on every cat.

    python bench/image_feedback.py --model runs/bench-image/t2i/model --checker runs/bench-image/checker
    python bench/image_feedback.py            # trains a tokenizer, a checker and a base model first (~20 min)
    python bench/image_feedback.py --model M --checker C --feedback-db OLD/feedback.db --method kto
                                              # the same user's recorded feedback (a copy), trained with KTO

1. the base text-to-image model is served (`create_app(None, ServeConfig(image_model=...))`,
   uvicorn in a thread) with a feedback database and an image registry;
2. a `SimulatedImageUser` asks for 4 images per caption (cat captions from the train split, none
   of the evaluation captions), at a low guidance that gives some variety; the scene checker
   decides whether a cat wears sunglasses (thumbs on every image) and, graded by its sunglasses
   evidence, which of the 4 is best: an A/B choice of the best over the worst when their scores
   differ by at least --margin (most requests show no sunglasses at all: at 0.05, 300 requests
   gave 17 pairs, too few for the gate; 800 requests at 0.01 give ~60);
3. `improve_images`: DPO on those pairs (LoRA) — or, with --method kto, KTO on the thumbs alone — gated on held-out feedback captions (a stable hash
   of the caption: --heldout-fraction 0.4, as the 153 distinct captions of 800 requests repeat
   and 0.25 held out only 5 of 61 pairs; the gate needs 4, the bench wants >= 10) by preference
   accuracy, the user's own criterion (win rate on fresh images) and the drift bar, promoted in
   the registry only if every bar is cleared; the running server swaps to it;
4. the sunglasses rate on evaluation captions that no feedback used, before (v1) and after (the
   candidate, promoted or not), same seeds, at the user's guidance and at guidance 1 and the model default,
   with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

EVAL_CAPTIONS = ["a cat", "a small cat next to a tree", "a large cat", "a sun right of a cat"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def feedback_captions(n: int, seed: int) -> list[str]:
    """Train-split captions with a cat that wears nothing, none of the evaluation captions."""
    from genlab.data import scenes as S

    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        scene = S.sample_scene(rng, "train")
        cats = [o for o in scene.objects if o.kind == "cat"]
        if cats and not any(o.sunglasses or o.hat for o in cats) and scene.caption not in EVAL_CAPTIONS:
            out.append(scene.caption)
    return out


def sunglasses_rate(model, judge, guidance: float, per_caption: int, seed: int) -> tuple[int, int]:
    images = model.generate(EVAL_CAPTIONS, n=per_caption, guidance=guidance, temperature=1.0, seed=seed)
    return int(sum(s >= 1 for s in judge([], images))), len(images)


def recorded(db):
    """What a recorded feedback database holds, counted like a user session's report."""
    from types import SimpleNamespace

    from genlab.feedback.store import FeedbackStore

    with FeedbackStore(db) as store:
        pairs, rated = store.image_dataset("dpo"), store.image_dataset("kto")
        images = store.count_completions()
    return SimpleNamespace(exchanges=images, ratings=len(rated), ab_choices=len(pairs), corrections=0,
                           ties=None, completion_ids=[])


def build_base(out: Path, args, console):
    """Tokenizer, checker and a small base model when not given (as bench/image.py does, smaller)."""
    from genlab.data import scenes as S
    from genlab.evaluate.scene_checker import SceneChecker
    from genlab.image.model import fit_image_model
    from genlab.image.train import train_image_tokenizer

    checker_dir = Path(args.checker) if args.checker else out / "checker"
    if not args.checker:
        SceneChecker.train(steps=800, seed=args.seed, progress=True).save(checker_dir)
    if args.model:
        return Path(args.model), checker_dir
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    if not args.tokenizer:
        images, _, _ = S.make_dataset(2000, "train", seed=args.seed + 1)
        train_image_tokenizer(images, tok_dir, steps=1500, batch_size=32, lr=3e-3, seed=args.seed, console=console)
    images, captions, _ = S.make_dataset(args.images, "train", seed=args.seed)
    fit = fit_image_model((images, captions), tok_dir, out / "t2i", preset="2m", max_steps=args.base_steps,
                          batch_size=32, lr=3e-3, max_minutes=args.base_minutes, eval_every=500, samples=0,
                          seed=args.seed, console=console)
    return fit.model_dir, checker_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-image-feedback")
    ap.add_argument("--model", help="an existing text-to-image model folder (else one is trained)")
    ap.add_argument("--checker", help="an existing scene checker folder (else one is trained)")
    ap.add_argument("--tokenizer", help="an existing image tokenizer folder, for training the base model")
    ap.add_argument("--images", type=int, default=20000, help="scenes for the base model")
    ap.add_argument("--base-steps", type=int, default=4000)
    ap.add_argument("--base-minutes", type=float, default=15.0)
    ap.add_argument("--requests", type=int, default=800, help="the user's image requests (4 images each)")
    ap.add_argument("--margin", type=float, default=0.01,
                    help="the user makes an A/B choice only when the best image's score beats the worst's by this")
    ap.add_argument("--user-guidance", type=float, default=0.5)
    ap.add_argument("--per-caption", type=int, default=200, help="evaluation images per caption and setting")
    ap.add_argument("--heldout-fraction", type=float, default=0.4,
                    help="share of the feedback captions (by a stable hash) the gate judges on and training never sees")
    ap.add_argument("--method", choices=["dpo", "kto"], default="dpo",
                    help="dpo: the A/B choices; kto: the thumbs on single images (no pairs used)")
    ap.add_argument("--feedback-db", help="reuse this feedback database (copied; its model must be --model) "
                                          "instead of running the user again")
    ap.add_argument("--epochs", type=float, help="default: 2 for dpo, image/feedback.METHOD_DEFAULTS for kto")
    ap.add_argument("--lr", type=float, help="default: image/feedback.METHOD_DEFAULTS of the method")
    ap.add_argument("--beta", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.epochs is None and args.method == "dpo":
        args.epochs = 2.0  # the gentler DPO candidate of the two measured (README)
    torch.set_num_threads(args.threads)

    from rich.console import Console

    from genlab.evaluate.scene_checker import SceneChecker
    from genlab.feedback.simulate import SimulatedImageUser, sunglasses_judge
    from genlab.fsutil import write_json
    from genlab.image.feedback import ImagePreferConfig, improve_images, load_version
    from genlab.serve.app import ServeConfig, background, create_app

    console = Console(stderr=True)
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    model_dir, checker_dir = build_base(out, args, console)
    judge = sunglasses_judge(SceneChecker.load(checker_dir))
    db, registry = out / "feedback.db", out / "image-registry.db"
    seconds = {}

    if args.feedback_db:
        shutil.copyfile(args.feedback_db, db)
    app = create_app(None, ServeConfig(image_model=model_dir, image_registry=registry, db=db, poll_seconds=0.5))
    with background(app) as url:
        t = time.perf_counter()
        if args.feedback_db:
            report = recorded(db)
        else:
            user = SimulatedImageUser(url, judge, seed=args.seed, n=4, guidance=args.user_guidance, temperature=1.0,
                                      margin=args.margin)
            report = user.session(feedback_captions(args.requests, args.seed + 5))
        seconds["feedback"] = time.perf_counter() - t
        ties = "" if report.ties is None else f" ({report.ties} requests with nothing to choose between)"
        console.print(f"user{' (recorded)' if args.feedback_db else ''}: {report.exchanges} images, {report.ratings} "
                      f"thumbs, {report.ab_choices} A/B choices{ties} in {seconds['feedback']:.0f} s")
        t = time.perf_counter()
        result = improve_images(model_dir, db, registry, out / "improve", judge=judge,
                                heldout_fraction=args.heldout_fraction,
                                judge_sampling={"guidance": args.user_guidance, "temperature": 1.0},
                                prefer=ImagePreferConfig(epochs=args.epochs, lr=args.lr, beta=args.beta, seed=args.seed),
                                method=args.method, console=console)
        seconds["improve"] = time.perf_counter() - t
        deadline = time.time() + 30
        while result.promoted and app.state.server.images.version != result.version["name"] and time.time() < deadline:
            time.sleep(0.2)
        served = app.state.server.images.version

    t = time.perf_counter()
    before = load_version(model_dir)
    after = load_version(model_dir, result.version["adapter"])
    rows = []
    for g in (args.user_guidance, 1.0, before.default_guidance):
        kb, n = sunglasses_rate(before, judge, g, args.per_caption, seed=10_000)
        ka, _ = sunglasses_rate(after, judge, g, args.per_caption, seed=10_000)
        rows.append({"guidance": g, "images": n, "before": kb, "after": ka,
                     "before_ci": wilson(kb, n), "after_ci": wilson(ka, n)})
    seconds["evaluate"] = time.perf_counter() - t
    held = result.metrics["heldout_pairs"] or result.metrics["heldout_rated"]
    used = (f"{report.ab_choices} A/B pairs (margin {args.margin:g}; {report.ab_choices - held} trained on, {held} held "
            f"out), {report.ratings} thumbs unused" if result.method == "dpo" else
            f"{report.ratings} thumbs ({result.metrics['heldout_rated']} held out; {report.ab_choices} A/B pairs unused)")
    print(f"\nimage feedback, {result.method}: {used}, from a user who wants sunglasses; "
          f"{result.version['name']} {'PROMOTED' if result.promoted else 'NOT promoted'} "
          f"(served after the swap: {served}) — {'; '.join(result.reasons)}")
    if held < 10:
        print(f"warning: only {held} held-out items; raise --requests or --heldout-fraction for a firmer gate")
    print("gate metrics: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result.metrics.items()))
    print(f"sunglasses rate on {len(EVAL_CAPTIONS)} captions no feedback used ({', '.join(EVAL_CAPTIONS)}), "
          f"{args.per_caption} images each, same seeds:")
    print(f"{'guidance':>8} | {'before (v1)':>31} | {'after (' + result.version['name'] + ')':>31}")
    for r in rows:
        b, a = r["before_ci"], r["after_ci"]
        print(f"{r['guidance']:>8g} | {r['before']:>4}/{r['images']} = {r['before'] / r['images']:.3f} "
              f"[{b[0]:.3f}, {b[1]:.3f}] | {r['after']:>4}/{r['images']} = {r['after'] / r['images']:.3f} "
              f"[{a[0]:.3f}, {a[1]:.3f}]")
    write_json(out / "results.json", {"model": str(model_dir), "args": vars(args), "user": report.__dict__ | {
        "completion_ids": len(report.completion_ids)}, "promoted": result.promoted, "reasons": result.reasons,
        "metrics": result.metrics, "rates": rows, "seconds": seconds | result.seconds})
    console.print(f"results -> {out / 'results.json'}")


if __name__ == "__main__":
    main()

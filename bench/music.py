"""Music as ABC, measured: train a tune model on the ABC corpus music21 ships (~7 minutes on one
CPU thread), score held-out tunes in bits per character against character Kneser-Ney n-grams
fitted on the same training tunes in the same run, then generate 100 tunes across keys and
meters and count how many music21 parses.

    OMP_NUM_THREADS=1 python bench/music.py                      # 2m model, ~7 minutes of training
    python bench/music.py --model runs/bench-music/model         # evaluate an existing model
    python bench/music.py --preset 10m --max-steps 20000 --device cuda --threads 8   # GPU

The anchor is the character 5-gram (Kneser-Ney) named in the model's report; orders 3-8 are shown
too, so the comparison is with the best n-gram, not a convenient one. Floor (issue 10): >= 95% of
generated tunes parse with music21 (ended by the model, one tune, printable ASCII, read by music21
without an error or a warning, at least one note). Reported beside it, for generated and for
held-out real tunes alike: the share whose bars all fit the meter (music21 did not have to split
an overfull bar), and the share whose notes music21's key finder places in the requested key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

CONDITIONS = [("D", "6/8"), ("G", "2/4"), ("A", "4/4"), ("F", "3/4"), ("Em", "6/8"), ("C", "C|"), ("Bb", "2/4"),
              ("Ador", "6/8"), ("Dmix", "4/4"), ("G", "9/8")]


def key_agreement(tune: str, score) -> bool | None:
    """Whether music21's key estimate (Krumhansl-Schmuckler) names the K: field's key; None for
    modal keys, which the major / minor estimate cannot name."""
    from genlab.music.corpus import parse_header

    k = parse_header(tune)["K"]
    mode = "minor" if k.endswith("m") else "major" if k[-1] in "ABCDEFG#b" else None
    if mode is None:
        return None
    tonic = k[:-1] if mode == "minor" else k
    est = score.analyze("key")
    return est.mode == mode and est.tonic.name.replace("-", "b") == tonic


def describe(tunes: list[str]) -> dict:
    """Parse rate, fits-the-meter rate and key agreement of canonical tunes."""
    from genlab.music.corpus import check_tune

    parsed = fits = agree = keyed = 0
    for t in tunes:
        check, score = check_tune(t, score=True)
        if check.ok:
            parsed += 1
            fits += not check.rebarred
            a = key_agreement(t, score)
            if a is not None:
                keyed += 1
                agree += a
    n = len(tunes)
    return {"tunes": n, "parse_rate": parsed / n, "fits_meter_rate": fits / n,
            "key_agreement": agree / keyed if keyed else None, "key_checked": keyed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an existing music model folder (skip training)")
    ap.add_argument("--out", default="runs/bench-music")
    ap.add_argument("--preset", default="2m")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--max-minutes", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)),
                    help="CPU threads (default: OMP_NUM_THREADS, else 1)")
    ap.add_argument("--tunes", type=int, default=100, help="generated tunes, spread over the conditions")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reference", type=int, default=200, help="held-out real tunes described for reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from rich.console import Console

    from genlab.fsutil import atomic_write_text
    from genlab.lm import load
    from genlab.music.baseline import CharNgram
    from genlab.music.codec import conditioning, music_model_spec
    from genlab.music.corpus import music21_corpus
    from genlab.music.generate import GenerationResult, generate_for, write_abc, write_midi
    from genlab.music.train import fit_context, model_bits, train_music

    console = Console(stderr=True)
    out = Path(args.out)
    t0 = time.perf_counter()
    corpus = music21_corpus(log=console.print)
    corpus_s = time.perf_counter() - t0
    train_s = 0.0
    if args.model is None:
        t0 = time.perf_counter()
        run = train_music(out=str(out), corpus=corpus, preset=args.preset, max_steps=args.max_steps,
                          max_minutes=args.max_minutes, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          device=args.device, seed=args.seed, console=console)
        train_s, model_dir, report = time.perf_counter() - t0, run.model_dir, run.report
        train, heldout = ([json.loads(line)["text"] for line in (out / "corpus" / f"{s}.jsonl").open()]
                          for s in ("train", "heldout"))  # the tunes that fit the context, as trained
    model = load(args.model or model_dir, device=args.device)
    if args.model:  # the tunes that fit this model's context whole, as training would have kept
        fitted = fit_context(corpus, model.tokenizer, model.max_seq_len, console.print)
        model_dir, report, train, heldout = Path(args.model), None, fitted.train, fitted.heldout
    held = model_bits(model, heldout)
    ngrams = {}
    for order in range(3, 9):
        t0 = time.perf_counter()
        ngrams[order] = CharNgram(order).fit(train).bits_per_char(heldout)
        console.print(f"char {order}-gram Kneser-Ney: {ngrams[order]:.3f} bits/char ({time.perf_counter() - t0:.0f}s)")

    spec = music_model_spec(model)
    per = max(1, args.tunes // len(CONDITIONS))
    conds = [conditioning(spec, k, m) for k, m in CONDITIONS]
    t0 = time.perf_counter()
    gen = generate_for(model, conds, per, seed=args.seed, temperature=args.temperature, log=console.print)
    gen_s = time.perf_counter() - t0
    summary = gen.summary()
    # the same tunes' seeds without the printable-ASCII restriction (codec.AbcAlphabet): what the
    # model does when any byte may be sampled
    unrestricted = generate_for(model, conds, per, seed=args.seed, temperature=args.temperature,
                                ascii_only=False).summary()
    t0 = time.perf_counter()
    generated = describe([t.text for t in gen.tunes])
    reference = describe(heldout[: args.reference])
    describe_s = time.perf_counter() - t0
    by_condition = {f"K:{c.key} M:{c.meter}": f"{sum(t.ok for t in gen.tunes if (t.key, t.meter) == (c.key, c.meter))}/{per}"
                    for c in conds}
    files = write_abc(gen, out / "samples.abc")
    first = next((t for t in gen.tunes if t.ok), None)
    midi = write_midi(GenerationResult([first]), out / "sample.mid")[0] if first else []

    floor = summary["parse_rate"] >= 0.95
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "threads": args.threads, "device": args.device, "model": str(model_dir),
              "corpus": {**corpus.report, "seconds": round(corpus_s, 1)},
              "training": (report or {}).get("training"), "train_s": round(train_s, 1),
              "heldout": {"tunes": len(heldout), "model_bits_per_token": held["bits_per_token"],
                          "model_bits_per_char": held["bits_per_char"], "chars_per_token": held["chars_per_token"],
                          "char_ngram_bits_per_char": ngrams, "vs_5gram": held["bits_per_char"] / ngrams[5],
                          "vs_best_ngram": held["bits_per_char"] / min(ngrams.values())},
              "generation": {**summary, "temperature": args.temperature, "by_condition": by_condition,
                             "seconds": round(gen_s, 1), "tunes_per_s": summary["tunes"] / gen_s,
                             "tokens": sum(t.tokens for t in gen.tunes)},
              "generation_any_byte": unrestricted,
              "generated": generated, "heldout_reference": reference, "describe_s": round(describe_s, 1),
              "files": [str(f) for f in files + list(midi)], "floor_parse_rate_0.95": floor}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2, default=str))

    print(f"corpus: {corpus.report['tunes_kept']:,} tunes kept of {corpus.report['tunes_found']:,} "
          f"({len(train):,} train, {len(heldout):,} held out)")
    if report:
        tr = report["training"]
        print(f"training: {tr['parameters'] / 1e6:.2f}M parameters, {tr['steps']} steps, {tr['tokens']:,} tokens in "
              f"{tr['seconds']:.0f}s ({args.threads} thread(s), {args.device})")
    print(f"held-out: model {held['bits_per_token']:.3f} bits/token = {held['bits_per_char']:.3f} bits/char "
          f"({held['chars_per_token']:.2f} chars/token)")
    print("          char n-gram (KN) bits/char: " + "  ".join(f"{o}: {b:.3f}" for o, b in ngrams.items()))
    print(f"          model / 5-gram = {held['bits_per_char'] / ngrams[5]:.3f}; model / best n-gram = "
          f"{held['bits_per_char'] / min(ngrams.values()):.3f}")
    print(f"generation: {summary['tunes']} tunes in {gen_s:.0f}s ({summary['tunes'] / gen_s:.2f} tunes/s); parse with "
          f"music21 {summary['parsed']}/{summary['tunes']} ({summary['parse_rate']:.1%}); failures "
          f"{summary['failure_reasons'] or 'none'}")
    print(f"          any byte allowed (ascii_only=False): {unrestricted['parsed']}/{unrestricted['tunes']} "
          f"({unrestricted['parse_rate']:.1%}); failures {unrestricted['failure_reasons'] or 'none'}")
    print("          per condition: " + ", ".join(f"{k} {v}" for k, v in by_condition.items()))
    for name, d in (("generated", generated), ("held-out real", reference)):
        ka = f"{d['key_agreement']:.1%} of {d['key_checked']}" if d["key_agreement"] is not None else "n/a"
        print(f"{name:>15}: parse {d['parse_rate']:.1%}, bars fit the meter {d['fits_meter_rate']:.1%}, "
              f"key finder agrees {ka}")
    print(f"{'PASS' if floor else 'FAIL'}  >= 95% of generated tunes parse with music21")
    print(f"samples -> {', '.join(result['files'])}; summary -> {out / 'summary.json'}")


if __name__ == "__main__":
    main()

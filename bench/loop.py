"""The feedback loop, proved with simulated users: feedback -> improve -> gate -> hot swap.

    python bench/loop.py                          # preference "short", 150 A/B exchanges
    python bench/loop.py --preference numbers --exchanges 300 --model runs/quickstart/pretrain/model

A scripted user with a hidden, consistent preference chats with a running `genlab serve` (in this
process, over real HTTP) and leaves A/B choices, thumbs and corrections. Then `genlab.improve`
tunes a candidate (DPO on the A/B pairs), gates it against the serving version on held-out
feedback and promotes it; the server picks it up without restart. On fresh prompts never used
for feedback, the user's own preference judges the promoted version against the previous one:
the win rate must be >= 70%. A second run with a deliberately mislabelled user (every choice
a coin toss) must be rejected by the gate. Printed: the time from the last feedback to the
promoted version being served, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prompts(n: int, offset: int = 0) -> list[str]:
    topics = ["the ocean", "sea ice", "CO2 records", "blood pressure", "heart rate", "stock returns", "inflation",
              "rainfall", "the sunspot cycle", "river floods", "wine acidity", "tumour size", "patient age"]
    forms = ["Tell me about {}.", "What do we know about {}?", "Explain {} briefly.", "Describe {} in detail.",
             "Summarise the data on {}.", "Why does {} matter?"]
    return [forms[(i // len(topics)) % len(forms)].format(topics[i % len(topics)]) + f" (#{i})"
            for i in range(offset, offset + n)]


def run(model_dir: Path, root: Path, taste: str, exchanges: int, mislabelled: bool, eval_prompts: int, max_tokens: int,
        console) -> dict:
    import genlab
    from genlab.feedback.loop import improve
    from genlab.feedback.simulate import SimulatedUser, win_rate
    from genlab.serve.app import ServeConfig, background, create_app
    from genlab.train.prefer import PreferConfig

    root.mkdir(parents=True, exist_ok=True)
    model = genlab.load(model_dir)
    config = ServeConfig(name="m", db=root / "feedback.db", registry=root / "registry.db", poll_seconds=0.2)
    app = create_app(model, config)
    with background(app) as url:
        user = SimulatedUser(url, "m", taste, seed=1, max_tokens=max_tokens, mislabelled=mislabelled)
        t0 = time.perf_counter()
        report = user.session(prompts(exchanges))
        feedback_s = time.perf_counter() - t0
        console.print(f"{'mislabelled ' if mislabelled else ''}user '{taste}': {report.ab_choices} A/B choices, "
                      f"{report.ratings} ratings, {report.corrections} corrections ({report.ties} ties) in {feedback_s:.0f}s")
        t0 = time.perf_counter()
        result = improve(model_dir, root / "feedback.db", root / "registry.db", out_dir=root / "improve",
                         prefer=PreferConfig(epochs=3, lr=5e-4, batch_size=8), console=console)
        served_s = None
        if result.promoted:
            import httpx

            while httpx.get(url + "/health").json()["version"] != result.version["name"]:
                time.sleep(0.05)
            served_s = time.perf_counter() - t0
        if not result.promoted:  # judge the rejected candidate too: load its adapter by hand
            app.state.server.worker.load_adapter(result.version["adapter"], result.version["name"]).result()
        fresh = prompts(eval_prompts, offset=100_000)  # never seen in feedback
        answers = {}
        for adapter in ("base", result.version["name"]):
            outs = []
            for i, p in enumerate(fresh):
                body = {"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                        "temperature": 1.0, "seed": 10_000 + i, "adapter": adapter}
                r = user.http.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise SystemExit(f"{adapter}: HTTP {r.status_code}: {r.text[:500]}")
                outs.append(r.json()["choices"][0]["message"]["content"])
            answers[adapter] = outs
        wins, decided = win_rate(taste, answers[result.version["name"]], answers["base"])
    return {"preference": taste, "mislabelled": mislabelled, "ab_choices": report.ab_choices, "ratings": report.ratings,
            "corrections": report.corrections, "promoted": result.promoted, "reasons": result.reasons,
            "metrics": result.metrics, "method": result.method, "improve_seconds": result.seconds,
            "feedback_to_served_s": served_s, "fresh_prompt_win_rate": wins, "decided": decided,
            "gate_png": str(result.out_dir / "gate.png")}


def main():
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a random 2m-preset model)")
    parser.add_argument("--preference", default="short", help="short | numbers | term:WORD")
    parser.add_argument("--exchanges", type=int, default=150, help="A/B exchanges (two answers each)")
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    console = Console()
    root = args.out or Path(tempfile.mkdtemp(prefix="genlab-loop-bench-"))
    if args.model:
        model_dir = Path(args.model)
    else:
        from serve import make_model

        model_dir = make_model(root / "model-src", preset="2m")
    results = [run(model_dir, root / name, args.preference, args.exchanges, mislabelled, args.eval_prompts, args.max_tokens, console)
               for name, mislabelled in (("honest", False), ("mislabelled", True))]
    print(f"\n# feedback loop — {date.today()} — {platform.machine()} CPU, {os.cpu_count()} cores — "
          f"{args.model or 'random 2m model'}, preference '{args.preference}', {args.exchanges} A/B exchanges")
    for r in results:
        m = r["metrics"]
        print(f"{'mislabelled' if r['mislabelled'] else 'honest':12} {r['method']}: "
              f"{'PROMOTED' if r['promoted'] else 'rejected'}; pref accuracy {m.get('pref_accuracy', float('nan')):.2f}, "
              f"RM win rate {m.get('win_rate', float('nan')):.2f}, general ppl {m['general_ppl_change']:+.1%}; "
              f"fresh-prompt win rate by the user's own preference {r['fresh_prompt_win_rate']:.2f} ({r['decided']} decided); "
              f"improve {r['improve_seconds'].get('total_s', 0):.0f}s"
              + (f", feedback -> served {r['feedback_to_served_s']:.0f}s" if r["feedback_to_served_s"] else ""))
    honest, flipped = results
    print(f"floors: honest promoted with fresh win rate >= 0.70: "
          f"{honest['promoted'] and honest['fresh_prompt_win_rate'] >= 0.7}; mislabelled rejected: {not flipped['promoted']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()

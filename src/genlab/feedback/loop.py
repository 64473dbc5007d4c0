"""The closed loop: recorded feedback -> preference tuning -> a gate -> promotion (or not).

`improve()` reads the feedback database, splits it by prompt into a training part and a held-out
part that training never sees, tunes a candidate adapter on top of the serving version
(train/prefer.py: DPO, KTO or ORPO, chosen by what the feedback holds), then compares the
candidate with the serving version on the held-out part:

- preference accuracy: the candidate's implicit reward (relative to the serving version) ranks
  the chosen answer above the rejected one; and the mean reward margin;
- win rate: answers of both versions to the held-out prompts, judged by a reward model trained
  on the same (training) feedback;
- general perplexity on held-out text the base never trained on (no collapse).

Only a candidate that clears every bar by the configured margins is promoted in the registry;
the report (report.json, gate.png) says why it was or was not. A server started with the
registry picks the promoted version up between requests.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from genlab.errors import InvalidParameterError
from genlab.fsutil import save_figure, write_json


@dataclass
class GateConfig:
    min_pref_accuracy: float = 0.6  # held-out pairs whose chosen answer the candidate rewards above the rejected
    min_win_rate: float = 0.55  # reward-model-judged wins of candidate answers over serving answers (ties: half)
    max_ppl_increase: float = 0.2  # general perplexity may rise at most this much (relative)
    min_heldout: int = 4  # fewer held-out pairs than this: the gate cannot judge -> not promoted
    judge_samples: int = 1  # answers per held-out prompt and version for the win rate
    judge_max_tokens: int = 48


@dataclass
class ImproveReport:
    version: dict
    promoted: bool
    reasons: list[str]
    metrics: dict
    method: str
    out_dir: Path
    seconds: dict = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT promoted"
        return f"{self.version['name']} ({self.method}): {verdict} — " + "; ".join(self.reasons)


def prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)


def one_kind(rows: list[dict]) -> list[dict]:
    """Chat rows (message-list prompts) or plain-completion rows, whichever are more: one training
    set cannot mix the two formats."""
    chat = [r for r in rows if isinstance(r["prompt"], list)]
    return chat if len(chat) >= len(rows) - len(chat) else [r for r in rows if not isinstance(r["prompt"], list)]


def split_heldout(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a stable hash of the prompt: every answer to a prompt is on one side."""
    from genlab.data.tokens import in_heldout_split

    held = [r for r in rows if in_heldout_split(prompt_key(r), fraction)]
    return [r for r in rows if not in_heldout_split(prompt_key(r), fraction)], held


def preference_metrics(rewards: Callable, heldout_pairs: list[dict], heldout_kto: list[dict]) -> dict:
    """Held-out preference accuracy and reward margin; rewards(rows) -> [(chosen, rejected)] implicit
    rewards of the candidate over the serving version. Pairs: the chosen answer should get the
    higher reward; rated answers only: the reward should be positive for good ones, negative for bad."""
    metrics: dict = {"heldout_pairs": len(heldout_pairs), "heldout_rated": len(heldout_kto)}
    if heldout_pairs:
        got = rewards(heldout_pairs)
        metrics["pref_accuracy"] = sum(c > r for c, r in got) / len(got)
        metrics["reward_margin"] = sum(c - r for c, r in got) / len(got)
    elif heldout_kto:
        pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"]} for r in heldout_kto]
        got = rewards(pairs)
        signed = [(c > 0) == bool(r["label"]) for (c, _), r in zip(got, heldout_kto)]
        metrics["pref_accuracy"] = sum(signed) / len(signed)
        metrics["reward_margin"] = sum(c if r["label"] else -c for (c, _), r in zip(got, heldout_kto)) / len(signed)
    return metrics


def gate_metrics(model_dir, candidate: Path, current: Path | None, heldout_pairs: list[dict], heldout_kto: list[dict],
                 reward_model: Path | None, gate: GateConfig, beta: float) -> dict:
    """Candidate vs serving version on what training never saw."""
    import genlab
    from genlab.evaluate.perplexity import perplexity
    from genlab.train.finetune import general_eval_set, trainable
    from genlab.train.prefer import RewardModel, implicit_rewards

    rewards = partial(implicit_rewards, model_dir, candidate, current, beta=beta)
    metrics = preference_metrics(rewards, heldout_pairs, heldout_kto)
    model = genlab.load(model_dir, adapters={"candidate": candidate, **({"current": current} if current else {})})
    general = general_eval_set(model.tokenizer, min(256, model.max_seq_len))
    ppl = {}
    for name in ("current", "candidate"):
        with model.using(name if name == "candidate" or current else "base"):
            ppl[name] = perplexity(trainable(model.module), general, 8, 8, model.engine.backend.device)["ppl"]
    metrics["general_ppl_current"], metrics["general_ppl_candidate"] = ppl["current"], ppl["candidate"]
    metrics["general_ppl_change"] = ppl["candidate"] / ppl["current"] - 1
    prompts = list({prompt_key(r): r["prompt"] for r in heldout_pairs + heldout_kto}.values())
    if reward_model is not None and prompts:
        judge = RewardModel(reward_model)
        wins = 0.0
        answers = {}
        for name in ("candidate", "current"):
            adapter = name if name == "candidate" or current else "base"
            outs = model.generate(prompts * gate.judge_samples, adapter=adapter, max_new_tokens=gate.judge_max_tokens,
                                  temperature=0.7, seed=1234)
            answers[name] = [o.text for o in outs]
        p = prompts * gate.judge_samples
        cand, cur = judge.score(p, answers["candidate"]), judge.score(p, answers["current"])
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(cand, cur))
        metrics["win_rate"] = wins / len(cand)
        metrics["judged"] = len(cand)
    return metrics


def decide(metrics: dict, gate: GateConfig) -> tuple[bool, list[str]]:
    """Promote only if every measured bar is cleared; the reasons say which were and were not."""
    reasons, ok = [], True
    n = metrics.get("heldout_pairs", 0) or metrics.get("heldout_rated", 0)
    if n < gate.min_heldout:
        return False, [f"only {n} held-out feedback items (need {gate.min_heldout}): cannot judge"]
    acc = metrics.get("pref_accuracy")
    if acc is not None:
        passed = acc >= gate.min_pref_accuracy
        ok &= passed
        reasons.append(f"preference accuracy {acc:.2f} {'>=' if passed else '<'} {gate.min_pref_accuracy:.2f}")
    win = metrics.get("win_rate")
    if win is not None:
        passed = win >= gate.min_win_rate
        ok &= passed
        reasons.append(f"reward-model win rate {win:.2f} {'>=' if passed else '<'} {gate.min_win_rate:.2f}")
    change = metrics["general_ppl_change"]
    passed = change <= gate.max_ppl_increase
    ok &= passed
    reasons.append(f"general perplexity {change:+.1%} ({'within' if passed else 'over'} +{gate.max_ppl_increase:.0%})")
    return ok, reasons


def plot_gate(metrics: dict, gate: GateConfig, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("preference accuracy", metrics.get("pref_accuracy"), gate.min_pref_accuracy),
            ("reward-model win rate", metrics.get("win_rate"), gate.min_win_rate),
            ("general ppl ratio", metrics["general_ppl_candidate"] / metrics["general_ppl_current"],
             1 + gate.max_ppl_increase)]
    bars = [b for b in bars if b[1] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i, (name, value, bar) in enumerate(bars):
        good = value <= bar if name.startswith("general") else value >= bar
        ax.barh(i, value, color="#2e7d32" if good else "#c62828")
        ax.plot([bar, bar], [i - 0.4, i + 0.4], color="black", lw=2)
        ax.text(value, i, f" {value:.2f}", va="center")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(1.3, *(b[1] * 1.15 for b in bars)))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def settle(registry, model_dir, current: dict, adapter, method: str, data: dict, metrics: dict, gate: GateConfig,
           reasons: list[str], promoted: bool, run: Path, timings: dict, extra: dict | None = None) -> dict:
    """The end of an improve run: register the candidate (parent: the serving version), promote
    or reject it with the gate's reasons, and write run/gate.png and run/report.json (plus
    `extra`); the candidate's registry row."""
    note = "; ".join(reasons)
    version = registry.register(model_dir, adapter=adapter, parent=current["id"], method=method, data=data,
                                metrics=metrics, note=note)
    if promoted:
        version = registry.promote(version["id"], note=note)
    else:
        version = registry.reject(version["id"], note=note, metrics=metrics)
    plot_gate(metrics, gate, run / "gate.png",
              f"{version['name']} vs {current['name']}: {'promoted' if promoted else 'not promoted'}")
    write_json(run / "report.json", {"version": version, "previous": current, "promoted": promoted, "reasons": reasons,
                                     "metrics": metrics, "gate": asdict(gate), "method": method, "seconds": timings,
                                     **(extra or {})})
    return version


def improve(model_dir, feedback_db, registry_db=None, out_dir="runs/improve", method: str | None = None,
            prefer=None, gate: GateConfig | None = None, heldout_fraction: float = 0.25, reward: bool = True,
            promote: bool = True, console=None) -> ImproveReport:
    """Tune a candidate on recorded feedback, gate it against the serving version, and promote it
    in the registry (default: registry.db beside the feedback database) only if it wins."""
    from dataclasses import replace

    from genlab.feedback.registry import Registry
    from genlab.feedback.store import FeedbackStore
    from genlab.train.prefer import PreferConfig, choose_method, train_preference, train_reward_model

    gate = gate or GateConfig()
    timings: dict = {}
    start = time.perf_counter()
    with FeedbackStore(feedback_db) as store:
        dpo, kto = one_kind(store.dataset("dpo")), one_kind(store.dataset("kto"))
    dpo_train, dpo_held = split_heldout(dpo, heldout_fraction)
    kto_train, kto_held = split_heldout(kto, heldout_fraction)
    method = method or choose_method(dpo_train, kto_train)
    cfg = replace(prefer or PreferConfig(), method=method)
    rows = kto_train if method == "kto" else dpo_train
    if not rows:
        raise InvalidParameterError(f"no {method} training rows after holding out {heldout_fraction:.0%} of the prompts")
    registry = Registry(registry_db or Path(feedback_db).with_name("registry.db"))
    try:
        current = registry.ensure_initial(model_dir)
        run = Path(out_dir) / time.strftime("%Y%m%d-%H%M%S")
        if console:
            console.print(f"improve: serving {current['name']}; {len(rows)} {method} rows to train on, "
                          f"{len(dpo_held)} pairs / {len(kto_held)} rated answers held out")
        trained = train_preference(model_dir, rows, run / "candidate", cfg, adapter_dir=current["adapter"], console=console)
        timings["train_s"] = trained.seconds
        judge = None
        if reward and len(dpo_train) >= 4:
            t0 = time.perf_counter()
            judge = train_reward_model(model_dir, dpo_train, run / "reward", seed=cfg.seed)
            timings["reward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        current_adapter = Path(current["adapter"]) if current["adapter"] else None
        metrics = gate_metrics(model_dir, trained.adapter_dir, current_adapter, dpo_held, kto_held, judge, gate, cfg.beta)
        timings["gate_s"] = time.perf_counter() - t0
        ok, reasons = decide(metrics, gate)
        data = {"train_rows": len(rows), "heldout_pairs": len(dpo_held), "heldout_rated": len(kto_held),
                "heldout_fraction": heldout_fraction, "reward_model": str(judge) if judge else None}
        timings["total_s"] = time.perf_counter() - start
        version = settle(registry, model_dir, current, trained.adapter_dir, method, data, metrics, gate, reasons,
                         ok and promote, run, timings)
    finally:
        registry.close()
    report = ImproveReport(version, ok and promote, reasons, metrics, method, run, timings)
    if console:
        console.print(report.summary())
    return report

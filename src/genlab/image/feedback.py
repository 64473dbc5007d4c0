"""Preference tuning of a text-to-image model on its users' feedback (DPO or KTO on image token sequences).

A generation the server recorded is the sequence BOS caption SEP 64 image codes EOS
(image/codec.py); an A/B choice between two images of one caption is a DPO pair, a thumbs
up/down (or a star rating) on one image a KTO example. The policy is a LoRA adapter on the image
transformer (the serving version's adapter, continued, or a fresh one); the reference is the
serving version, frozen: its log-probs of every training sequence are computed once before the
first step, so no second copy of the weights is kept. A sequence's log-prob is the sum over the
image codes and EOS, under the conditional (captioned) prompt, exactly what the model is trained
on (`CaptionedCodes`). DPO's loss is -log sigmoid(beta * margin); KTO's (Ethayarajh et al. 2024)
is w - w * sigmoid(+-beta * (log pi/ref - z0)) per rated image, + for good and - for bad ones,
where the reference point z0 is the batch's mean log pi/ref of mismatched (caption, image) pairs,
clamped at 0 and not differentiated. Which method runs follows the text loop
(`train/prefer.choose_method`): DPO with enough A/B pairs, else KTO when ratings hold both
good and bad images.

`improve_images` is `feedback/loop.improve` for image models: the same held-out split by prompt,
the same gate (`loop.decide`, `loop.plot_gate`) and registry. Its bars, on held-out prompts:
preference accuracy (the candidate's implicit reward ranks the chosen image above the rejected
one), a win rate when a `judge` is given (scripted users: their own criterion on fresh images of
both versions), and the "general perplexity" of images the serving version draws for the held-out
captions, candidate vs serving (exp of the per-token KL estimate: the candidate must not forget
how to draw).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from genlab.errors import InvalidParameterError
from genlab.image.codec import EOS, PAD, SEP
from genlab.model import adapters as lora

IMAGE_REGISTRY = "image-registry.db"  # default registry beside the feedback database (the text loop's is registry.db)


METHODS = ("dpo", "kto")
# Per-method defaults of epochs and lr. A/B pairs are few (one per request at most); thumbs come on
# every image, so one pass over them is many more steps: measured with bench/image_feedback.py,
# KTO at 2 epochs / lr 2e-3 raised the sunglasses rate 0.10 -> 0.66 but moved the images so far
# (+73% perplexity) that the gate rejected it; 0.25 epochs at 1e-3 was promoted (0.10 -> 0.29).
METHOD_DEFAULTS = {"dpo": {"epochs": 4.0, "lr": 2e-3}, "kto": {"epochs": 0.25, "lr": 1e-3}}


@dataclass
class ImagePreferConfig:
    beta: float = 0.1
    lr: float | None = None  # None: METHOD_DEFAULTS of the method that runs
    epochs: float | None = None  # passes over the pairs (DPO) or rated images (KTO); None: METHOD_DEFAULTS
    batch_size: int = 16  # pairs (DPO) or rated images (KTO) per step
    lora_r: int = 8
    lora_alpha: float = 16
    seed: int = 0
    desirable_weight: float = 1.0  # KTO: weight of a good image's loss
    undesirable_weight: float | None = None  # KTO: weight of a bad one's; None: good count / bad count

    def __post_init__(self):
        if not self.beta > 0 or not (self.lr is None or self.lr > 0) or not (self.epochs is None or self.epochs > 0) \
                or self.batch_size < 1:
            raise InvalidParameterError("beta, lr and epochs must be > 0 and batch_size >= 1")

    def resolved(self, method: str) -> "ImagePreferConfig":
        """This config with epochs and lr filled in from METHOD_DEFAULTS[method] where None."""
        from dataclasses import replace

        d = METHOD_DEFAULTS[method]
        return replace(self, epochs=d["epochs"] if self.epochs is None else self.epochs,
                       lr=d["lr"] if self.lr is None else self.lr)


def load_version(base: str | Path, adapter: str | Path | None = None, device: str = "cpu"):
    """An ImageModel of a registry version: the base folder with its adapter (if any) merged in."""
    from genlab.image.model import ImageModel, load_captioner
    from genlab.model import io

    loaded = io.load(base, dtype=torch.float32, device=device)
    module = loaded.module
    if adapter is not None:
        module = lora.merge(lora.load_adapter(module, adapter, "version"), "version")
    loaded.tokenizer.image.to(device)
    return ImageModel(module, loaded.tokenizer, device, loaded.generation, captioner=load_captioner(base))


def sequences(codec, captions: list[str], token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, T], targets [B, T] with -100 outside the image codes + EOS) for
    BOS caption SEP <token_ids>; rows are right-padded (causal: padding after EOS is never seen)."""
    seqs = [codec.prompt(c) + list(ids) for c, ids in zip(captions, token_ids)]
    t = max(map(len, seqs)) - 1
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    targets = torch.full((len(seqs), t), -100, dtype=torch.long)
    for k, seq in enumerate(seqs):
        sep = seq.index(SEP)
        ids[k, :len(seq) - 1] = torch.tensor(seq[:-1])
        targets[k, sep:len(seq) - 1] = torch.tensor(seq[sep + 1:])
    return ids, targets


def sequence_logprobs(module, codec, captions: list[str], token_ids: list[list[int]]) -> torch.Tensor:
    """Sum of log p(token) over each sequence's image codes and EOS [B] (with grad if enabled)."""
    ids, targets = sequences(codec, captions, token_ids)
    device = next(module.parameters()).device
    logits = module(ids.to(device)).float()
    targets = targets.to(device)
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (picked * (targets != -100)).sum(-1)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, policy_kl: torch.Tensor, ref_kl: torch.Tensor,
             good: torch.Tensor, beta: float, w_good: float, w_bad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean KTO loss, per-image implicit rewards beta * (log pi - log ref)). policy/ref: the rated
    images under their captions; policy_kl/ref_kl: mismatched (caption, image) pairs of the batch,
    whose mean log-ratio (clamped at 0, no gradient) is the reference point z0; good: bool [B]."""
    z0 = (policy_kl - ref_kl).mean().clamp_min(0).detach()
    reward = beta * (policy - ref)
    weight = torch.where(good, torch.full_like(reward, w_good), torch.full_like(reward, w_bad))
    value = weight * torch.sigmoid(torch.where(good, reward - beta * z0, beta * z0 - reward))
    return (weight - value).mean(), reward.detach()


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DPO loss, per-pair margins of the implicit rewards beta * (log pi - log ref))."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


def tokens_of(codec, codes) -> list[int]:
    """The token ids a generation is recorded with: its image codes (shifted into the shared
    vocabulary) and EOS, i.e. the sequence after BOS caption SEP."""
    return [int(c) + codec.image_offset for c in np.asarray(codes).reshape(-1)] + [EOS]


def _check_rows(codec, rows: list[dict], method: str) -> None:
    want = codec.tokens_per_image + 1
    lo, hi = codec.image_offset, len(codec)
    keys, what = (("chosen", "rejected"), "pair") if method == "dpo" else (("completion",), "rated image")
    for i, r in enumerate(rows):
        for key in keys:
            ids = r[key]
            if len(ids) != want or ids[-1] != EOS or any(not lo <= t < hi for t in ids[:-1]):
                raise InvalidParameterError(f"{what} {i}: {key} is not {want - 1} image codes + EOS of this model")
    if method == "kto" and {bool(r["label"]) for r in rows} != {True, False}:
        raise InvalidParameterError("KTO needs both good and bad rated images (all of them are "
                                    f"{'good' if rows[0]['label'] else 'bad'})")


def train_image_preferences(model_dir, rows: list[dict], out_dir, method: str = "dpo",
                            config: ImagePreferConfig | None = None, adapter_dir=None, console=None) -> dict:
    """DPO on image pairs ({"prompt", "chosen", "rejected"}) or KTO on rated images ({"prompt",
    "completion", "label"}); writes the candidate LoRA adapter to out_dir/adapter and returns
    {"adapter", "steps", "losses", "seconds"}. `adapter_dir`: the serving version's adapter,
    continued (and, frozen, the reference); None: a fresh adapter on the base (the reference)."""
    from genlab.model import io

    if method not in METHODS:
        raise InvalidParameterError(f"image preference method must be one of {', '.join(METHODS)}, not {method!r}")
    cfg = (config or ImagePreferConfig()).resolved(method)
    if not rows:
        raise InvalidParameterError(f"no image {'preference pairs' if method == 'dpo' else 'ratings'} to train on")
    if method == "kto" and cfg.batch_size < 2:
        raise InvalidParameterError("KTO's reference point needs batch_size >= 2 (mismatched pairs within a batch)")
    start = time.perf_counter()
    loaded = io.load(model_dir, dtype=torch.float32)
    codec = loaded.tokenizer
    _check_rows(codec, rows, method)
    module = loaded.module
    if adapter_dir is not None:  # continue the serving adapter: load it trainable
        from peft import PeftConfig, PeftModel

        peft_config = PeftConfig.from_pretrained(adapter_dir)
        peft_config.task_type = None  # the generic wrapper: genlab's forward arguments pass through
        module.unpack()
        module = PeftModel.from_pretrained(module, adapter_dir, config=peft_config, is_trainable=True)
    else:
        module = lora.add_lora(module, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, seed=cfg.seed)
    module.eval()  # no dropout anywhere: the reference and the policy see the same function at step 0
    captions = [r["prompt"] for r in rows]
    if method == "dpo":
        seqs = [[r["chosen"] for r in rows], [r["rejected"] for r in rows]]
    else:  # each rated image, and the next row's image under this row's caption (KTO's reference point)
        seqs = [[r["completion"] for r in rows], [rows[(i + 1) % len(rows)]["completion"] for i in range(len(rows))]]
        good = torch.tensor([bool(r["label"]) for r in rows])
        n_good = int(good.sum())
        w_bad = cfg.undesirable_weight if cfg.undesirable_weight is not None else n_good / (len(rows) - n_good)
    with torch.no_grad():  # the reference: the serving version before any step
        ref_a, ref_b = (sequence_logprobs(module, codec, captions, s) for s in seqs)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps = max(1, int(np.ceil(cfg.epochs * len(rows) / cfg.batch_size)))
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(int(np.ceil(cfg.epochs)) + 1)])
    losses = []
    for step in range(steps):
        batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        caps = [captions[i] for i in batch]
        pol_a, pol_b = (sequence_logprobs(module, codec, caps, [s[i] for i in batch]) for s in seqs)
        if method == "dpo":
            loss, _ = dpo_loss(pol_a, pol_b, ref_a[batch], ref_b[batch], cfg.beta)
        else:
            loss, _ = kto_loss(pol_a, ref_a[batch], pol_b, ref_b[batch], good[batch], cfg.beta,
                               cfg.desirable_weight, w_bad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if console and (step + 1) % max(1, steps // 5) == 0:
            console.print(f"image {method}: step {step + 1}/{steps}, loss {np.mean(losses[-10:]):.4f}")
    adapter = lora.save_adapter(module, Path(out_dir) / "adapter", Path(model_dir).resolve(),
                                meta={"method": method, "modality": "image", "rows": len(rows),
                                      "config": asdict(cfg), "on_top_of": str(adapter_dir) if adapter_dir else None})
    return {"adapter": adapter, "steps": steps, "losses": losses, "seconds": time.perf_counter() - start}


@torch.no_grad()
def implicit_rewards(model_dir, candidate, current, rows: list[dict], beta: float) -> list[tuple[float, float]]:
    """(chosen, rejected) implicit rewards beta * (log candidate - log current) per pair."""
    cand, cur = load_version(model_dir, candidate), load_version(model_dir, current)
    out = []
    for key in ("chosen", "rejected"):
        caps, ids = [r["prompt"] for r in rows], [r[key] for r in rows]
        out.append(beta * (sequence_logprobs(cand.module, cand.codec, caps, ids)
                           - sequence_logprobs(cur.module, cur.codec, caps, ids)))
    return list(zip(out[0].tolist(), out[1].tolist()))


@torch.no_grad()
def drift_ppl(candidate_model, current_model, captions: list[str], n: int = 4, seed: int = 1234) -> tuple[float, float]:
    """(current, candidate) perplexity per image token of images the current version draws for
    `captions` (conditional, guidance 1): the candidate's is higher by exp(KL per token)."""
    codes = current_model.generate_codes(captions, n=n, guidance=1.0, temperature=1.0, seed=seed)
    caps = [c for c in captions for _ in range(n)]
    ids = [tokens_of(current_model.codec, c) for c in codes]
    per_token = len(ids[0])
    cur = sequence_logprobs(current_model.module, current_model.codec, caps, ids).mean().item() / per_token
    cand = sequence_logprobs(candidate_model.module, candidate_model.codec, caps, ids).mean().item() / per_token
    return float(np.exp(-cur)), float(np.exp(-cand))


def judge_win_rate(judge: Callable, candidate_model, current_model, captions: list[str], n: int, seed: int = 4321,
                   **sampling) -> tuple[float, int]:
    """Win rate of the candidate's images over the current version's (same seeds) under `judge`
    (captions, images) -> scores; ties count half. Returns (rate, comparisons)."""
    caps = [c for c in captions for _ in range(n)]
    a = judge(caps, candidate_model.generate(captions, n=n, seed=seed, **sampling))
    b = judge(caps, current_model.generate(captions, n=n, seed=seed, **sampling))
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / len(caps), len(caps)


def image_gate_metrics(model_dir, candidate, current, heldout: list[dict], beta: float, judge=None,
                       judge_samples: int = 8, sampling: dict | None = None, heldout_kto: list[dict] = ()) -> dict:
    """The text loop's bars (`loop.preference_metrics`) on held-out A/B pairs, else on held-out
    rated images; drift; the judge's win rate on fresh images of the held-out captions."""
    from genlab.feedback.loop import preference_metrics

    heldout_kto = list(heldout_kto)
    metrics = preference_metrics(partial(implicit_rewards, model_dir, candidate, current, beta=beta), heldout,
                                 heldout_kto)
    cand, cur = load_version(model_dir, candidate), load_version(model_dir, current)
    captions = list(dict.fromkeys(r["prompt"] for r in heldout + heldout_kto)) or [""]
    ppl_cur, ppl_cand = drift_ppl(cand, cur, captions)
    metrics["general_ppl_current"], metrics["general_ppl_candidate"] = ppl_cur, ppl_cand
    metrics["general_ppl_change"] = ppl_cand / ppl_cur - 1
    if judge is not None and (heldout or heldout_kto):
        metrics["win_rate"], metrics["judged"] = judge_win_rate(judge, cand, cur, captions, judge_samples,
                                                                **(sampling or {}))
    return metrics


def improve_images(model_dir, feedback_db, registry_db=None, out_dir="runs/improve-image",
                   prefer: ImagePreferConfig | None = None, gate=None, heldout_fraction: float = 0.25,
                   judge: Callable | None = None, judge_sampling: dict | None = None, promote: bool = True,
                   method: str | None = None, console=None):
    """`feedback/loop.improve` for a text-to-image model folder: DPO on the recorded A/B choices
    between images, or KTO on thumbs / ratings of single images (method None: DPO with enough
    pairs, else KTO, as `train/prefer.choose_method` says), the gate on held-out prompts,
    promotion in the registry (default: image-registry.db beside the feedback database) only if
    every bar is cleared."""
    from genlab.feedback.loop import GateConfig, ImproveReport, decide, settle, split_heldout
    from genlab.feedback.registry import Registry
    from genlab.feedback.store import FeedbackStore
    from genlab.train.prefer import choose_method

    cfg, gate = prefer or ImagePreferConfig(), gate or GateConfig()
    if method is not None and method not in METHODS:
        raise InvalidParameterError(f"image preference method must be one of {', '.join(METHODS)}, not {method!r}")
    start = time.perf_counter()
    with FeedbackStore(feedback_db) as store:
        pairs, rated = store.image_dataset("dpo"), store.image_dataset("kto")
    dpo_train, dpo_held = split_heldout(pairs, heldout_fraction)
    kto_train, kto_held = split_heldout(rated, heldout_fraction)
    method = method or choose_method(dpo_train, kto_train)
    train = dpo_train if method == "dpo" else kto_train
    if not train:
        what = f"{len(pairs)} A/B pairs" if method == "dpo" else f"{len(rated)} rated images"
        raise InvalidParameterError(f"no image {method} feedback to train on after holding out {heldout_fraction:.0%} "
                                    f"of the prompts ({what} in {feedback_db})")
    held_pairs, held_kto = (dpo_held, []) if method == "dpo" else ([], kto_held)
    registry = Registry(registry_db or Path(feedback_db).with_name(IMAGE_REGISTRY))
    try:
        current = registry.ensure_initial(model_dir)
        run = Path(out_dir) / time.strftime("%Y%m%d-%H%M%S")
        if console:
            console.print(f"improve (image): serving {current['name']}; {len(train)} {method} rows to train on, "
                          f"{len(held_pairs) + len(held_kto)} held out")
        trained = train_image_preferences(model_dir, train, run / "candidate", method, cfg, current["adapter"], console)
        t0 = time.perf_counter()
        metrics = image_gate_metrics(model_dir, trained["adapter"], current["adapter"], held_pairs, cfg.beta, judge,
                                     sampling=judge_sampling, heldout_kto=held_kto)
        timings = {"train_s": trained["seconds"], "gate_s": time.perf_counter() - t0}
        ok, reasons = decide(metrics, gate)
        reasons = [r.replace("reward-model win rate", "judged win rate") for r in reasons]
        data = {"train_rows": len(train), "heldout_pairs": len(held_pairs), "heldout_rated": len(held_kto),
                "heldout_fraction": heldout_fraction, "modality": "image"}
        timings["total_s"] = time.perf_counter() - start
        version = settle(registry, model_dir, current, trained["adapter"], method, data, metrics, gate, reasons,
                         ok and promote, run, timings, extra={"losses": trained["losses"]})
    finally:
        registry.close()
    report = ImproveReport(version, ok and promote, reasons, metrics, method, run, timings)
    if console:
        console.print(report.summary())
    return report

"""How well does a text-to-image model follow its captions? Scored by the scene checker.

For a split of the procedural scenes (`data/scenes.py`: "heldout" = caption combinations never
in training, "train" = combinations that were), `evaluate_image_model` draws `n_captions` scenes,
generates `n_per_caption` images for each caption and reports:

- compositional accuracy: the fraction of generated images whose every requirement (objects,
  colours, sizes, accessories, relation, nothing extra) the checker finds met; per requirement
  kind, and on the held-out split per kind of held-out combination;
- FID and joint FID (image features + the caption's vector, `scene_checker.joint_fid`) of the
  generated images against an independent set of real renders of the same split;
- anchors measured the same way: real renders of other scenes of the split with their true
  captions (the checker's ceiling and the FID noise floor); the SHUFFLED-CAPTION baseline =
  those real renders paired with the captions of other scenes (perfect images that ignore their
  caption: plain FID cannot see this, joint FID and accuracy do); the model's own images paired
  with shuffled captions; and each extra guidance scale in `compare_guidance` (0 = the
  unconditional model);
- best-of-N (`candidates`, for a model with a captioner, `image/rerank.py`): the same captions,
  each image the best of N samples by the captioner's log p(caption | image).
"""

from __future__ import annotations

import time

import numpy as np

from genlab.errors import InvalidParameterError


def _score(checker, images, specs, feats_ref, conds_ref, conds) -> dict:
    from genlab.evaluate.scene_checker import fid, joint_fid

    feats = checker.features(images)
    return {"accuracy": checker.compositional_accuracy(images, specs),
            "requirements": checker.requirement_accuracy(images, specs),
            "fid": fid(feats, feats_ref), "joint_fid": joint_fid(feats_ref, conds_ref, feats, conds)}


def _by_combination(checker, images, specs) -> dict[str, float]:
    from genlab.data.scenes import heldout_parts

    tally: dict[str, list[bool]] = {}
    for spec, req in zip(specs, checker.check_all(images, specs)):
        for part in {p[0] for p in heldout_parts(spec)}:
            tally.setdefault(part, []).append(all(req.values()))
    return {k: float(np.mean(v)) for k, v in sorted(tally.items())}


def evaluate_split(model, checker, split: str = "heldout", n_captions: int = 300, n_per_caption: int = 2,
                   guidance: float = 3.0, compare_guidance: tuple[float, ...] = (0.0,), seed: int = 0,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 128,
                   candidates: tuple[int, ...] = ()) -> dict:
    """Scores of one split (see the module docstring); `images` holds the generated images."""
    from genlab.data import scenes as S
    from genlab.evaluate.scene_checker import condition_vectors

    if n_captions < 2 or n_per_caption < 1:
        raise InvalidParameterError("n_captions must be >= 2 and n_per_caption >= 1")
    if split not in ("heldout", "train"):
        raise InvalidParameterError(f"split must be heldout or train, not {split!r}")
    offset, n = (0 if split == "heldout" else 1), n_captions * n_per_caption
    _, captions, specs = S.make_dataset(n_captions, split, seed=20_000 + 10 * seed + offset)
    real, _, real_specs = S.make_dataset(n, split, seed=30_000 + 10 * seed + offset)  # the anchors
    ref, _, ref_specs = S.make_dataset(n, split, seed=40_000 + 10 * seed + offset)  # the FID reference
    specs = [s for s in specs for _ in range(n_per_caption)]  # one per generated image
    feats_ref, conds_ref = checker.features(ref), condition_vectors(ref_specs)
    conds, real_conds = condition_vectors(specs), condition_vectors(real_specs)
    shuffle = np.random.default_rng(seed + 7).permutation(n)  # a derangement in practice (n >= 2)
    out: dict = {"split": split, "captions": n_captions, "images": n, "guidance": guidance}
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size)
    t0 = time.perf_counter()
    images = model.generate(captions, n=n_per_caption, guidance=guidance, **sampling)
    out["generate_seconds"] = round(time.perf_counter() - t0, 1)
    out["model"] = _score(checker, images, specs, feats_ref, conds_ref, conds)
    out["model_shuffled_captions"] = _score(checker, images, [specs[i] for i in shuffle], feats_ref, conds_ref,
                                            conds[shuffle])
    out["real"] = _score(checker, real, real_specs, feats_ref, conds_ref, real_conds)
    out["real_shuffled_captions"] = _score(checker, real, [real_specs[i] for i in shuffle], feats_ref, conds_ref,
                                           real_conds[shuffle])
    if split == "heldout":
        out["model"]["by_combination"] = _by_combination(checker, images, specs)
        out["real"]["by_combination"] = _by_combination(checker, real, real_specs)
    for g in compare_guidance:
        if g != guidance:
            other = model.generate(captions, n=n_per_caption, guidance=g, **sampling)
            out[f"guidance_{g:g}"] = _score(checker, other, specs, feats_ref, conds_ref, conds)
    for k in candidates:
        if k > 1:
            best = model.generate(captions, n=n_per_caption, guidance=guidance, candidates=k, **sampling)
            out[f"best_of_{k}"] = _score(checker, best, specs, feats_ref, conds_ref, conds)
            if split == "heldout":
                out[f"best_of_{k}"]["by_combination"] = _by_combination(checker, best, specs)
    out["images_array"] = images
    out["captions_list"] = [c for c in captions for _ in range(n_per_caption)]
    return out


def evaluate_image_model(model, checker, n_captions: int = 300, n_per_caption: int = 2, guidance: float = 3.0,
                         compare_guidance: tuple[float, ...] = (0.0,), splits: tuple[str, ...] = ("heldout", "train"),
                         seed: int = 0, **sampling) -> dict:
    """{split: scores} for each split (see `evaluate_split`); each split's generated images and
    their captions are under "images_array" and "captions_list" (`to_json` drops them)."""
    return {split: evaluate_split(model, checker, split, n_captions, n_per_caption, guidance, compare_guidance,
                                  seed, **sampling) for split in splits}


def summary_rows(result: dict) -> list[tuple[str, str, float, float, float]]:
    """(split, what, accuracy, FID, joint FID) rows for a printed table."""
    rows = []
    for split, r in result.items():
        named = [("model", f"model (guidance {r['guidance']:g})")]
        named += [(k, f"model (guidance {k.split('_', 1)[1]})") for k in r if k.startswith("guidance_")]
        named += [(k, f"model, best of {k.rsplit('_', 1)[1]} by its captioner") for k in r if k.startswith("best_of_")]
        named += [("model_shuffled_captions", "model images, shuffled captions"),
                  ("real", "real renders, true captions"),
                  ("real_shuffled_captions", "baseline: real renders, shuffled captions")]
        for key, label in named:
            s = r[key]
            rows.append((split, label, s["accuracy"], s["fid"], s["joint_fid"]))
    return rows


def to_json(result: dict) -> dict:
    """The result without the image arrays (for results.json)."""
    return {split: {k: v for k, v in r.items() if k not in ("images_array", "captions_list")}
            for split, r in result.items()}

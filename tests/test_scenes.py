"""Procedural captioned scenes and the scene checker (issue 10): exact captions, a held-out split
of caption combinations, renders that show what they say, and a checker that can tell."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genlab.data import scenes as S
from genlab.errors import InvalidParameterError
from genlab.evaluate.scene_checker import SceneChecker, condition_vectors, fid, joint_fid


def _specs(n: int, split: str, seed: int = 0) -> list[S.Scene]:
    rng = np.random.default_rng(seed)
    return [S.sample_scene(rng, split) for _ in range(n)]


def test_captions_are_deterministic_functions_of_specs():
    red_circle = S.Obj("circle", "red", "small", 0.25, 0.5)
    blue_square = S.Obj("square", "blue", "small", 0.75, 0.5)
    assert S.Scene((red_circle, blue_square), "left of").caption == "a red circle left of a blue square"
    assert S.Scene((S.Obj("square", "blue", "large"),), say_size=True).caption == "a large blue square"
    assert S.Scene((S.Obj("square", "orange"),)).caption == "an orange square"
    assert S.Scene((S.Obj("cat", sunglasses=True, hat=True),)).caption == "a cat wearing sunglasses and a hat"
    assert S.Scene((S.Obj("cat", x=0.3), S.Obj("tree", x=0.7)), "next to").caption == "a cat next to a tree"
    # geometry never changes the caption; the caption reads back to the same requirements
    assert S.Scene((S.Obj("circle", "red", x=0.1, scale=0.9),)).caption == S.Scene((S.Obj("circle", "red"),)).caption
    for split in ("train", "heldout"):
        specs = _specs(1500, split, seed=3)
        assert [s.caption for s in specs] == [s.caption for s in _specs(1500, split, seed=3)]
        for s in specs:
            assert s.caption == s.caption.lower() and S.parse_caption(s.caption).caption == s.caption
            assert S.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(InvalidParameterError, match="elephant"):
        S.parse_caption("a pink elephant")
    with pytest.raises(InvalidParameterError):
        S.parse_caption("a circle")  # shapes need a colour
    with pytest.raises(InvalidParameterError):
        S.sample_scene(np.random.default_rng(0), "test")


def test_heldout_combinations_never_in_train_but_their_parts_are():
    train, held = _specs(6000, "train", seed=1), _specs(2000, "heldout", seed=2)
    assert all(not S.heldout_parts(s) for s in train)
    assert all(S.heldout_parts(s) for s in held)
    assert not {s.caption for s in train} & {s.caption for s in held}
    pairs = {(o.colour, o.kind) for s in train for o in s.objects}
    arrangements = {S.arrangement(s) for s in train} - {None}
    assert not pairs & S.HELDOUT_COLOUR_SHAPES and not arrangements & S.HELDOUT_ARRANGEMENTS
    assert not any(o.sunglasses and o.hat for s in train for o in s.objects)
    # every part of every held-out combination is seen in train
    for colour, kind in S.HELDOUT_COLOUR_SHAPES:
        assert any(c == colour for c, _ in pairs) and any(k == kind for _, k in pairs)
    for first, rel, second in S.HELDOUT_ARRANGEMENTS:
        assert any(a[0] == first and a[1] == rel for a in arrangements)
        assert any(a[2] == second and a[1] == rel for a in arrangements)
        assert (second, rel, first) in arrangements  # the mirror image is seen; only this order is new
    assert any(o.sunglasses for s in train for o in s.objects) and any(o.hat for s in train for o in s.objects)
    # and the held-out split covers all three kinds of new combination
    assert {p[0] for s in held for p in S.heldout_parts(s)} == {"colour-shape", "arrangement", "accessories"}
    train_caps = {s.caption for s in train}
    assert {"a cat wearing sunglasses", "a cat wearing a hat", "a sun above a tree"} <= train_caps



def test_diverse_training_scenes_add_variety_but_no_heldout_combination():
    rng = np.random.default_rng(9)
    diverse = [S.sample_scene(rng, "train", diverse=True) for _ in range(4000)]
    assert all(not S.heldout_parts(s) for s in diverse)
    objects = [o for s in diverse for o in s.objects]
    assert {o.colour for o in objects} >= set(S.EXTRA_PALETTE)
    assert {o.kind for o in objects} >= set(S.EXTRA_SHAPES) | set(S.EXTRA_THINGS)
    assert all(o.colour is None for o in objects if o.kind in S.EXTRA_THINGS)  # things keep their own colours
    assert not {(o.colour, o.kind) for o in objects} & S.HELDOUT_COLOUR_SHAPES
    assert not any(o.sunglasses and o.hat for o in objects)
    # two accessories together, just never the held-out pair
    assert any(o.crown and o.sunglasses for o in objects) and any(o.eye_patch and o.hat for o in objects)
    assert "a cat wearing sunglasses and a bow tie" in {s.caption for s in diverse}
    # the core data is unchanged by the option's existence, and only training data may be diverse
    images, captions, _ = S.make_dataset(20, "train", seed=3)
    words = {w for c in captions for w in c.split()}
    assert not words & {*S.EXTRA_PALETTE, *S.EXTRA_SHAPES, *S.EXTRA_THINGS, "bow", "crown", "patch"}
    with pytest.raises(InvalidParameterError, match="train split"):
        S.make_dataset(2, "heldout", seed=3, diverse=True)
    for kind in (*S.EXTRA_SHAPES, *S.EXTRA_THINGS):
        picture = S.render(S.Scene((S.Obj(kind, "navy" if kind in S.EXTRA_SHAPES else None),)))
        assert picture.shape == (32, 32, 3) and (np.abs(picture.astype(int) - S.BACKGROUND).sum(-1) > 60).mean() > 0.05, kind


def _mask(image: np.ndarray, rgb) -> np.ndarray:
    return (np.abs(image.astype(int) - np.array(rgb)).sum(-1) < 60)


def test_render_shows_what_the_caption_says():
    scene = S.Scene((S.Obj("circle", "red", "small", 0.25, 0.5), S.Obj("square", "blue", "small", 0.75, 0.45)), "left of")
    image = S.render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image, S.render(scene))
    red, blue = _mask(image, S.PALETTE["red"]), _mask(image, S.PALETTE["blue"])
    assert red.sum() > 30 and blue.sum() > 30
    assert np.nonzero(red)[1].max() < np.nonzero(blue)[1].min()  # every red pixel left of every blue one
    above = S.render(S.Scene((S.Obj("triangle", "yellow", "small", 0.5, 0.25), S.Obj("circle", "purple", "small", 0.5, 0.75)), "above"))
    assert np.nonzero(_mask(above, S.PALETTE["yellow"]))[0].mean() < np.nonzero(_mask(above, S.PALETTE["purple"]))[0].mean()
    small, large = (_mask(S.render(S.Scene((S.Obj("circle", "green", size),))), S.PALETTE["green"]).sum() for size in S.SIZES)
    assert large > 2.5 * small > 0
    assert tuple(image[0, 0]) == S.BACKGROUND and S.render(scene, size=64).shape == (64, 64, 3)
    cat = S.render(S.Scene((S.Obj("cat", size="large", y=0.6, sunglasses=True, hat=True),)))
    dark = _mask(cat, (25, 25, 30))
    assert dark[:12].sum() > 20 and dark[14:22].sum() > 10  # a hat above the head, lenses across the eyes
    images, captions, specs = S.make_dataset(16, "heldout", seed=4)
    assert images.shape == (16, 32, 32, 3) and captions == [s.caption for s in specs]
    assert np.array_equal(images, S.make_dataset(16, "heldout", seed=4)[0])


def test_write_folder_writes_matched_png_txt_pairs(tmp_path):
    from PIL import Image

    out = S.write_folder(tmp_path / "scenes", 12, "train", seed=5)
    images, captions, specs = S.make_dataset(12, "train", seed=5)
    pngs, txts = sorted(out.glob("*.png")), sorted(out.glob("*.txt"))
    assert len(pngs) == 12 and [p.stem for p in pngs] == [t.stem for t in txts]
    for png, txt, image, text in zip(pngs, txts, images, captions):
        assert txt.read_text(encoding="utf-8").strip() == text
        assert np.array_equal(np.asarray(Image.open(png)), image)
    rows = [json.loads(line) for line in (out / "specs.jsonl").read_text().splitlines()]
    assert [S.Scene.from_dict(r["spec"]) for r in rows] == specs and [r["name"] for r in rows] == [p.stem for p in pngs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]  # no temporary folder left behind
    S.write_folder(out, 3, "heldout", seed=6)  # rewriting replaces the folder whole
    assert len(list(out.glob("*.png"))) == 3


def test_digits_dataset():
    images, captions, labels = S.digits_dataset()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8 and len(captions) == 1797
    assert captions[0] == f"the digit {labels[0]}" and set(labels.tolist()) == set(range(10))
    assert images[:, 0, 0].min() > 200 and images.reshape(1797, -1).min(1).max() < 100  # dark ink on white


@pytest.fixture(scope="module")
def checker():
    torch.set_num_threads(1)
    return SceneChecker.train(steps=150, seed=0, batch_size=48)


def test_checker_scores_true_captions_far_above_shuffled(checker, tmp_path):
    images, captions, specs = S.make_dataset(300, "heldout", seed=11)
    shuffled = [specs[i] for i in np.random.default_rng(0).permutation(len(specs))]
    true_acc, shuffled_acc = checker.compositional_accuracy(images, specs), checker.compositional_accuracy(images, shuffled)
    assert true_acc > 0.35 and shuffled_acc < true_acc / 3, (true_acc, shuffled_acc)
    assert checker.compositional_accuracy(images, captions) == true_acc  # captions parse to the same requirements
    per = checker.requirement_accuracy(images, specs)
    assert set(per) == {"accessory", "colour", "count", "object", "relation", "size"} and per["count"] > 0.8
    result = checker.check(images[0], captions[0])
    assert result and all(isinstance(v, bool) for v in result.values())
    assert any(k.startswith("count:") for k in result)
    loaded = SceneChecker.load(checker.save(tmp_path / "checker"))
    assert np.allclose(loaded.features(images[:20]), checker.features(images[:20]))
    assert loaded.check_all(images[:20], specs[:20]) == checker.check_all(images[:20], specs[:20])


def test_fid(checker):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3)) + np.array([2.0, 0, 0])
    assert fid(a, b) == pytest.approx(4.0, abs=0.3)  # same covariance: the squared mean distance
    real_a, _, specs_a = S.make_dataset(300, "heldout", seed=21)
    real_b, _, specs_b = S.make_dataset(300, "heldout", seed=22)
    fa, fb = checker.features(real_a), checker.features(real_b)
    assert fa.shape == (300, 8 * checker.config.width)
    assert fid(fa, fa) < 1e-6 * np.trace(np.cov(fa, rowvar=False))
    noise = checker.features(rng.integers(0, 256, size=real_a.shape, dtype=np.uint8))
    assert fid(fa, noise) > 10 * fid(fa, fb)
    ca, cb = condition_vectors(specs_a), condition_vectors(specs_b)
    mismatched = joint_fid(fa, ca, fb, cb[rng.permutation(300)])
    assert mismatched > 1.5 * joint_fid(fa, ca, fb, cb)  # the joint FID sees images that miss their captions


def test_accessory_evidence_separates_cats_with_sunglasses_and_drives_the_judge(checker):
    from genlab.feedback.simulate import sunglasses_judge

    rng = np.random.default_rng(5)

    def cats(sunglasses: bool) -> np.ndarray:
        return np.stack([S.render(S.Scene((S.Obj("cat", size="large", x=rng.uniform(0.35, 0.65),
                                                 y=rng.uniform(0.35, 0.65), sunglasses=sunglasses),)))
                         for _ in range(40)])

    worn, plain = cats(True), cats(False)
    ev_worn, ev_plain = checker.accessory_evidence(worn, "sunglasses"), checker.accessory_evidence(plain)
    assert ev_worn.shape == ev_plain.shape == (40,) and ev_worn.min() >= 0 and ev_worn.max() <= 1
    assert np.median(ev_worn) > 0.5 > np.median(ev_plain), (np.median(ev_worn), np.median(ev_plain))
    both = np.concatenate([worn, plain])
    assert np.allclose(checker.accessory_evidence(both), np.concatenate([ev_worn, ev_plain]), atol=1e-6)
    assert checker.accessory_evidence(both[:0]).shape == (0,)
    with pytest.raises(InvalidParameterError, match="accessory must be one of"):
        checker.accessory_evidence(worn, "scarf")

    scores = np.array(sunglasses_judge(checker)([], both))  # 1 + evidence where a cat wears them, else the evidence
    seen = np.array([any(d.kind == "cat" and d.sunglasses for d in found) for found in checker.detect(both)])
    np.testing.assert_allclose(scores, seen + np.concatenate([ev_worn, ev_plain]), atol=1e-6)
    assert (scores[:40] >= 1).mean() > 0.8 and (scores[40:] >= 1).mean() < 0.2

"""Best-of-N text-to-image: the captioner learns to tell captions apart, survives a save/load,
refuses bad input, and `ImageModel.generate(candidates=N)` keeps exactly the samples it ranks best
(through fit, the Python API, the CLI and the evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genlab.codecs.image import ImageCodecConfig, ImageTokenizer
from genlab.data import scenes as S
from genlab.errors import DataError, InvalidParameterError, ModelLoadError
from genlab.image.model import ImageModel, fit_image_model
from genlab.image.rerank import Captioner, train_captioner

COLOURS = {"red": (220, 30, 30), "blue": (40, 70, 225), "green": (30, 160, 50)}


def two_colour_images(n: int, seed: int):
    """Left half one colour, right half another: the caption names them in order, so a bag of
    words cannot tell "red blue" from "blue red" but a captioner can."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    images, captions = np.zeros((n, 16, 16, 3), np.uint8), []
    for i in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        images[i, :, :8], images[i, :, 8:] = COLOURS[names[a]], COLOURS[names[b]]
        captions.append([a, b])  # word ids: the colour names' indices
    return images, captions


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    images, captions = two_colour_images(256, 0)
    module, info = train_captioner(images, captions, words=3, max_steps=150, batch_size=32, lr=3e-3, seed=0)
    assert info["steps"] == 150 and info["final_loss"] < 0.2
    return module


def test_the_captioner_reads_word_order(captioner):
    images, captions = two_colour_images(64, 1)
    right = captioner.score(images, captions)
    swapped = captioner.score(images, [c[::-1] for c in captions])
    assert right.shape == (64,) and (right <= 0).all()
    assert (right > swapped).mean() == 1.0  # the same words in the wrong order lose every time
    assert np.exp(right).mean() > 0.8


def test_captioner_save_load_and_bad_input(captioner, tmp_path):
    images, captions = two_colour_images(8, 2)
    captioner.save(tmp_path / "cap")
    again = Captioner.load(tmp_path / "cap")
    assert np.array_equal(again.score(images, captions), captioner.score(images, captions))
    assert not [p for p in tmp_path.iterdir() if p.name != "cap"]  # written whole, nothing left beside it
    with pytest.raises(ModelLoadError, match="nope: not a captioner folder"):
        Captioner.load(tmp_path / "nope")
    with pytest.raises(InvalidParameterError, match="8 images but 7 captions"):
        captioner.score(images, captions[:7])
    with pytest.raises(DataError, match="uint8"):
        train_captioner(images.astype(np.float32), captions, words=3, max_steps=1)
    with pytest.raises(DataError, match="8 images and 7 captions"):
        train_captioner(images, captions[:7], words=3, max_steps=1)
    with pytest.raises(InvalidParameterError, match="max_minutes"):
        train_captioner(images, captions, words=3, max_minutes=0)
    _, info = train_captioner(images, captions, words=3, max_minutes=1e-9)  # a budget spent at once: still one step
    assert info["steps"] == 1 and np.isfinite(info["final_loss"])


@pytest.fixture(scope="module")
def reranking_fit(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rerank")
    ImageTokenizer(ImageCodecConfig(width=16, blocks=0)).save_pretrained(folder / "tok")
    images, captions, _ = S.make_dataset(96, "train", seed=5)
    fit = fit_image_model((images, captions), folder / "tok", folder / "run", preset="1m", max_steps=10, batch_size=16,
                          warmup_steps=2, eval_every=10, val_fraction=0.1, samples=0, seed=0,
                          captioner_minutes=1.0, captioner_steps=20)
    assert fit.data["captioner"]["steps"] == 20 and (fit.model_dir / "captioner" / "captioner.json").exists()
    return fit


@pytest.fixture(scope="module")
def reranking_model(reranking_fit):
    return ImageModel.load(reranking_fit.model_dir)


def test_best_of_n_keeps_the_samples_the_captioner_ranks_highest(reranking_model):
    model = reranking_model
    captions = ["a red circle", "a cat wearing sunglasses left of a sun"]
    plain = model.generate(captions, n=6, seed=4)  # 2 images x 3 candidates per caption, same seeds
    best = model.generate(captions, n=2, candidates=3, seed=4)
    assert best.shape == (4, 32, 32, 3)
    for i, caption in enumerate(captions):
        pool = plain[6 * i:6 * i + 6]
        words = [model.codec.vocab.encode(caption)] * 6
        order = np.argsort(-model.captioner.score(pool, words), kind="stable")
        assert np.array_equal(best[2 * i:2 * i + 2], pool[order[:2]])  # the two best, best first
    assert np.array_equal(model.generate(captions, n=2, candidates=3, seed=4), best)  # seeded
    with pytest.raises(InvalidParameterError, match="candidates"):
        model.generate(captions, n=2, candidates=0)
    bare = ImageModel(model.module, model.codec, pack=False)
    with pytest.raises(InvalidParameterError, match="--captioner-minutes"):
        bare.generate(captions, n=1, candidates=2)


def test_cli_and_evaluation_offer_best_of_n(reranking_fit, reranking_model, tmp_path, monkeypatch, capsys):
    import sys

    from genlab.cli import main
    from genlab.evaluate.scene_checker import CheckerConfig, CheckerNet, SceneChecker
    from genlab.image.evaluate import evaluate_image_model, summary_rows

    monkeypatch.setattr(sys, "argv", ["genlab", "image", "generate", str(reranking_fit.model_dir), "a sun", "-n", "2",
                                      "--candidates", "3", "--out", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code in (0, None) and (tmp_path / "g.png").exists()
    assert "each the best of 3 by the captioner" in capsys.readouterr().out
    torch.manual_seed(0)
    checker = SceneChecker(CheckerNet(CheckerConfig()), CheckerConfig())  # untrained: numbers, not quality
    result = evaluate_image_model(reranking_model, checker, n_captions=4, n_per_caption=1, guidance=2.0,
                                  compare_guidance=(), splits=("heldout",), candidates=(3,))
    assert "best_of_3" in result["heldout"] and "by_combination" in result["heldout"]["best_of_3"]
    assert any("best of 3 by its captioner" in row[1] for row in summary_rows(result))


def test_the_image_api_serves_best_of_n_and_records_it(reranking_fit, tmp_path):
    from fastapi.testclient import TestClient

    from genlab.feedback.store import FeedbackStore
    from genlab.serve.app import ServeConfig, create_app

    app = create_app(None, ServeConfig(image_model=reranking_fit.model_dir, db=tmp_path / "fb.db"))
    with TestClient(app) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 4, "candidates": 3})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 2 and [d["seed"] for d in data] == [4, 4]  # the request's seed reproduces them
        assert c.post("/v1/images/generations", json={"prompt": "a sun", "candidates": 17}).status_code == 422
    model = ImageModel.load(reranking_fit.model_dir)
    want = model.generate_codes(["a red circle"], n=2, seed=4, candidates=3)
    with FeedbackStore(tmp_path / "fb.db") as store:
        recs = [store.get_completion(d["id"]) for d in data]
    assert [rec["params"]["candidates"] for rec in recs] == [3, 3]
    from genlab.image.feedback import tokens_of

    assert [rec["choices"][0]["token_ids"] for rec in recs] == [tokens_of(model.codec, c) for c in want]

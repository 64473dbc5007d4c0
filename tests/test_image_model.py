"""Text-to-image as next-token prediction: the caption+image codec, training on captioned scenes,
seeded classifier-free-guided sampling through the KV cache (checked step by step against a
plain forward pass), model folders, `genlab image train` / `generate` end to end, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genlab.codecs.image import ImageCodecConfig, ImageTokenizer
from genlab.data import scenes as S
from genlab.errors import DataError, GenlabError, InvalidParameterError
from genlab.image.codec import BOS, EOS, SEP, CaptionVocab, TextImageCodec
from genlab.image.model import CaptionedCodes, ImageModel, fit_image_model
from genlab.model import io


def genlab(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genlab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def image_tok_dir(tmp_path_factory):
    """A small untrained image tokenizer: its codes are as valid as a trained one's."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("imgtok") / "tok"
    ImageTokenizer(ImageCodecConfig(width=16, blocks=0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scenes():
    return S.make_dataset(160, "train", seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_tok_dir, scenes):
    images, captions, _ = scenes
    out = tmp_path_factory.mktemp("t2i") / "run"
    return fit_image_model((images, captions), image_tok_dir, out, preset="1m", max_steps=40, batch_size=16, lr=3e-3,
                           warmup_steps=5, eval_every=20, val_fraction=0.1, samples=0, seed=0)


@pytest.fixture(scope="module")
def model(trained):
    return ImageModel.load(trained.model_dir)


# --- the codec -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec(image_tok_dir, scenes):
    return TextImageCodec(CaptionVocab.train(scenes[1]), ImageTokenizer.from_folder(image_tok_dir))


def test_codec_round_trip_and_layout(codec, scenes):
    _, captions, _ = scenes
    words = {w for c in captions for w in c.split()}
    assert len(codec.vocab) == len(words)
    assert len(codec) == 4 + len(words) + 1000 and codec.image_offset == 4 + len(words)
    for c in captions[:50]:  # one token per word
        assert len(codec.caption_ids(c)) == len(c.split())
    codes = np.random.default_rng(0).integers(0, 1000, size=64)
    ids = codec.encode(captions[0], codes.reshape(8, 8))
    assert ids[0] == BOS and ids[-1] == EOS and ids[len(captions[0].split()) + 1] == SEP
    assert all(codec.text_offset <= i < codec.image_offset for i in ids[1:ids.index(SEP)])
    assert all(codec.image_offset <= i < len(codec) for i in ids[ids.index(SEP) + 1:-1])
    caption, back = codec.decode(ids)
    assert caption == captions[0] and np.array_equal(back, codes)
    assert codec.prompt("") == codec.prompt(None) == [BOS, SEP]  # the unconditional prompt
    assert codec.caption_ids("A  Red CIRCLE") == codec.caption_ids("a red circle")  # normalised
    assert codec.vocab.unknown("a zebra, and a red circle") == ["zebra", ",", "and"]
    assert codec.caption_ids("a zebra, and a red circle") == codec.caption_ids("a a red circle")  # left out
    with pytest.raises(InvalidParameterError):
        codec.encode("a red circle", codes[:10])
    with pytest.raises(InvalidParameterError):
        codec.encode("a red circle", codes + 1000)


def test_padding_is_never_attended_to(codec):
    ids = torch.tensor([[0, 0, BOS, codec.text_offset, SEP, codec.image_offset]])
    valid = ids != 0
    mask = codec.attention_mask(ids, valid)[0, 0]
    assert mask.shape == (6, 6)
    assert mask[1].nonzero().flatten().tolist() == [1]  # a pad query: itself only
    for i in range(2, 6):
        assert mask[i].nonzero().flatten().tolist() == list(range(2, i + 1))  # causal over the real tokens


def test_rows_mask_everything_but_image_codes_and_dropout_is_seeded(codec):
    caps = [codec.caption_ids("a red circle"), codec.caption_ids("a tree")]
    codes = np.arange(128).reshape(2, 64)
    data = CaptionedCodes(caps, codes, 3 + 64 + 2, codec.image_offset, dropout=0.5, views=50, seed=1)
    assert len(data) == 100
    batch = data.get(np.arange(100))
    ids, targets = batch["input_ids"].numpy(), batch["targets"].numpy()
    assert set(batch) == {"input_ids", "targets"}  # plain causal attention: padding only after EOS
    for row in range(100):
        seq = data.sequence(row)
        supervised = targets[row][targets[row] != -100]
        assert list(supervised) == seq[seq.index(SEP) + 1:]  # the 64 codes and EOS, nothing else
        assert list(ids[row][: len(seq) - 1]) == seq[:-1] and (ids[row][len(seq) - 1:] == 0).all()
        assert seq[1:seq.index(SEP)] in ([], caps[row % 2])
    dropped = np.mean([data.sequence(r)[1] == SEP for r in range(100)])
    assert 0.3 < dropped < 0.7
    again = CaptionedCodes(caps, codes, 69, codec.image_offset, dropout=0.5, views=50, seed=1)
    assert all(data.sequence(r) == again.sequence(r) for r in range(100))


# --- training -----------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_writes_a_model_folder(trained):
    assert trained.result.val_loss < trained.val_loss_before - 0.5
    assert trained.val_loss_before > 6.0  # ~ln(vocabulary) at initialisation
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "caption_tokenizer/caption_vocab.json"):
        assert (trained.out / name).exists(), name
    loaded = io.load(trained.model_dir)
    assert isinstance(loaded.tokenizer, TextImageCodec)
    assert loaded.meta["codec"]["type"] == "text-image" and loaded.generation == {"guidance": 2.0, "temperature": 0.8}
    assert (trained.model_dir / "image_tokenizer" / "image_codec.safetensors").exists()


def test_resume_continues_onto_the_same_weights(tmp_path, image_tok_dir, scenes):
    import shutil

    from safetensors.torch import load_file

    images, captions, _ = scenes
    kw = dict(preset="1m", max_steps=6, batch_size=8, warmup_steps=2, eval_every=3, checkpoint_every=3,
              keep_checkpoints=5, samples=0, seed=4)
    first = fit_image_model((images[:64], captions[:64]), image_tok_dir, tmp_path / "run", **kw)
    whole = load_file(first.model_dir / "model.safetensors")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000006")  # as if killed after step 3's checkpoint
    shutil.rmtree(first.model_dir)
    with pytest.raises(GenlabError, match="--resume"):
        fit_image_model((images[:64], captions[:64]), image_tok_dir, tmp_path / "run", **kw)
    again = fit_image_model((images[:64], captions[:64]), image_tok_dir, tmp_path / "run", resume=True, **kw)
    resumed = load_file(again.model_dir / "model.safetensors")
    assert again.result.step == 6 and all(torch.equal(whole[k], resumed[k]) for k in whole)


# --- generation ---------------------------------------------------------------------------------
def test_generation_is_seeded_and_shaped(model):
    caps = ["a red circle", "a cat wearing sunglasses"]
    a = model.generate(caps, n=3, seed=5, batch_size=4)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    codes = model.generate_codes(caps, n=3, seed=5, batch_size=2)
    assert codes.shape == (6, 64) and codes.min() >= 0 and codes.max() < 1000
    assert np.array_equal(codes, model.generate_codes(caps, n=3, seed=5, batch_size=6))  # batch-independent
    assert np.array_equal(codes[3:], model.generate_codes(caps[1:], n=3, seed=5))  # neighbour-independent
    assert not np.array_equal(codes, model.generate_codes(caps, n=3, seed=6))
    # a repeated caption gets new samples, the same ones as asking for more of it at once
    assert np.array_equal(model.generate_codes([caps[0], caps[0]], n=2, seed=1), model.generate_codes(caps[0], n=4, seed=1))


def test_guidance_zero_is_unconditional_and_guidance_changes_samples(model):
    caps = ["a red circle left of a blue square", "a tree"]
    uncond = model.generate_codes(caps, n=2, guidance=0.0, seed=2)
    assert np.array_equal(uncond[:2], model.generate_codes([""], n=2, guidance=1.0, seed=2))
    assert np.array_equal(uncond[2:], model.generate_codes([""], n=2, guidance=1.0, seed=2))
    cond = model.generate_codes(caps, n=2, guidance=1.0, seed=2)
    guided = model.generate_codes(caps, n=2, guidance=4.0, seed=2)
    assert not np.array_equal(cond, uncond) and not np.array_equal(guided, cond)


def test_cached_guided_sampling_matches_a_plain_forward_pass(model):
    """Greedy decoding with guidance g picks, at every step, the argmax over image codes of
    uncond + g * (cond - uncond), computed here without the KV cache or batching."""
    codec, g = model.codec, 2.5
    caption = "a green circle above a cat"
    codes = model.generate_codes(caption, n=1, guidance=g, temperature=0.0)[0]
    lo, hi = codec.image_offset, codec.image_offset + codec.codebook_size
    module = model.module
    with torch.no_grad():
        for prompt in (codec.prompt(caption), codec.prompt("")):
            seq = torch.tensor([prompt + (codes + lo).tolist()])
            logits = module(seq)[0, len(prompt) - 1:-1, lo:hi].float()  # the logits that chose each code
            if prompt == codec.prompt(""):
                uncond = logits
            else:
                cond = logits
    mixed = uncond + g * (cond - uncond)
    top2 = mixed.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # skip exact ties
    assert clear.sum() > 50
    assert torch.equal(mixed.argmax(-1)[clear], torch.from_numpy(codes)[clear])


def test_sampling_controls_and_bad_parameters(model):
    greedy = model.generate_codes("a sun", n=2, temperature=0.0, seed=0)
    assert np.array_equal(greedy[0], greedy[1])  # greedy ignores the seed
    top1 = model.generate_codes("a sun", n=2, top_k=1, seed=3)
    assert np.array_equal(top1, greedy)
    for bad in (dict(guidance=-1.0), dict(n=0), dict(top_p=0.0), dict(temperature=-1.0), dict(top_k=-2)):
        with pytest.raises(InvalidParameterError):
            model.generate("a sun", **{"n": 1, **bad})
    with pytest.raises(InvalidParameterError):
        model.generate([], n=1)


def test_fit_refuses_uncaptioned_data(tmp_path, image_tok_dir, scenes):
    images, captions, _ = scenes
    with pytest.raises(DataError, match="no caption"):
        fit_image_model((images[:4], ["a red circle", "", "a tree", "a sun"]), image_tok_dir, tmp_path / "x", max_steps=1)
    with pytest.raises(DataError, match="captions"):
        fit_image_model((images[:4], captions[:3]), image_tok_dir, tmp_path / "y", max_steps=1)
    with pytest.raises(InvalidParameterError):
        fit_image_model((images[:4], captions[:4]), image_tok_dir, tmp_path / "z", max_steps=1, caption_dropout=1.0)


# --- the command line -------------------------------------------------------------------------
def test_cli_train_and_generate_end_to_end(tmp_path, image_tok_dir):
    data = tmp_path / "scenes"
    run = genlab("image", "scenes", data, "-n", 48, "--seed", 1, "--no-diverse")
    assert run.returncode == 0 and "48 train scenes" in run.stdout, run.stderr
    assert len(list(data.glob("*.png"))) == 48 and (data / "specs.jsonl").exists()
    run = genlab("image", "train", data, "--tokenizer", image_tok_dir, "--out", tmp_path / "run", "--max-steps", 4,
                 "--preset", "1m", "--batch-size", 8, "--caption-dropout", 0.2, "--captioner-minutes", 0.02)
    assert run.returncode == 0, run.stderr
    model_dir = tmp_path / "run" / "model"
    assert run.stdout.strip().endswith(str(model_dir)) and (tmp_path / "run" / "samples.png").exists()
    assert (model_dir / "captioner" / "captioner.safetensors").exists() and "captioner for best-of-N" in run.stderr
    grid = tmp_path / "grid.png"
    run = genlab("image", "generate", model_dir, "a cat wearing sunglasses and a hat", "a red square left of a blue circle",
                 "-n", 3, "--out", grid, "--guidance", 2, "--seed", 1, "--top-k", 50, "--candidates", 2)
    assert run.returncode == 0, run.stderr
    assert "never saw are left out" in run.stderr and "and" in run.stderr  # "and" is in no training caption
    assert "each the best of 2 by the captioner" in run.stdout
    from PIL import Image

    with Image.open(grid) as img:
        assert img.size[0] == 3 * (32 * 4 + 4) + 4 and img.size[1] > 2 * 32 * 4
    assert not list(tmp_path.glob(".grid*"))  # no temporary left behind



def cli_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`genlab ARGS` in this process (no interpreter start-up): (exit code, stderr)."""
    from genlab.cli import main

    monkeypatch.setattr(sys, "argv", ["genlab", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_cli_bad_input_is_one_clear_error(tmp_path, image_tok_dir, trained, monkeypatch, capsys):
    from PIL import Image

    (tmp_path / "bare").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "bare" / "red.png")
    code, err = cli_in_process(monkeypatch, capsys, "image", "train", tmp_path / "bare", "--tokenizer", image_tok_dir,
                               "--out", tmp_path / "r1")
    assert code == 2 and "red.png: image without a caption" in err and not (tmp_path / "r1" / "model").exists()
    code, err = cli_in_process(monkeypatch, capsys, "image", "train", tmp_path / "bare", "--tokenizer", tmp_path / "nope")
    assert code == 2 and "nope" in err
    model_dir = trained.model_dir
    code, err = cli_in_process(monkeypatch, capsys, "image", "generate", image_tok_dir, "a sun", "--out", tmp_path / "g.png")
    assert code == 2 and "config.json" in err
    code, err = cli_in_process(monkeypatch, capsys, "image", "generate", model_dir, "a sun", "--out", tmp_path / "g.jpg")
    assert code == 2 and ".png" in err
    code, err = cli_in_process(monkeypatch, capsys, "image", "generate", model_dir, "a sun", "--guidance", "-1",
                               "--out", tmp_path / "g.png")
    assert code == 2 and "guidance" in err and not (tmp_path / "g.png").exists()
    code, err = cli_in_process(monkeypatch, capsys, "image", "generate", model_dir, "a sun", "-n", "0",
                               "--out", tmp_path / "g.png")
    assert code == 2 and not (tmp_path / "g.png").exists()
    code, _ = cli_in_process(monkeypatch, capsys, "image", "tokenizer", "--help")  # the tokenizer commands remain
    assert code == 0


def test_evaluation_reports_the_model_next_to_its_anchors(model):
    import json

    from genlab.evaluate.scene_checker import CheckerConfig, CheckerNet, SceneChecker
    from genlab.image.evaluate import evaluate_image_model, summary_rows, to_json

    torch.manual_seed(0)
    checker = SceneChecker(CheckerNet(CheckerConfig()), CheckerConfig())  # untrained: numbers, not quality
    result = evaluate_image_model(model, checker, n_captions=6, n_per_caption=2, guidance=2.0, compare_guidance=(0.0,),
                                  splits=("heldout",), seed=1)
    held = result["heldout"]
    assert held["images"] == 12 and held["images_array"].shape == (12, 32, 32, 3) and len(held["captions_list"]) == 12
    # plain FID cannot see a caption mismatch; the joint FID (with the caption vector) can
    assert held["model_shuffled_captions"]["fid"] == held["model"]["fid"]
    assert held["model_shuffled_captions"]["joint_fid"] != held["model"]["joint_fid"]
    assert held["real_shuffled_captions"]["fid"] == held["real"]["fid"]
    assert {"guidance_0", "model", "real", "model_shuffled_captions", "real_shuffled_captions"} <= set(held)
    assert len(summary_rows(result)) == 5
    json.dumps(to_json(result))  # serialisable: no arrays left

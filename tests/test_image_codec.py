"""Image folders in, image tokens out: reading and normalising images and captions (with every
bad-input case), the FSQ image tokenizer (shapes, determinism, save / load), a short training run
that must beat the untrained tokenizer and a mean-colour baseline, and `genlab image` end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from genlab.codecs.image import FSQ, ImageCodecConfig, ImageTokenizer
from genlab.data.images import read_image_folder
from genlab.errors import DataError, InvalidParameterError, ModelLoadError


def genlab(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "genlab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def draw_shapes(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Coloured rectangles and circles on plain backgrounds, from a small palette."""
    rng = np.random.default_rng(seed)
    palette = [(230, 40, 40), (40, 160, 60), (40, 80, 220), (250, 210, 40), (250, 250, 250), (30, 30, 30)]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        bg, fg = rng.choice(len(palette), 2, replace=False)
        img = Image.new("RGB", (size, size), palette[bg])
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
        draw = ImageDraw.Draw(img)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=palette[fg])
        out[i] = np.asarray(img)
    return out


# --- reading folders -------------------------------------------------------------------------
def test_every_mode_and_size_becomes_rgb_of_one_size(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "a_rgb.png")
    Image.new("L", (20, 20), 100).save(tmp_path / "b_gray.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c_clear.png")  # fully transparent -> white
    wide = Image.new("RGB", (48, 16), (255, 0, 0))
    wide.paste((0, 0, 255), (16, 0, 32, 16))  # blue centre square, red sides cropped away
    wide.save(tmp_path / "d_wide.bmp")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 200, 0] + [0] * 765)
    pal.save(tmp_path / "sub" / "e_palette.png")
    Image.new("RGB", (64, 64), (200, 100, 50)).save(tmp_path / "sub" / "f.jpg", quality=95)
    Image.new("RGB", (16, 16), (5, 5, 250)).save(tmp_path / "sub" / "g.webp", lossless=True)
    (tmp_path / ".hidden.png").write_bytes(b"not read: hidden files are not data")
    notes = []
    images, captions, paths = read_image_folder(tmp_path, size=16, captions="none", warn=notes.append)
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8
    assert [p.name for p in paths] == ["a_rgb.png", "b_gray.png", "c_clear.png", "d_wide.bmp", "e_palette.png",
                                       "f.jpg", "g.webp"]
    assert captions == [None] * 7
    assert (images[1] == 100).all()
    assert (images[2] == 255).all()
    assert (images[3] == [0, 0, 255]).all()
    assert (images[4] == [0, 200, 0]).all()
    assert np.abs(images[5].astype(int) - [200, 100, 50]).max() <= 3  # jpeg
    assert (images[6] == [5, 5, 250]).all()
    joined = " | ".join(notes)
    for text in ("1 of 7 grayscale", "1 of 7 palette", "1 of 7 images with transparency", "1 of 7 non-square",
                 "4 of 7 images resized to 16x16"):
        assert text in joined, joined


def test_sidecar_and_csv_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a", "b", "sub/c", "sub/d"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a red\ncircle \n")
    (tmp_path / "captions.csv").write_text("file,caption\nb.png,a blue square\nsub/c.png,\"a cat, smiling\"\n")
    (tmp_path / "sub" / "captions.csv").write_text("File,Caption\nd.png,a sun\n")  # header case ignored
    notes = []
    _, captions, paths = read_image_folder(tmp_path, size=8, warn=notes.append)
    assert captions == ["a red circle", "a blue square", "a cat, smiling", "a sun"]
    assert read_image_folder(tmp_path, size=8, captions="required").captions == captions
    (tmp_path / "e.png").write_bytes((tmp_path / "a.png").read_bytes())
    found = read_image_folder(tmp_path, size=8, warn=notes.append)
    assert [p.name for p in found.paths] == ["a.png", "b.png", "e.png", "c.png", "d.png"]  # sorted by path
    assert found.captions[2] is None
    assert "1 of 5 images have no caption" in notes[-1]
    with pytest.raises(DataError, match=r"e\.png: image without a caption"):
        read_image_folder(tmp_path, size=8, captions="required")
    (tmp_path / "a.txt").write_text("a different caption")
    (tmp_path / "captions.csv").write_text("file,caption\na.png,a red circle\n")
    with pytest.raises(DataError, match=r"captions\.csv:2: caption for a\.png differs from .*a\.txt"):
        read_image_folder(tmp_path, size=8)


def _bad_png(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return "broken.png"


def _truncated_png(folder):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return "cut.png"


def _orphan_caption(folder):
    (folder / "cat_01.txt").write_text("a cat")
    return "cat_01.txt: caption file without an image"


def _empty_caption(folder):
    (folder / "ok.txt").write_text(" \n\t")
    return "ok.txt: empty caption"


def _csv_missing_file(folder):
    (folder / "captions.csv").write_text("file,caption\nok.png,fine\nnope.png,gone\n")
    return r"captions.csv:3: 'nope.png' names no image"


def _csv_empty_caption(folder):
    (folder / "captions.csv").write_text("file,caption\nok.png,\n")
    return "captions.csv:2: empty caption"


def _csv_columns(folder):
    (folder / "captions.csv").write_text("image,text\nok.png,fine\n")
    return "captions.csv: needs the columns 'file' and 'caption'"


def _csv_duplicate(folder):
    (folder / "captions.csv").write_text("file,caption\nok.png,one\nok.png,two\n")
    return r"captions.csv:3: 'ok.png' is captioned again \(first at .*captions.csv:2\)"


@pytest.mark.parametrize("make", [_bad_png, _truncated_png, _orphan_caption, _empty_caption, _csv_missing_file,
                                  _csv_empty_caption, _csv_columns, _csv_duplicate])
def test_bad_input_names_the_file(tmp_path, make):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    pattern = make(tmp_path)
    with pytest.raises(DataError, match=pattern):
        read_image_folder(tmp_path, size=8)


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "notes.md").write_text("no images here")
    with pytest.raises(DataError, match=r"no images \(png, jpg, jpeg, webp, bmp\)"):
        read_image_folder(tmp_path)
    with pytest.raises(DataError, match="nowhere: no such folder"):
        read_image_folder(tmp_path / "nowhere")
    with pytest.raises(InvalidParameterError, match="captions must be one of"):
        read_image_folder(tmp_path, captions="sometimes")


# --- the tokenizer ---------------------------------------------------------------------------
def test_fsq_codes_are_a_bijection():
    fsq = FSQ((8, 5, 5, 5))
    codes = torch.arange(fsq.codebook_size)
    values = fsq.from_codes(codes)
    assert values.min() >= -1 and values.max() <= 1
    assert torch.equal(fsq.to_codes(values), codes)
    z = torch.linspace(-6, 6, 2001)[:, None].expand(-1, 4)
    reached = fsq.quantize(z)
    assert [len(torch.unique(reached[:, i])) for i in range(4)] == [8, 5, 5, 5]  # every level reachable, no more
    z = torch.randn(5000, 4) * 4
    assert len(torch.unique(fsq.to_codes(fsq.quantize(z)))) > 500


def test_tokenizer_shapes_and_determinism():
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageCodecConfig(size=32, width=32))
    assert tok.codebook_size == 1000 and tok.grid == (8, 8) and tok.tokens_per_image == 64
    images = draw_shapes(5)
    codes = tok.encode(images)
    assert codes.shape == (5, 8, 8) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 1000
    assert np.array_equal(codes, tok.encode(images))
    assert np.array_equal(tok.encode(images[2]), codes[2])  # one image -> one grid
    recon = tok.decode(codes)
    assert recon.shape == (5, 32, 32, 3) and recon.dtype == np.uint8
    assert np.array_equal(recon, tok.decode(codes.reshape(5, 64)))  # raster-order token rows
    assert np.array_equal(tok.decode(codes[1]), recon[1])
    with pytest.raises(InvalidParameterError, match=r"uint8 \[N, 32, 32, 3\]"):
        tok.encode(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(InvalidParameterError, match="uint8 pixels"):
        tok.encode(images.astype(np.float32))
    with pytest.raises(InvalidParameterError, match=r"codes must be in \[0, 1000\)"):
        tok.decode(np.full((1, 8, 8), 1000))
    with pytest.raises(InvalidParameterError, match="levels"):
        ImageCodecConfig(levels=(8, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from genlab.image.train import train_image_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("imgtok") / "tok"
        result = train_image_tokenizer(draw_shapes(320), out, steps=150, batch_size=16, lr=3e-3, seed=0,
                                       config=ImageCodecConfig(width=32))
    finally:
        torch.set_num_threads(threads)
    return result


def test_training_beats_untrained_and_mean_colour(trained):
    m = trained.metrics
    assert m["heldout_images"] == 32 and m["train_images"] == 288 and trained.steps == 150
    assert m["mse"] < 0.25 * m["untrained_mse"], m
    assert m["mse"] < 0.5 * m["baseline_mean_colour_mse"], m
    assert m["psnr"] > m["baseline_mean_colour_psnr"] + 3
    assert m["codes_used"] > 30 and m["perplexity"] > 10, m
    log = [line for line in (trained.output_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(log) >= 20 and '"val_psnr"' in log[-1]
    for name in ("loss.png", "reconstructions.png", "tokenizer_eval.json", "image_codec.json", "image_codec.safetensors"):
        assert (trained.output_dir / name).stat().st_size > 0
    with Image.open(trained.output_dir / "reconstructions.png") as grid:
        assert grid.size[0] > 8 * 32 * 4 and grid.mode == "RGB"


def test_save_load_gives_identical_codes(trained, tmp_path):
    images = draw_shapes(20, seed=7)
    loaded = ImageTokenizer.from_folder(trained.output_dir)
    assert loaded.to_dict() == trained.tokenizer.to_dict() and loaded.to_dict()["type"] == "image"
    codes = trained.tokenizer.encode(images)
    assert np.array_equal(loaded.encode(images), codes)
    assert np.array_equal(loaded.decode(codes), trained.tokenizer.decode(codes))
    # decoded images re-encode largely to the same codes (chance would be 1 in 1000; measured ~0.6-0.7)
    assert (loaded.encode(loaded.decode(codes)) == codes).mean() > 0.3
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "image_codec.json").write_text((trained.output_dir / "image_codec.json").read_text())
    (broken / "image_codec.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="image_codec.safetensors: corrupt"):
        ImageTokenizer.from_folder(broken)


# --- the command -----------------------------------------------------------------------------
def test_cli_train_eval_and_bad_input(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i, img in enumerate(draw_shapes(20, size=40)):  # 40px: resized to 32 (a note, not an error)
        Image.fromarray(img).save(data / f"{i:02d}.png")
    Image.fromarray(draw_shapes(1, size=40)[0]).convert("L").save(data / "gray.png")
    r = genlab("image", "tokenizer", "train", data, "--out", tmp_path / "tok", "--steps", "12", "--batch-size", "8",
               "--width", "16")
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and "baseline: mean colour" in r.stdout and "codes used" in r.stdout
    assert "read 21 images" in r.stderr and "1 of 21 grayscale" in r.stderr and "21 of 21 images resized" in r.stderr
    assert (tmp_path / "tok" / "reconstructions.png").exists() and (tmp_path / "tok" / "loss.png").exists()
    r = genlab("image", "tokenizer", "eval", tmp_path / "tok", data, "--out", tmp_path / "recon.png")
    assert r.returncode == 0, r.stderr
    assert "21 images, 64 tokens each" in r.stdout and (tmp_path / "recon.png").exists()
    (data / "zz.png").write_bytes(b"not an image")
    r = genlab("image", "tokenizer", "train", data, "--out", tmp_path / "tok2")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "zz.png: not a readable image" in errors[0], r.stderr
    assert not (tmp_path / "tok2").exists()
    r = genlab("image", "tokenizer", "train", data, "--out", tmp_path / "tok3", "--levels", "8,x")
    assert r.returncode == 2 and "--levels takes comma-separated integers" in r.stderr
    r = genlab("image", "tokenizer", "train", "--help")
    assert r.returncode == 0 and "Example: genlab image tokenizer train" in r.stdout

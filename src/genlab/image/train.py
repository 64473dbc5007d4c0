"""Train the FSQ image tokenizer on uint8 images and measure how well it reconstructs held-out ones.

The loss is pixel MSE (FSQ needs no codebook or commitment terms). 10% of the images are held
out; the report gives their MSE and PSNR after a real encode -> codes -> decode -> uint8 round
trip, how much of the codebook they use, and two reference points that need no training: each
image replaced by its mean colour, and each image shrunk to the code grid (8x8 full-colour
pixels, 2.4x the bits of the codes) and scaled back up.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from genlab.codecs.image import ImageCodecConfig, ImageTokenizer, codebook_stats, psnr
from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_file, write_json
from genlab.train.curves import MetricsLog, plot_curves

EVAL_FILE = "tokenizer_eval.json"


@dataclass
class ImageTokenizerResult:
    tokenizer: ImageTokenizer
    output_dir: Path
    metrics: dict  # held-out reconstruction, codebook use, baselines, the untrained tokenizer
    steps: int
    seconds: float
    files: dict = field(default_factory=dict)  # what was written: name -> path

    def summary(self) -> str:
        m = self.metrics
        return (f"held-out reconstruction ({m['heldout_images']} images): MSE {m['mse']:.5f}, PSNR {m['psnr']:.2f} dB; "
                f"codebook {m['codes_used']}/{m['codebook_size']} codes used ({m['usage']:.0%}), perplexity "
                f"{m['perplexity']:.0f}; baselines: mean colour PSNR {m['baseline_mean_colour_psnr']:.2f} dB, "
                f"{m['grid'][0]}x{m['grid'][1]} thumbnail PSNR {m['baseline_thumbnail_psnr']:.2f} dB, untrained "
                f"{m['untrained_psnr']:.2f} dB")


def mean_colour_mse(images: np.ndarray) -> float:
    x = images.astype(np.float64) / 255
    return float(((x - x.mean(axis=(1, 2), keepdims=True)) ** 2).mean())


def thumbnail_mse(images: np.ndarray, grid: tuple[int, int]) -> float:
    """Shrink to the code grid (area average, full colour) and scale back up (bilinear)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    small = F.adaptive_avg_pool2d(x, grid)
    back = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    back = (back.clamp(0, 1) * 255).round() / 255  # as uint8 pixels, like the tokenizer's output
    return float(((back - x) ** 2).mean())


def reconstruction_metrics(tok: ImageTokenizer, images: np.ndarray) -> dict:
    """MSE (pixels scaled to [0, 1]) and PSNR of the uint8 round trip, plus codebook statistics."""
    codes = tok.encode(images)
    recon = tok.decode(codes)
    mse = float(((recon.astype(np.float64) - images) ** 2).mean() / 255 ** 2)
    return {"mse": mse, "psnr": psnr(mse), **codebook_stats(codes, tok.codebook_size)}


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 50)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine down to 10% of the peak


def comparison_grid(originals: np.ndarray, recons: np.ndarray, png, columns: int = 8, scale: int = 4) -> Path:
    """Rows of originals, each followed by the row of their reconstructions; pixels scaled up
    (nearest) so 32x32 images are visible, with a white gap between cells."""
    from PIL import Image

    n, s = len(originals), originals.shape[1]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    cell, gap = s * scale, 2
    sheet = np.full((rows * 2 * (cell + gap) + gap, columns * (cell + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        for k, img in enumerate((originals[i], recons[i])):
            y, x = gap + (2 * r + k) * (cell + gap), gap + c * (cell + gap)
            sheet[y:y + cell, x:x + cell] = img.repeat(scale, 0).repeat(scale, 1)
    png = Path(png)
    with atomic_file(png) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return png


def _plot(records: list[dict], png: Path, title: str) -> Path:
    return plot_curves(records, png, title, ylabel="pixel MSE (pixels in [0, 1])", x="step", train=("loss", "train MSE"),
                       val=("val_mse", "held-out MSE (uint8 round trip)"), log_y=True)


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise DataError(f"training an image tokenizer needs at least 2 images (one to hold out); got {n}")
    if not 0 < holdout < 1:
        raise InvalidParameterError(f"holdout must be a fraction in (0, 1), got {holdout}")
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(holdout * n)))
    return np.sort(order[k:]), np.sort(order[:k])


def train_image_tokenizer(images, out, steps: int = 2000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                          console=None, config: ImageCodecConfig | None = None, holdout: float = 0.1,
                          max_minutes: float | None = None, eval_every: int | None = None,
                          device: str = "cpu") -> ImageTokenizerResult:
    """Train on uint8 [N, S, S, 3] images; write the tokenizer, metrics.jsonl, loss.png,
    reconstructions.png and tokenizer_eval.json to `out`. `console`: a rich Console for the
    progress bar (None: silent)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise InvalidParameterError(f"images must be uint8 [N, S, S, 3]; got {images.dtype} {images.shape}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise InvalidParameterError("steps and batch_size must be >= 1 and lr > 0")
    config = config or ImageCodecConfig(size=images.shape[1])
    if config.size != images.shape[1]:
        raise InvalidParameterError(f"images are {images.shape[1]}px but the codec config says {config.size}px")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = _split(len(images), holdout, seed)
    val_images = images[val_idx]
    torch.manual_seed(seed)
    tok = ImageTokenizer(config).to(device)
    untrained = reconstruction_metrics(tok, val_images)
    data = torch.from_numpy(images[train_idx]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    opt = torch.optim.AdamW(tok.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eval_every = eval_every or max(1, steps // 10)
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"step": 0, "val_mse": round(untrained["mse"], 6), "val_psnr": round(untrained["psnr"], 3)})

    progress = Progress(TextColumn("[bold]image tokenizer"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("MSE {task.fields[mse]:.5f} · {task.fields[rate]:,.0f} img/s"),
                        TimeRemainingColumn(), console=console, disable=console is None)
    t0, cpu0 = time.perf_counter(), time.process_time()
    step, order, pos = 0, torch.randperm(len(data), generator=gen), 0
    with progress:
        task = progress.add_task("train", total=steps, mse=float("nan"), rate=0.0)
        tok.train()
        while step < steps:
            if pos + batch_size > len(order):  # a new epoch: fresh order
                order, pos = torch.randperm(len(data), generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            x = data[idx.to(device)]
            flip = (torch.rand(len(x), generator=gen) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # mirror images: free extra data
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr)
            recon, _ = tok(x)
            loss = F.mse_loss(recon, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
            opt.step()
            step += 1
            elapsed = time.perf_counter() - t0
            mse = loss.item() / 4  # model space is [-1, 1]; report MSE of pixels in [0, 1]
            out_of_time = bool(max_minutes) and elapsed > 60 * max_minutes
            last = step == steps or out_of_time
            if step % 10 == 0 or last:
                rate = step * batch_size / max(elapsed, 1e-9)
                log.write({"step": step, "loss": round(mse, 6), "lr": round(lr_at(step - 1, steps, lr), 7),
                           "grad_norm": round(float(grad_norm), 4), "images_per_s": round(rate, 1),
                           "elapsed_s": round(elapsed, 2)})
                progress.update(task, mse=mse, rate=rate)
            if step % eval_every == 0 or last:
                val = reconstruction_metrics(tok, val_images)
                tok.train()
                log.write({"step": step, "val_mse": round(val["mse"], 6), "val_psnr": round(val["psnr"], 3),
                           "codebook_usage": round(val["usage"], 4), "perplexity": round(val["perplexity"], 2)})
            progress.update(task, completed=step)
            if last:
                break
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    tok.eval()

    final = reconstruction_metrics(tok, val_images)
    base_mean, base_thumb = mean_colour_mse(val_images), thumbnail_mse(val_images, config.grid)
    metrics = {**final, "codebook_size": tok.codebook_size, "grid": list(config.grid),
               "tokens_per_image": tok.tokens_per_image, "train_images": len(train_idx), "heldout_images": len(val_idx),
               "untrained_mse": untrained["mse"], "untrained_psnr": untrained["psnr"],
               "baseline_mean_colour_mse": base_mean, "baseline_mean_colour_psnr": psnr(base_mean),
               "baseline_thumbnail_mse": base_thumb, "baseline_thumbnail_psnr": psnr(base_thumb),
               "steps": step, "batch_size": batch_size, "lr": lr, "seed": seed, "train_seconds": round(seconds, 2),
               "train_cpu_seconds": round(cpu_seconds, 2),  # on shared machines wall time overstates the work
               "params": tok.num_params(), "config": tok.to_dict()}
    tok.save_pretrained(out)
    write_json(out / EVAL_FILE, json.loads(json.dumps(metrics)))  # plain floats / ints only
    shown = val_images[:16]
    files = {"tokenizer": out, "metrics": out / "metrics.jsonl", "eval": out / EVAL_FILE,
             "loss_png": _plot(log.records(), out / "loss.png",
                               f"image tokenizer: held-out PSNR {final['psnr']:.1f} dB after {step} steps"),
             "reconstructions_png": comparison_grid(shown, tok.reconstruct(shown), out / "reconstructions.png")}
    return ImageTokenizerResult(tok, out, metrics, step, seconds, files)

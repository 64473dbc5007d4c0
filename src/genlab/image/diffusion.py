"""Pretrained diffusion for users who have it (issue 10): run a local diffusers pipeline folder
(Stable Diffusion 1.x/2.x, SDXL) and train a LoRA on the UNet's attention with PEFT.

Everything is local: folders load with `local_files_only=True`, safetensors only, and only
pipeline classes that ship with diffusers (no remote or custom code). A trained LoRA is saved in
diffusers' own format, so plain `pipe.load_lora_weights(out)` loads it as well as genlab does.
The training step follows diffusers' train_text_to_image_lora example (noise-prediction MSE).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genlab.data.images import read_image_folder
from genlab.errors import InvalidParameterError, ModelLoadError
from genlab.fsutil import atomic_dir, atomic_file, write_json
from genlab.train.curves import MetricsLog, plot_curves

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # attention projections, as in the diffusers example


def _check_pipeline_folder(folder: Path) -> None:
    """model_index.json must name a diffusers pipeline class; anything else is refused before loading."""
    import diffusers

    index = folder / "model_index.json"
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    if not index.is_file():
        raise ModelLoadError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{index}: not a valid model_index.json ({type(e).__name__}: {e})") from None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        # a custom class means running code from the folder; genlab never does that
        raise ModelLoadError(f"{index}: {name!r} is not a pipeline class that ships with diffusers")


def _why(e: Exception) -> str:
    """One line about a third-party error (a heading ending in ':' gets its first detail line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"


@contextmanager
def _quiet(verbosity=None):
    """No diffusers / transformers loading bars (genlab shows its own progress); `verbosity`: also
    raise diffusers' log level for the duration. The previous settings come back afterwards."""
    import transformers.utils.logging as tlog
    from diffusers.utils import logging as dlog

    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    level = dlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    if verbosity is not None:
        dlog.set_verbosity(verbosity)
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        for enabled, log in zip(bars, (dlog, tlog)):
            (log.enable_progress_bar if enabled else log.disable_progress_bar)()


def load_pipeline(folder, device: str = "cpu", dtype=None, lora=None):
    """A local diffusers pipeline folder -> pipeline on `device`; `lora`: a LoRA folder (or
    .safetensors file) in diffusers' format loaded on top. Bad folders raise ModelLoadError."""
    from diffusers import DiffusionPipeline

    folder = Path(folder).expanduser()
    _check_pipeline_folder(folder)
    if isinstance(dtype, str):  # "float16" etc. from the command line
        if dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidParameterError(f"dtype must be float32, float16 or bfloat16; got {dtype!r}")
        dtype = getattr(torch, dtype)
    try:
        with _quiet():
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False, torch_dtype=dtype)
    except Exception as e:  # diffusers raises OSError / ValueError / KeyError ... for broken folders
        raise ModelLoadError(f"{folder}: cannot load the pipeline ({_why(e)})") from e
    pipe.to(device)
    if lora is not None:
        load_lora(pipe, lora)
    return pipe


def load_lora(pipe, lora) -> None:
    lora = Path(lora).expanduser()
    folder, name = (lora.parent, lora.name) if lora.is_file() else (lora, LORA_FILE)
    if not (folder / name).is_file():
        raise ModelLoadError(f"{lora}: no LoRA weights ({LORA_FILE}) found")
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelLoadError(f"{lora}: {type(pipe).__name__} cannot load LoRA weights")
    try:  # quiet: "no LoRA keys for the text encoder" is expected of a UNet-only LoRA
        with _quiet(logging.ERROR):
            pipe.load_lora_weights(str(folder), weight_name=name, local_files_only=True)
    except Exception as e:  # wrong base model: shape mismatches, unknown module names
        raise ModelLoadError(f"{lora}: LoRA does not fit this pipeline ({_why(e)})") from e


def _size(size) -> tuple[int | None, int | None]:
    if size is None:
        return None, None  # the pipeline's native size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 8 or h % 8 or w % 8:
        raise InvalidParameterError(f"image size must be a multiple of 8 (at least 8); got {h}x{w}")
    return h, w


def generate_images(pipeline_or_folder, prompts, n: int = 1, steps: int = 25, guidance: float = 7.5, seed: int = 0,
                    size=None, negative_prompt: str | None = None, batch_size: int = 4, console=None) -> list:
    """`n` PIL images per prompt (prompt-major order), at most `batch_size` per pipeline call.
    Image k (counting from 0 across all prompts) has its own generator seeded `seed + k`, so it
    does not depend on `n`, the batching or the other prompts. `size`: int or (height, width);
    None = the pipeline's native size."""
    import inspect

    pipe = load_pipeline(pipeline_or_folder) if isinstance(pipeline_or_folder, (str, os.PathLike)) else pipeline_or_folder
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise InvalidParameterError("prompts must be a non-empty list of strings")
    if n < 1 or steps < 1 or batch_size < 1 or guidance < 0:
        raise InvalidParameterError(f"need n, steps, batch_size >= 1 and guidance >= 0; got {n}, {steps}, {batch_size}, {guidance}")
    height, width = _size(size)
    pipe.set_progress_bar_config(disable=True)  # one rich bar below instead of a tqdm bar per prompt
    accepts = inspect.signature(pipe.__call__).parameters
    progress = Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=console is None)
    images, calls = [], [(i, j, min(j + batch_size, n)) for i in range(len(prompts)) for j in range(0, n, batch_size)]
    with progress:
        task = progress.add_task("denoise", total=len(calls) * steps)
        for c, (i, j0, j1) in enumerate(calls):
            # CPU generators: a seed gives the same starting noise on CPU and GPU
            gens = [torch.Generator("cpu").manual_seed(seed + i * n + j) for j in range(j0, j1)]
            kwargs = dict(prompt=prompts[i], num_images_per_prompt=j1 - j0, num_inference_steps=steps,
                          guidance_scale=guidance, generator=gens, height=height, width=width, output_type="pil")
            if negative_prompt is not None:
                kwargs["negative_prompt"] = negative_prompt
            if "callback_on_step_end" in accepts:
                def tick(_pipe, step, _t, _kw, base=c * steps):
                    progress.update(task, completed=base + min(step + 1, steps))
                    return {}
                kwargs["callback_on_step_end"] = tick
            with torch.no_grad():
                images.extend(pipe(**kwargs).images)
            progress.update(task, completed=(c + 1) * steps)
    return images


def save_grid(images, path, columns: int | None = None, pad: int = 2):
    """Tile PIL images into one PNG (white gaps), written atomically; returns the path."""
    from PIL import Image

    if not images:
        raise InvalidParameterError("save_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = -(-len(images) // columns)
    w, h = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (columns * w + (columns - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % columns) * (w + pad), (k // columns) * (h + pad)))
    path = Path(path)
    with atomic_file(path) as tmp:  # readers never see half a PNG
        grid.save(tmp, format="PNG")
    return path


@dataclass
class LoraResult:
    out: Path
    steps: int
    loss_before: float  # noise-prediction MSE on the fixed evaluation batch, base model
    loss_after: float  # the same batch, same noise and timesteps, with the trained LoRA
    seconds: float
    files: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"LoRA trained for {self.steps} steps in {self.seconds:.0f}s: loss {self.loss_before:.4f} -> "
                f"{self.loss_after:.4f} (fixed evaluation noise); saved to {self.out}")


class _Encoded:
    """VAE latents and prompt embeddings of the whole data set, computed once: the VAE and text
    encoders are frozen, so re-encoding every step would only cost time."""

    def __init__(self, pipe, pixels: torch.Tensor, captions: list[str], device, batch: int):
        vae = pipe.vae
        if getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32:
            vae.to(torch.float32)  # the SDXL VAE overflows in float16
        self.scale, self.shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
        means, stds, embeds, pooled = [], [], [], []
        with torch.no_grad():
            for k in range(0, len(pixels), batch):
                dist = vae.encode(pixels[k:k + batch].to(device, vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
                enc = pipe.encode_prompt(prompt=captions[k:k + batch], device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
                embeds.append(enc[0])
                if len(enc) == 4:  # SDXL: pooled text embedding of the second encoder
                    pooled.append(enc[2])
        self.mean, self.std, self.embeds = torch.cat(means), torch.cat(stds), torch.cat(embeds)
        self.pooled = torch.cat(pooled) if pooled else None
        if self.pooled is not None:
            # SDXL micro-conditioning: images were centre-cropped and resized to the training size
            side = pixels.shape[-1]
            dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else self.pooled.shape[-1]
            self.time_ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), self.embeds.dtype, dim).to(device)

    def latents(self, idx, noise_gen: torch.Generator | None):
        mean, std = self.mean[idx], self.std[idx]
        z = mean if noise_gen is None else mean + std * torch.randn(mean.shape, generator=noise_gen).to(mean.device)
        return (z - self.shift) * self.scale

    def cond(self, idx) -> dict:
        if self.pooled is None:
            return {"encoder_hidden_states": self.embeds[idx]}
        added = {"text_embeds": self.pooled[idx], "time_ids": self.time_ids.repeat(len(idx), 1)}
        return {"encoder_hidden_states": self.embeds[idx], "added_cond_kwargs": added}


def _denoise_loss(unet, sched, enc: _Encoded, idx, noise, t, latents) -> torch.Tensor:
    noisy = sched.add_noise(latents, noise, t)
    kind = sched.config.prediction_type  # SD 1.x / SDXL predict the noise, SD 2.x (768px) the velocity
    target = sched.get_velocity(latents, noise, t) if kind == "v_prediction" else latents if kind == "sample" else noise
    pred = unet(noisy.to(unet.dtype), t, return_dict=False, **enc.cond(idx))[0]
    return F.mse_loss(pred.float(), target.float())


def _eval_loss(unet, sched, enc, fixed, chunk: int) -> float:
    """Mean noise-prediction MSE on fixed images, timesteps and noise: comparable across steps."""
    idx, t, noise = fixed
    unet.eval()  # no dropout while measuring
    with torch.no_grad():
        losses = [_denoise_loss(unet, sched, enc, idx[s], noise[s], t[s], enc.latents(idx[s], None)).item() * len(idx[s])
                  for s in (slice(k, k + chunk) for k in range(0, len(idx), chunk))]
    unet.train()
    return sum(losses) / len(idx)


def _plot(records: list[dict], png: Path, title: str) -> Path:
    return plot_curves(records, png, title, ylabel="noise-prediction MSE", x="step",
                       train=("loss", "train loss (random noise)"),
                       val=("eval_loss", "loss on fixed images / noise / timesteps"))


def _check_out(out: Path, data_dir: Path) -> None:
    """`out` is replaced whole on success: refuse anything but a new, empty or earlier LoRA folder,
    and a folder inside the training images (its loss.png would become a training image)."""
    if out.exists():
        info = out / "genlab.json"
        if not out.is_dir():
            raise InvalidParameterError(f"{out}: exists and is not a folder; the LoRA output must be a folder")
        try:
            earlier = json.loads(info.read_text(encoding="utf-8")).get("kind") == "diffusers-lora"
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier and any(out.iterdir()):
            raise InvalidParameterError(f"{out}: a non-empty folder that is not a genlab LoRA folder; it would be "
                                        "replaced whole, so choose a new output folder")
    if out.resolve().is_relative_to(data_dir.resolve()):
        raise InvalidParameterError(f"{out}: the output folder must not lie inside the image folder {data_dir}")


def finetune_lora(pipeline_folder, data_dir, out, steps: int = 500, lr: float = 1e-4, rank: int = 4, batch_size: int = 4,
                  resolution: int | None = None, seed: int = 0, console=None, default_caption: str = "",
                  device: str = "cpu", dtype=None, eval_every: int | None = None) -> LoraResult:
    """Train a LoRA on the UNet attention of a local SD / SDXL pipeline with the images (and
    sidecar / captions.csv captions; `default_caption` where none) in `data_dir`. Writes the LoRA
    (diffusers format), metrics.jsonl, loss.png and genlab.json to `out` atomically."""
    import diffusers
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if steps < 1 or batch_size < 1 or rank < 1 or not lr > 0:
        raise InvalidParameterError(f"need steps, batch_size, rank >= 1 and lr > 0; got {steps}, {batch_size}, {rank}, {lr}")
    _check_pipeline_folder(Path(pipeline_folder).expanduser())  # cheap checks before the slow load
    _check_out(Path(out).expanduser(), Path(data_dir).expanduser())
    pipe = load_pipeline(pipeline_folder, device=device, dtype=dtype)
    if getattr(pipe, "unet", None) is None or not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "save_lora_weights"):
        raise ModelLoadError(f"{pipeline_folder}: LoRA fine-tuning supports Stable Diffusion 1.x/2.x and SDXL "
                             f"pipelines (a UNet); this is a {type(pipe).__name__}")
    unet = pipe.unet
    resolution = resolution or unet.config.sample_size * pipe.vae_scale_factor
    _size(resolution)
    data = read_image_folder(data_dir, size=resolution, captions="auto", warn=console.print if console else None)  # DataError: empty / unreadable
    captions = [c if c is not None else default_caption for c in data.captions]

    torch.manual_seed(seed)  # LoRA A matrices start random
    for module in filter(None, (pipe.vae, unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    cast_training_params(unet, torch.float32)  # LoRA weights train in float32 even when the base is half precision
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # same betas / prediction type as the pipeline
    T = sched.config.num_train_timesteps

    pixels = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    enc = _Encoded(pipe, pixels, captions, device, batch_size)
    gen = torch.Generator("cpu").manual_seed(seed)
    # fixed evaluation batch: up to 16 images x 4 timesteps spread over the schedule, one noise draw
    n_eval, k_eval = min(len(pixels), 16), 4
    e_idx = torch.linspace(0, len(pixels) - 1, n_eval).round().long().repeat_interleave(k_eval)
    e_t = (((torch.arange(k_eval) + 0.5) / k_eval) * T).long().repeat(n_eval)
    e_noise = torch.randn((len(e_idx), *enc.mean.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed + 1))
    fixed = (e_idx.to(device), e_t.to(device), e_noise.to(device))
    chunk = max(batch_size, k_eval)
    loss_before = _eval_loss(unet, sched, enc, fixed, chunk)
    eval_every = eval_every or max(1, steps // 5)

    with atomic_dir(out) as tmp:
        metrics = MetricsLog(tmp / "metrics.jsonl")
        metrics.write({"step": 0, "eval_loss": round(loss_before, 6)})
        progress = Progress(TextColumn("[bold]LoRA"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                            console=console, disable=console is None)
        t0, order, pos, losses = time.perf_counter(), torch.randperm(len(pixels), generator=gen), 0, []
        with progress:
            task = progress.add_task("train", total=steps, loss=float("nan"))
            for step in range(1, steps + 1):
                if pos >= len(order):  # a new epoch: fresh order
                    order, pos = torch.randperm(len(pixels), generator=gen), 0
                idx = order[pos:pos + batch_size].to(device)
                pos += batch_size
                latents = enc.latents(idx, gen)
                noise = torch.randn(latents.shape, generator=gen).to(device)
                t = torch.randint(0, T, (len(idx),), generator=gen).to(device)
                loss = _denoise_loss(unet, sched, enc, idx, noise, t, latents)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(loss.item())
                if step % max(1, steps // 50) == 0 or step == steps:
                    metrics.write({"step": step, "loss": round(sum(losses) / len(losses), 6),
                                   "grad_norm": round(float(grad_norm), 4), "elapsed_s": round(time.perf_counter() - t0, 2)})
                    losses = []
                if step % eval_every == 0 or step == steps:
                    loss_after = _eval_loss(unet, sched, enc, fixed, chunk)
                    metrics.write({"step": step, "eval_loss": round(loss_after, 6)})
                progress.update(task, completed=step, loss=loss.item())
        seconds = time.perf_counter() - t0
        lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        type(pipe).save_lora_weights(tmp, unet_lora_layers=lora_state, safe_serialization=True,
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        _plot(metrics.records(), tmp / "loss.png", f"LoRA rank {rank}: loss {loss_before:.4f} -> {loss_after:.4f}")
        write_json(tmp / "genlab.json", {
            "kind": "diffusers-lora", "base_pipeline": str(Path(pipeline_folder).expanduser().resolve()),
            "pipeline_class": type(pipe).__name__, "diffusers_version": diffusers.__version__,
            "data": str(Path(data_dir).expanduser().resolve()), "images": len(pixels), "resolution": resolution,
            "steps": steps, "lr": lr, "rank": rank, "batch_size": batch_size, "seed": seed, "target_modules": LORA_TARGETS,
            "eval_loss_before": loss_before, "eval_loss_after": loss_after, "train_seconds": round(seconds, 2)})
    out = Path(out)
    files = {"lora": out / LORA_FILE, "metrics": out / "metrics.jsonl", "loss_png": out / "loss.png",
             "info": out / "genlab.json"}
    return LoraResult(out, steps, loss_before, loss_after, seconds, files)

"""`genlab image ...`: train and evaluate the image tokenizer (images -> grids of codes -> images);
train a text-to-image model on captioned images and generate images from captions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from genlab.cli_options import (
    BatchSize, CkptEvery, Config, EvalEvery, Lr, MaxMinutes, TimeSchedule, MaxSteps, Out, Preset, Resume, TrainDevice, TrainSeed, err, out,
)
from genlab.errors import InvalidParameterError

image_app = typer.Typer(no_args_is_help=True, help="Images as tokens: the FSQ image tokenizer and text-to-image models.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the image tokenizer (images <-> code grids).")
image_app.add_typer(tokenizer_app, name="tokenizer")

Folder = Annotated[Path, typer.Argument(help="Folder of images (png, jpg, webp, bmp; searched recursively).")]


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise InvalidParameterError(f"--levels takes comma-separated integers such as 8,5,5,5; got {text!r}") from None
    return levels


def _read(folder: Path, size: int):
    from genlab.data.images import read_image_folder

    found = read_image_folder(folder, size=size, captions="none", warn=lambda m: err.print(f"[yellow]note:[/] {m}"))
    err.print(f"read {len(found.images)} images from {folder} as {size}x{size} RGB")
    return found


def _report(m: dict, title: str) -> Table:
    table = Table("reconstruction", "pixel MSE", "PSNR (dB)", title=title, title_justify="left")
    table.add_row("tokenizer (codes -> pixels)", f"{m['mse']:.5f}", f"{m['psnr']:.2f}")
    if "untrained_mse" in m:
        table.add_row("untrained tokenizer", f"{m['untrained_mse']:.5f}", f"{m['untrained_psnr']:.2f}")
    table.add_row("baseline: mean colour per image", f"{m['baseline_mean_colour_mse']:.5f}",
                  f"{m['baseline_mean_colour_psnr']:.2f}")
    g = m["grid"]
    table.add_row(f"baseline: {g[0]}x{g[1]} full-colour thumbnail", f"{m['baseline_thumbnail_mse']:.5f}",
                  f"{m['baseline_thumbnail_psnr']:.2f}")
    return table


@tokenizer_app.command("train")
def image_tokenizer_train(
    folder: Folder,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Tokenizer folder (also gets metrics.jsonl, loss.png, reconstructions.png).")],
    size: Annotated[int, typer.Option(help="Images are centre-cropped to a square and resized to SIZE x SIZE.")] = 32,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay to 10%).")] = 3e-3,
    levels: Annotated[str, typer.Option(help="FSQ levels per latent channel; the codebook is their product.")] = "8,5,5,5",
    width: Annotated[int, typer.Option(help="Channels at the grid resolution (a multiple of 8).")] = 64,
    downsample: Annotated[int, typer.Option(help="Stride-2 stages: the code grid is SIZE / 2**DOWNSAMPLE on a side.")] = 2,
    blocks: Annotated[int, typer.Option(help="Residual blocks per resolution (more: sharper, slower).")] = 0,
    holdout: Annotated[float, typer.Option(help="Fraction of images held out for the reconstruction report.")] = 0.1,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop cleanly after this many minutes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and batches.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
):
    """Train an image tokenizer (conv encoder + FSQ + conv decoder) on a folder of images.

    Reports how well it reconstructs held-out images (MSE, PSNR, codebook use) against two
    baselines, and writes originals vs reconstructions as a PNG.

    Example: genlab image tokenizer train scenes/ --out runs/image-tok --size 32 --steps 1500
    """
    from genlab.codecs.image import ImageCodecConfig
    from genlab.image.train import train_image_tokenizer

    config = ImageCodecConfig(size=size, levels=_levels(levels), width=width, downsample=downsample, blocks=blocks)
    found = _read(folder, size)
    err.print(f"codebook {config.levels} = {math.prod(config.levels)} codes; "
              f"{config.grid[0]}x{config.grid[1]} = {config.grid[0] * config.grid[1]} tokens per image")
    result = train_image_tokenizer(found.images, out_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                   console=err, config=config, holdout=holdout, max_minutes=max_minutes, device=device)
    m = result.metrics
    out.print(_report(m, f"{m['heldout_images']} held-out images; {result.steps} steps in {result.seconds:.0f} s on "
                          f"{m['train_images']} training images"))
    out.print(f"codebook: {m['codes_used']} of {m['codebook_size']} codes used on held-out images "
              f"({m['usage']:.0%}), perplexity {m['perplexity']:.0f}")
    out.print(f"wrote {out_dir} (image_codec.json, image_codec.safetensors, metrics.jsonl, tokenizer_eval.json), "
              f"{result.files['loss_png']} and {result.files['reconstructions_png']}")


@tokenizer_app.command("eval")
def image_tokenizer_eval(
    tokenizer: Annotated[Path, typer.Argument(help="Image tokenizer folder (from `genlab image tokenizer train`).")],
    folder: Folder,
    grid_png: Annotated[Path, typer.Option("--out", "-o", help="PNG of originals above their reconstructions.")] = Path("reconstructions.png"),
    show: Annotated[int, typer.Option(help="Images in the PNG.")] = 16,
):
    """Reconstruct every image in a folder with a trained tokenizer: MSE, PSNR, codebook use.

    Example: genlab image tokenizer eval runs/image-tok my-images/ --out recon.png
    """
    from genlab.codecs.image import ImageTokenizer, codebook_stats, psnr
    from genlab.image.train import comparison_grid, mean_colour_mse, thumbnail_mse

    if show < 1:
        raise InvalidParameterError("--show must be at least 1")
    tok = ImageTokenizer.from_folder(tokenizer)
    images = _read(folder, tok.config.size).images
    codes = tok.encode(images)
    recon = tok.decode(codes)
    mse = float(((recon.astype("float64") - images) ** 2).mean() / 255 ** 2)
    base_mean, base_thumb = mean_colour_mse(images), thumbnail_mse(images, tok.grid)
    m = {"mse": mse, "psnr": psnr(mse), "grid": list(tok.grid), "baseline_mean_colour_mse": base_mean,
         "baseline_mean_colour_psnr": psnr(base_mean), "baseline_thumbnail_mse": base_thumb,
         "baseline_thumbnail_psnr": psnr(base_thumb), **codebook_stats(codes, tok.codebook_size)}
    out.print(_report(m, f"{len(images)} images, {tok.tokens_per_image} tokens each"))
    out.print(f"codebook: {m['codes_used']} of {tok.codebook_size} codes used ({m['usage']:.0%}), "
              f"perplexity {m['perplexity']:.0f}")
    comparison_grid(images[:show], recon[:show], grid_png)
    out.print(f"wrote {grid_png}")


@image_app.command("scenes")
def image_scenes(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (replaced whole): NAME.png + NAME.txt pairs and specs.jsonl.")],
    n: Annotated[int, typer.Option("-n", help="Scenes to draw.")] = 30000,
    split: Annotated[str, typer.Option(help="train (never a held-out combination) | heldout (each shows one) | all.")] = "train",
    diverse: Annotated[bool, typer.Option("--diverse/--no-diverse", help="Train split: add the training-only colours, shapes, things and accessories (on by default for train).")] = True,
    seed: Annotated[int, typer.Option(help="Same seed -> same scenes.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
):
    """Write procedural captioned scenes (the bundled, measurable demo data: shapes, colours, cats
    with sunglasses / hats, suns, trees, spatial relations; exact captions).

    Example: genlab image scenes scenes/ -n 30000
    """
    from genlab.data.scenes import write_folder

    folder = write_folder(out_dir, n, split, seed=seed, size=size, diverse=diverse and split == "train")
    out.print(f"{n:,} {split} scenes ({size}x{size}{', diverse' if diverse and split == 'train' else ''}) -> {folder}")


@image_app.command("train")
def image_train(
    folder: Annotated[Path, typer.Argument(help="Folder of images with captions: NAME.txt beside each image, or a captions.csv (file, caption).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Image tokenizer folder (genlab image tokenizer train).")],
    out_dir: Out = None,
    config: Config = None,
    preset: Preset = None,
    caption_dropout: Annotated[Optional[float], typer.Option(help="Fraction of draws trained with the empty caption (what classifier-free guidance needs; 0.1 by default).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Default guidance scale recorded in the model folder (2 by default).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Default sampling temperature recorded in the model folder (0.8 by default).")] = None,
    captioner_minutes: Annotated[Optional[float], typer.Option(help="Then train the captioner that best-of-N generation ranks samples with (generate --candidates) this many minutes (0, the default: none).")] = None,
    batch_size: BatchSize = None,
    max_steps: MaxSteps = None,
    max_minutes: MaxMinutes = None,
    time_schedule: TimeSchedule = None,
    lr: Lr = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CkptEvery = None,
    seed: TrainSeed = None,
    device: TrainDevice = None,
    resume: Resume = False,
):
    """Train a text-to-image model on a folder of captioned images.

    Each image becomes BOS caption SEP image codes EOS, learned by genlab's transformer and
    trainer (progress bar, metrics.jsonl, loss.png, checkpoints, --resume); captions are dropped
    at random so classifier-free guidance works. Writes OUT/model and OUT/samples.png.

    Example: genlab image train scenes/ --tokenizer runs/image-tok --out runs/t2i --max-steps 3000 --preset 2m

    Example: genlab image train scenes/ --tokenizer runs/image-tok --out runs/t2i --max-minutes 12.5 --captioner-minutes 2.5
    """
    from genlab.image.model import fit_image_model

    overrides = dict(out=str(out_dir) if out_dir else None, preset=preset, caption_dropout=caption_dropout,
                     guidance=guidance, temperature=temperature, captioner_minutes=captioner_minutes,
                     batch_size=batch_size, max_steps=max_steps,
                     max_minutes=max_minutes, time_schedule=time_schedule, lr=lr, eval_every=eval_every,
                     checkpoint_every=checkpoint_every, seed=seed, device=device)
    result = fit_image_model(folder, tokenizer, config_file=config, resume=resume, console=err, **overrides)
    print(result.model_dir)


def _only_for(where: str, **given) -> None:
    """One error naming the options (given as not None) that do not apply here."""
    names = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if names:
        raise InvalidParameterError(f"{', '.join(names)} {'applies' if len(names) == 1 else 'apply'} to {where} only")


def _size(text: str | None):
    """--size: "W" or "WxH" (width first, as image sizes are written) -> None, int or (height, width)."""
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().replace(" ", "").split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise InvalidParameterError(f"--size takes WIDTHxHEIGHT (such as 768x512) or one number; got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[1], parts[0])


@image_app.command("generate")
def image_generate(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", show_default=False, help="Text-to-image model folder (genlab image train); leave it out with --pipeline.")] = None,
    captions: Annotated[Optional[list[str]], typer.Argument(metavar="CAPTION...", show_default=False, help="One or more captions / prompts (one row of the grid each).")] = None,
    pipeline: Annotated[Optional[Path], typer.Option("--pipeline", "-p", help="Local diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL; holds model_index.json) instead of MODEL.")] = None,
    lora: Annotated[Optional[Path], typer.Option(help="LoRA folder (genlab image finetune) or .safetensors file applied to --pipeline.")] = None,
    n: Annotated[int, typer.Option("-n", help="Images per caption (the grid's columns).")] = 4,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="PNG grid: one row per caption.")] = Path("grid.png"),
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance: 0 = ignore the caption, 1 = no guidance, >1 = follow it harder (default: the model's; 7.5 with --pipeline).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (--pipeline; 25 by default).")] = None,
    size: Annotated[Optional[str], typer.Option(help="Image size WIDTHxHEIGHT or one number, multiples of 8 (--pipeline; default: the pipeline's).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="What the images should not show (--pipeline).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 | float16 | bfloat16 (--pipeline; float32 by default, float16 halves GPU memory).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature, 0 = greedy (default: the model's).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep the k most likely image codes (0 = off, the default).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass in (0, 1] (1 by default).")] = None,
    candidates: Annotated[Optional[int], typer.Option(help="Best of N: draw N samples per image and keep those the model's captioner scores highest (1 by default; needs a model trained with --captioner-minutes).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed -> same images (image k of the grid uses seed + k with --pipeline).")] = 0,
    batch_size: Annotated[Optional[int], typer.Option(help="Images generated together (64 by default; 4 with --pipeline).")] = None,
    scale: Annotated[Optional[int], typer.Option(help="Enlarge each image this many times in the grid (4 by default).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
):
    """Generate images from captions as a PNG grid: with a genlab text-to-image model (MODEL), or
    with a local Stable Diffusion pipeline folder (--pipeline), optionally with a trained --lora.

    Example: genlab image generate runs/t2i/model "a cat wearing sunglasses" "a red square left of a blue circle" -n 4 --out grid.png --guidance 3 --seed 1

    Example: genlab image generate runs/t2i/model "a sun above a cat" -n 4 --candidates 8 --out best.png

    Example: genlab image generate --pipeline ~/models/sd15 --lora runs/my-lora "a watercolour harbour at dawn" -n 4 --steps 30 --size 512 --seed 1
    """
    if out_file.suffix.lower() != ".png":
        raise InvalidParameterError(f"--out must name a .png file, got {str(out_file)!r}")
    if pipeline is None:
        if model is None or not captions:
            raise InvalidParameterError("give a MODEL folder and at least one caption, or --pipeline DIR and prompts")
        _only_for("--pipeline", lora=lora, steps=steps, size=size, negative_prompt=negative_prompt, dtype=dtype)
        _generate_tokens(Path(model), captions, n, out_file, guidance, temperature, top_k, top_p, seed, batch_size, scale,
                         device, 1 if candidates is None else candidates)
        return
    if model is not None and Path(model).expanduser().is_dir():
        raise InvalidParameterError(f"give either a MODEL folder or --pipeline, not both ({model} is a folder, not a prompt)")
    _only_for("genlab models (MODEL)", temperature=temperature, top_k=top_k, top_p=top_p, scale=scale, candidates=candidates)
    prompts = [model, *(captions or [])] if model is not None else []
    if not prompts:
        raise InvalidParameterError("give at least one prompt after --pipeline DIR")
    _generate_diffusers(pipeline, prompts, n, out_file, lora, seed, device, dtype, guidance=guidance, steps=steps,
                        size=_size(size), negative_prompt=negative_prompt, batch_size=batch_size)


def _generate_tokens(model, captions, n, out_file, guidance, temperature, top_k, top_p, seed, batch_size, scale, device,
                     candidates=1):
    import time

    from genlab.image.grid import save_grid
    from genlab.image.model import ImageModel

    scale = 4 if scale is None else scale
    if scale < 1:
        raise InvalidParameterError("--scale must be at least 1")
    image_model = ImageModel.load(model, device=device)
    unknown = sorted({w for c in captions for w in image_model.codec.vocab.unknown(c)})
    if unknown:
        err.print(f"[yellow]note:[/] words the model never saw are left out: {', '.join(unknown)}", highlight=False)
    start = time.perf_counter()
    images = image_model.generate(captions, n=n, guidance=guidance, temperature=temperature,
                                  top_k=0 if top_k is None else top_k, top_p=1.0 if top_p is None else top_p,
                                  seed=seed, batch_size=batch_size or 64, candidates=candidates)
    seconds = time.perf_counter() - start
    save_grid(images, out_file, columns=n, labels=captions, scale=scale)
    g = image_model.default_guidance if guidance is None else guidance
    t = image_model.default_temperature if temperature is None else temperature
    best = f", each the best of {candidates} by the captioner" if candidates > 1 else ""
    out.print(f"{len(images)} images ({len(captions)} caption(s) x {n}{best}, guidance {g:g}, temperature {t:g}) in "
              f"{seconds:.1f}s -> {out_file}")


def _generate_diffusers(pipeline, prompts, n, out_file, lora, seed, device, dtype, **options):
    import inspect
    import time

    from genlab.image.diffusion import generate_images, load_pipeline, save_grid

    options = {k: v for k, v in options.items() if v is not None}  # the rest: generate_images' defaults
    used = {k: p.default for k, p in inspect.signature(generate_images).parameters.items()} | options
    pipe = load_pipeline(pipeline, device=device, dtype=dtype, lora=lora)
    start = time.perf_counter()
    images = generate_images(pipe, prompts, n=n, seed=seed, console=err, **options)
    seconds = time.perf_counter() - start
    save_grid(images, out_file, columns=n)
    w, h = images[0].size
    out.print(f"{len(images)} images ({len(prompts)} prompt(s) x {n}, {w}x{h}, {used['steps']} steps, guidance "
              f"{used['guidance']:g}, seed {seed}{f', LoRA {lora}' if lora else ''}) in {seconds:.1f}s -> {out_file}",
              highlight=False)


@image_app.command("finetune")
def image_finetune(
    pipeline: Annotated[Path, typer.Option("--pipeline", "-p", show_default=False, help="Local diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL; holds model_index.json).")],
    data: Annotated[Path, typer.Option("--data", "-d", show_default=False, help="Folder of images with captions: NAME.txt beside each image, or a captions.csv (file, caption).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", show_default=False, help="LoRA folder to write (replaced whole on success): pytorch_lora_weights.safetensors, genlab.json, metrics.jsonl, loss.png.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW, constant).")] = 1e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank of the UNet attention projections.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 4,
    resolution: Annotated[Optional[int], typer.Option(help="Training size: images are centre-cropped and resized to a square of this side (default: the pipeline's).")] = None,
    caption: Annotated[str, typer.Option(help="Caption for images that have none.")] = "",
    eval_every: Annotated[Optional[int], typer.Option(help="Measure the loss on fixed images / noise every N steps (default: 5 times per run).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the LoRA initialisation, batches, noise and timesteps.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option(help="float32 | float16 | bfloat16 for the frozen pipeline (the LoRA trains in float32).")] = None,
):
    """Train a LoRA on your own captioned images for a local Stable Diffusion pipeline (diffusers + PEFT).

    The LoRA is saved in diffusers' format (plain `pipe.load_lora_weights(OUT)` loads it); the
    loss on fixed images, noise and timesteps is measured before and after training.

    Example: genlab image finetune --pipeline ~/models/sd15 --data my-images/ --out runs/my-lora --steps 1000 --device cuda --dtype float16
    """
    from genlab.image.diffusion import finetune_lora

    result = finetune_lora(pipeline, data, out_dir, steps=steps, lr=lr, rank=rank, batch_size=batch_size,
                           resolution=resolution, seed=seed, console=err, default_caption=caption, device=device,
                           dtype=dtype, eval_every=eval_every)
    table = Table("loss on fixed images / noise / timesteps", "value", title=f"LoRA rank {rank}, {result.steps} steps "
                  f"in {result.seconds:.0f}s", title_justify="left")
    table.add_row("base pipeline", f"{result.loss_before:.4f}")
    table.add_row("with the LoRA", f"{result.loss_after:.4f}")
    table.add_row("change", f"{result.loss_after / result.loss_before - 1:+.1%}")
    out.print(table)
    out.print(f"wrote {out_dir} ({', '.join(p.name for p in result.files.values())})", highlight=False)
    out.print(f"use it: genlab image generate --pipeline {pipeline} --lora {out_dir} \"PROMPT\"", highlight=False)


@image_app.command("serve")
def image_serve(
    model_dir: Annotated[Path, typer.Argument(help="Text-to-image model folder (genlab image train).")],
    db: Annotated[Path, typer.Option(help="Feedback database (every image, rating and A/B choice).")] = Path("genlab-feedback.db"),
    registry: Annotated[Optional[Path], typer.Option(help="Image version registry (genlab image improve writes it): serve its promoted version, switch when it changes.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_keys_file: Annotated[Optional[Path], typer.Option(help="Keys file from genlab keys create (hashed keys).")] = None,
):
    """Serve a text-to-image model: POST /v1/images/generations (OpenAI's shape, b64_json PNGs),
    the feedback API (/v1/feedback: thumbs and A/B choices on image ids) and the web UI (/).

    Example: genlab image serve runs/t2i/model --db feedback.db --registry image-registry.db
    """
    import uvicorn

    from genlab.serve.app import ServeConfig, create_app

    config = ServeConfig(db=db, image_model=model_dir, image_registry=registry, api_keys_file=api_keys_file)
    err.print(f"genlab: serving images from {model_dir} on http://{host}:{port} (UI at /, feedback in {db})",
              highlight=False)
    uvicorn.run(create_app(None, config), host=host, port=port, log_level="info")


@image_app.command("improve")
def image_improve(
    model_dir: Annotated[Path, typer.Argument(help="Base text-to-image model folder (the one genlab image serve serves).")],
    feedback: Annotated[Path, typer.Option("--feedback", help="Feedback database written by genlab image serve.")],
    registry: Annotated[Optional[Path], typer.Option(help="Image version registry (default: image-registry.db beside the feedback database).")] = None,
    runs: Annotated[Path, typer.Option("--out", "-o", help="Runs folder (candidate adapter, report.json, gate.png).")] = Path("runs/improve-image"),
    method: Annotated[Optional[str], typer.Option(help="dpo (A/B choices) or kto (thumbs / ratings); default: dpo with enough pairs, else kto.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the A/B pairs or rated images (default: 4 for DPO, 0.25 for KTO).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the LoRA adapter (default: 2e-3 for DPO, 1e-3 for KTO).")] = None,
    beta: Annotated[float, typer.Option(help="DPO / KTO beta: the pull towards the serving version.")] = 0.1,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Gate and register the candidate, but never promote it.")] = False,
):
    """DPO on the A/B choices users made between images (or KTO on their thumbs when pairs are
    too few): a candidate LoRA adapter, gated on held-out prompts (preference accuracy, drift of
    the images it draws) and promoted in the registry only if it clears every bar.

    Example: genlab image improve runs/t2i/model --feedback feedback.db [--method kto]
    """
    from genlab.image.feedback import ImagePreferConfig, improve_images

    if not feedback.is_file():
        raise InvalidParameterError(f"{feedback}: no such feedback database (genlab image serve --db writes it)")
    report = improve_images(model_dir, feedback, registry, runs, ImagePreferConfig(epochs=epochs, lr=lr, beta=beta),
                            promote=not no_promote, method=method, console=err)
    out.print(f"report: {report.out_dir / 'report.json'}", highlight=False)

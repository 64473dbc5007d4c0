"""Text-to-image as next-token prediction: `genlab image train` and `genlab image generate`.

Fitting reads captioned images (a folder with sidecar .txt files or a captions.csv, or arrays),
encodes every image once with a trained image tokenizer (codecs/image.py), builds the caption
word vocabulary, and trains genlab's transformer from scratch in the shared loop on
BOS caption SEP codes EOS (image/codec.py), with the loss on the image codes and EOS only.
Caption dropout replaces a caption by the empty one (each image appears `views` times per pass
over the data, each time with its own seeded draw), which teaches the unconditional model that
classifier-free guidance needs.

Generation runs the conditional prompt (BOS caption SEP) and the unconditional one (BOS SEP)
of every sample in one batch through the KV cache; at each of the 64 steps the image-code logits
are mixed as uncond + g * (cond - uncond) (g = 0: unconditional, g = 1: conditional only), the
engine's temperature / top-k / top-p apply, and only image codes can be drawn. The k-th sample
of a caption uses seed + k, so a seeded request gives the same images whatever shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from genlab.errors import DataError, InvalidParameterError
from genlab.image.codec import BOS, EOS, PAD, SEP, CaptionVocab, TextImageCodec
from genlab.model import io
from genlab.model.presets import preset
from genlab.model.transformer import KVCache, Transformer
from genlab.train import distributed
from genlab.train.batches import IGNORE
from genlab.train.config import TrainConfig
from genlab.train.loop import Result, Trainer


@dataclass
class ImageModelConfig(TrainConfig):
    out: str = "runs/t2i"
    preset: str = "2m"
    caption_dropout: float = 0.1  # fraction of draws whose caption is replaced by the empty one (CFG)
    views: int = 4  # each image's appearances per pass over the data, each with its own dropout draw
    max_caption_tokens: int = 64  # longer captions are cut (counted in the log)
    lowercase: bool = True  # captions are lowercased before splitting into words
    caption_words: int = 8192  # vocabulary size cap (the most frequent words; others are left out)
    min_word_count: int = 1  # words seen fewer times are left out of the vocabulary
    guidance: float = 2.0  # default classifier-free guidance recorded in generation_config.json
    temperature: float = 0.8  # default sampling temperature recorded there
    batch_size: int = 32
    max_steps: int = 3000
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    checkpoint_every: int = 500
    val_fraction: float = 0.02
    samples: int = 8  # validation captions drawn into samples.png after training (0: none)
    captioner_minutes: float = 0.0  # > 0: then train the best-of-N captioner (image/rerank.py) this long
    captioner_steps: int = 100_000  # ... or this many steps, whichever ends first

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise InvalidParameterError("caption_dropout must be in [0, 1)")
        if self.views < 1 or self.max_caption_tokens < 1 or self.guidance < 0 or self.temperature < 0:
            raise InvalidParameterError("views and max_caption_tokens must be >= 1, guidance and temperature >= 0")
        if self.captioner_minutes < 0 or self.captioner_steps < 1:
            raise InvalidParameterError("captioner_minutes must be >= 0 and captioner_steps >= 1")


@dataclass
class ImageRunResult:
    out: Path
    model_dir: Path
    result: Result
    val_loss_before: float
    images: int
    data: dict = field(default_factory=dict)


class CaptionedCodes:
    """Training rows for the Trainer: row r is image r % n in view r // n (len = views * n).
    Each view draws, seeded, whether the caption is dropped. A row is one sequence padded (after
    EOS, so causal attention never sees the padding) to seq_len; targets are the image codes and
    EOS (-100 elsewhere)."""

    def __init__(self, caption_ids: list[list[int]], codes: np.ndarray, seq_len: int, image_offset: int,
                 dropout: float = 0.0, views: int = 1, seed: int = 0):
        self.caption_ids = caption_ids
        self.codes = np.asarray(codes, dtype=np.int64) + image_offset
        self.n, self.views, self.seq_len = len(caption_ids), views, seq_len
        self.dropped = np.random.default_rng([seed, 17]).random((views, self.n)) < dropout

    def __len__(self) -> int:
        return self.n * self.views

    def sequence(self, row: int) -> list[int]:
        view, i = divmod(int(row), self.n)
        caption = [] if self.dropped[view, i] else self.caption_ids[i]
        return [BOS, *caption, SEP, *self.codes[i].tolist(), EOS]

    def get(self, rows) -> dict[str, torch.Tensor]:
        t = self.seq_len
        ids = np.full((len(rows), t), PAD, dtype=np.int64)
        targets = np.full((len(rows), t), IGNORE, dtype=np.int64)
        for k, row in enumerate(rows):
            seq = self.sequence(row)
            n, sep = len(seq) - 1, seq.index(SEP)
            ids[k, :n] = seq[:-1]
            targets[k, sep:n] = seq[sep + 1:]  # what follows SEP: the codes and EOS
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}


def read_captioned(data) -> tuple[np.ndarray, list[str], str]:
    """(images, captions, description) from a folder or an (images, captions) pair."""
    if isinstance(data, (str, Path)):
        from genlab.data.images import read_image_folder

        found = read_image_folder(data, captions="required")
        return found.images, list(found.captions), str(data)
    try:
        images, captions = data
    except (TypeError, ValueError):
        raise InvalidParameterError("data must be a folder or an (images, captions) pair") from None
    images = np.asarray(images)
    captions = list(captions)
    if len(images) != len(captions):
        raise DataError(f"{len(images)} images but {len(captions)} captions")
    empty = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise DataError(f"image {empty[0]} has no caption ({len(empty)} in all); every training image needs one")
    return images, captions, "arrays"


def fit_image_model(data, tokenizer_dir, out: str | Path | None = None, config: ImageModelConfig | None = None,
                    config_file: str | Path | None = None, resume: bool = False, console: Console | None = None,
                    **overrides) -> ImageRunResult:
    """Train a text-to-image model on captioned images (folder or (images, captions) pair) with
    the image tokenizer in `tokenizer_dir`. OUT/ gets model/, caption_tokenizer/, checkpoints/,
    config.yaml, metrics.jsonl, loss.png and samples.png."""
    from genlab.codecs.image import ImageTokenizer

    if out is not None:
        overrides["out"] = str(out)
    cfg = config or ImageModelConfig.load(config_file, **overrides)
    console = console or Console(stderr=True)
    image_tok = ImageTokenizer.from_folder(tokenizer_dir)
    images, captions, source = read_captioned(data)
    size = image_tok.config.size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise DataError(f"images must be uint8 [N, {size}, {size}, 3] for this tokenizer; got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise DataError(f"training needs at least 2 captioned images (one for validation); got {len(images)}")
    d, log, out = distributed.start(cfg, resume, console)
    caption_dir = out / "caption_tokenizer"
    if resume and caption_dir.exists():
        vocab = CaptionVocab.from_folder(caption_dir)  # the run's own: a resumed run keeps its vocabulary
    else:
        vocab = CaptionVocab.train(captions, cfg.lowercase, cfg.caption_words, cfg.min_word_count)
        if d.is_main:
            vocab.save_pretrained(caption_dir)
    codec = TextImageCodec(vocab, image_tok, cfg.max_caption_tokens)
    codes = image_tok.encode(images).reshape(len(images), -1)  # once, batched, no grad
    full = [codec.caption_ids(c) for c in captions]
    cut = sum(len(vocab.encode(c)) > cfg.max_caption_tokens for c in set(captions))
    if cut:
        log(f"[yellow]warning:[/] {cut} distinct captions are longer than {cfg.max_caption_tokens} tokens and were cut")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(images))
    n_val = min(len(images) - 1, max(1, int(round(len(images) * cfg.val_fraction))))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    seq_len = max(len(c) for c in full) + codec.tokens_per_image + 2  # inputs: the sequence minus its last token
    train = CaptionedCodes([full[i] for i in train_idx], codes[train_idx], seq_len, codec.image_offset,
                           cfg.caption_dropout, cfg.views, cfg.seed)
    val = CaptionedCodes([full[i] for i in val_idx], codes[val_idx], seq_len, codec.image_offset)  # conditional loss
    model_cfg = replace(preset(cfg.preset), vocab_size=len(codec), max_seq_len=codec.max_length)
    torch.manual_seed(cfg.seed)
    module = Transformer(model_cfg).init_weights(cfg.seed)
    log(f"text-to-image model {cfg.preset}: {module.num_params() / 1e6:.2f}M parameters, vocabulary {len(codec)} "
        f"({codec.text_vocab} caption words + {codec.codebook_size} image codes + 4 special); {len(train_idx):,} training and "
        f"{n_val:,} validation images, {len(set(captions)):,} distinct captions, {seq_len + 1} tokens per sequence; "
        f"caption dropout {cfg.caption_dropout}; {d.world} process(es) on {d.device}")
    fingerprint = {"model": model_cfg.to_dict(), "codec": codec.to_dict(), "images": len(images), "seed": cfg.seed,
                   "caption_dropout": cfg.caption_dropout, "views": cfg.views,
                   "global_batch": cfg.batch_size * cfg.grad_accum * d.world}
    cfg.seq_len = seq_len
    trainer = Trainer(cfg, module, train, val, out, d, fingerprint, console)
    start, before = trainer.begin(resume)
    result = trainer.run(start, initial_val_loss=None if resume else before)
    model_dir = out / "model"
    info = {"images": len(images), "train_images": len(train_idx), "val_images": n_val, "source": source,
            "distinct_captions": len(set(captions))}
    if d.is_main:
        meta = {"codec": codec.to_dict(), "model_config": model_cfg.to_dict(),
                "provenance": {"created_by": "genlab image train", "config": cfg.to_dict(), "data": info,
                               "image_tokenizer": str(tokenizer_dir)},
                "metrics": {"val_loss": result.val_loss, "train_loss": result.train_loss, "steps": result.step,
                            "val_loss_before": before, "seconds": result.seconds}}
        io.save(model_dir, trainer.raw.eval(), codec, meta=meta,
                generation={"guidance": cfg.guidance, "temperature": cfg.temperature})
        log(f"done: {result.step} steps in {result.seconds:.0f}s; validation loss {before:.3f} -> "
            f"{result.val_loss:.3f} nats/token; text-to-image model -> {model_dir}")
        if cfg.captioner_minutes > 0:
            from genlab.image.rerank import train_captioner

            captioner, info["captioner"] = train_captioner(
                images[train_idx], [vocab.encode(captions[i])[: cfg.max_caption_tokens] for i in train_idx], len(vocab),
                max_steps=cfg.captioner_steps, max_minutes=cfg.captioner_minutes, seed=cfg.seed, console=console)
            captioner.save(model_dir / "captioner")
            log(f"captioner for best-of-N: {info['captioner']['steps']} steps in {info['captioner']['seconds']:.0f}s, "
                f"loss {info['captioner']['final_loss']:.3f} -> {model_dir / 'captioner'}")
        if cfg.samples:
            from genlab.image.grid import save_grid

            shown = list(dict.fromkeys(captions[i] for i in val_idx))[: cfg.samples]
            model = ImageModel.load(model_dir, device="cpu")
            pictures = model.generate(shown, n=4, seed=cfg.seed)
            save_grid(pictures, out / "samples.png", columns=4, labels=shown)
    distributed.barrier(d)
    distributed.teardown()
    return ImageRunResult(out, model_dir, result, before, len(images), info)


def load_captioner(model_dir: str | Path):
    """The best-of-N captioner in a model folder (`captioner/`), or None when it has none."""
    if not (Path(model_dir) / "captioner").is_dir():
        return None
    from genlab.image.rerank import Captioner

    return Captioner.load(Path(model_dir) / "captioner")


class ImageModel:
    """A trained text-to-image model: captions in, uint8 images out."""

    def __init__(self, module: Transformer, codec: TextImageCodec, device: str = "cpu",
                 generation: dict | None = None, pack: bool = True, captioner=None):
        self.module, self.codec, self.device = module.eval(), codec, torch.device(device)
        self.captioner = captioner  # image/rerank.Captioner (on the CPU) for candidates > 1, or None
        if pack:
            self.module.pack_for_inference()
        generation = generation or {}
        self.default_guidance = float(generation.get("guidance", 2.0))
        self.default_temperature = float(generation.get("temperature", 1.0))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ImageModel":
        loaded = io.load(path, dtype=torch.float32, device=device)
        if not isinstance(loaded.tokenizer, TextImageCodec):
            raise InvalidParameterError(f"{path}: not a text-to-image model (genlab.json names no text-image codec); "
                                        "train one with `genlab image train`")
        loaded.tokenizer.image.to(device)
        return cls(loaded.module, loaded.tokenizer, device, loaded.generation, captioner=load_captioner(path))

    def generate(self, captions: str | list[str], n: int = 4, guidance: float | None = None, temperature: float | None = None,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                 candidates: int = 1) -> np.ndarray:
        """uint8 images [len(captions) * n, S, S, 3]: caption i's samples are rows i*n ... i*n+n-1.

        guidance: classifier-free guidance scale (0 = unconditional, 1 = conditional without
        guidance); guidance and temperature None: the model folder's defaults (generation_config.json).
        Captions are split into words; words the model never saw are left out (`codec.vocab.unknown`
        lists them). Seeds: a caption's k-th sample in the
        request (counting repeats of the same caption) uses seed + k, so results do not depend on
        batch_size or on the other captions, and a repeated caption gets new samples.
        candidates > 1: best-of-N; each caption's n * candidates samples are scored by the model's
        captioner (log p(caption | image), `image/rerank.py`) and the n best are kept, best first."""
        codes = self.generate_codes(captions, n, guidance, temperature, top_k, top_p, seed, batch_size, candidates)
        return self.decode(codes)

    def _need_captioner(self) -> None:
        if self.captioner is None:
            raise InvalidParameterError("candidates > 1 needs the model's captioner, and this model has none: "
                                        "train it with `genlab image train ... --captioner-minutes M`")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Image codes [N, h*w] -> uint8 images [N, S, S, 3]."""
        return self.codec.image.decode(codes.reshape(len(codes), *self.codec.image.grid))

    def best_of(self, captions: list[str], codes: np.ndarray, n: int) -> np.ndarray:
        """Which n of each caption's samples the captioner ranks highest, best first: indices
        [len(captions), n] into that caption's rows of `codes` (len(codes) // len(captions) each)."""
        self._need_captioner()
        k = len(codes) // len(captions)
        words = [self.codec.vocab.encode(c)[: self.codec.max_caption_tokens] for c in captions for _ in range(k)]
        scores = self.captioner.score(self.decode(codes), words).reshape(len(captions), k)
        return np.argsort(-scores, axis=1, kind="stable")[:, :n]

    @torch.inference_mode()
    def generate_codes(self, captions: str | list[str], n: int = 4, guidance: float | None = None,
                       temperature: float | None = None, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 64, candidates: int = 1) -> np.ndarray:
        """Image codes [len(captions) * n, h*w] (the image tokenizer's code ids); candidates: as
        in `generate`."""
        from genlab.generate.sampling import SamplingParams

        captions = [captions] if isinstance(captions, str) else list(captions)
        guidance = self.default_guidance if guidance is None else float(guidance)
        temperature = self.default_temperature if temperature is None else float(temperature)
        if not captions or any(not isinstance(c, str) for c in captions):
            raise InvalidParameterError("give at least one caption (a string; \"\" = unconditional)")
        if not isinstance(n, int) or n < 1 or batch_size < 1:
            raise InvalidParameterError("n and batch_size must be integers >= 1")
        if not isinstance(candidates, int) or candidates < 1:
            raise InvalidParameterError(f"candidates must be an integer >= 1, not {candidates!r}")
        if candidates > 1:
            self._need_captioner()  # before drawing n * candidates samples
            codes = self.generate_codes(captions, n * candidates, guidance, temperature, top_k, top_p, seed, batch_size)
            picked = self.best_of(captions, codes, n) + n * candidates * np.arange(len(captions))[:, None]
            return codes[picked.reshape(-1)]
        if not np.isfinite(guidance) or guidance < 0:
            raise InvalidParameterError(f"guidance must be >= 0 (0 = unconditional, 1 = no guidance); got {guidance}")
        params = SamplingParams(max_new_tokens=self.codec.tokens_per_image, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed)  # validates the sampling controls
        seen: dict[str, int] = {}
        rows = []
        for c in captions:
            rows += [(c, params.seed + seen.get(c, 0) + j) for j in range(n)]
            seen[c] = seen.get(c, 0) + n
        out = [self._batch(rows[i:i + batch_size], guidance, params) for i in range(0, len(rows), batch_size)]
        return np.concatenate(out)

    def _batch(self, rows: list[tuple[str, int]], guidance: float, params) -> np.ndarray:
        """Codes for rows of (caption, seed)."""
        from genlab.generate.backends import additive, left_pad
        from genlab.generate.sampling import RowSampler

        codec, b, steps = self.codec, len(rows), self.codec.tokens_per_image
        # g = 0 needs only the unconditional stream, g = 1 only the conditional one; else both, in one batch
        cond = [] if guidance == 0 else [codec.prompt(c) for c, _ in rows]
        uncond = [] if guidance == 1 else [codec.prompt("")] * b
        streams = len(cond + uncond) // b
        sampler = RowSampler([params] * b, [s for _, s in rows], codec.codebook_size, self.device)
        ids, valid = left_pad(cond + uncond, PAD, self.device)
        t, dtype = ids.shape[1], self.module.lm_head.weight.dtype
        cache = KVCache(self.module.config, len(ids), t + steps, self.device, dtype)
        keys = torch.zeros(len(ids), t + steps, dtype=torch.bool, device=self.device)
        keys[:, :t] = valid
        positions = (valid.cumsum(1) - 1).clamp_min(0)  # left padding: each prompt starts at position 0
        mask = additive(codec.attention_mask(ids, valid), dtype)
        logits = self.module(ids, positions, cache, torch.arange(t, device=self.device), t, mask, last_only=True)
        lo, hi = codec.image_offset, codec.image_offset + codec.codebook_size
        chosen = torch.empty(b, steps, dtype=torch.long, device=self.device)
        next_pos = valid.sum(1, keepdim=True)
        for step in range(steps):
            scores = logits[:, -1, lo:hi].float()  # only image codes can be drawn
            if streams == 2:
                scores = scores[b:] + guidance * (scores[:b] - scores[b:])
            token = sampler(scores)
            chosen[:, step] = token
            if step == steps - 1:
                break
            slot = t + step
            keys[:, slot] = True
            step_mask = additive(keys[:, None, None, : slot + 1], dtype)
            logits = self.module((token + lo).repeat(streams)[:, None], next_pos, cache,
                                 torch.tensor([slot], device=self.device), slot + 1, step_mask)
            next_pos = next_pos + 1
        return chosen.cpu().numpy()

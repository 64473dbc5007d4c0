"""Best-of-N for text-to-image: a captioner scores log p(caption | image) and keeps the best.

DALL-E drew many images per caption and kept those CLIP liked best; genlab does the same with a
small image captioner trained on the same captioned images (a CNN over the pixels, a transformer
decoder over the caption words, cross-attending to the CNN's grid). A captioner, unlike a
contrastive image-text model, has to say the words in order ("a red square left of a blue
circle"), so swapped colours or a wrong arrangement cost it probability: it judges what a bag of
words would miss. It uses the text-to-image model's caption vocabulary and lives in the model
folder (`captioner/`), so `ImageModel.generate(..., candidates=N)` can rerank.

`train_captioner` runs for a number of steps or minutes (whichever ends first; cosine learning
rate by the clock when timed); `Captioner.score` is the summed log-probability of the caption's
words and end marker given each image.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from genlab.errors import DataError, InvalidParameterError
from genlab.model.io import load_network, save_network

BOS, EOS, PAD = 0, 1, 2  # caption word w has id w + 3


@dataclass
class CaptionerConfig:
    words: int  # caption vocabulary size (the text-to-image model's)
    size: int = 32  # image side in pixels
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_words: int = 64  # longer captions are cut


class Captioner(nn.Module):
    """CNN encoder (2x2 patches, then stride-2 steps down to a grid of at most 8x8) + transformer
    decoder cross-attending to the grid."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = c = config
        # 2x2 patches (48 channels) and a 3x3 over them; then halve the grid, double the channels
        # (up to width) and one more 3x3 at that size, until the grid is at most 8x8
        convs = [nn.Conv2d(3, 48, 2, stride=2), nn.GELU(), nn.Conv2d(48, 48, 3, padding=1), nn.GELU()]
        channels, side = 48, (c.size + 1) // 2
        while side > 8:
            out = min(c.width, channels * 2)
            convs += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(out, out, 3, padding=1), nn.GELU()]
            channels, side = out, (side + 1) // 2
        convs.append(nn.Conv2d(channels, c.width, 1))
        self.cnn = nn.Sequential(*convs)
        self.grid_pos = nn.Parameter(torch.randn(side * side, c.width) * 0.02)
        self.embed = nn.Embedding(c.words + 3, c.width)
        self.pos = nn.Parameter(torch.randn(c.max_words + 2, c.width) * 0.02)
        layer = nn.TransformerDecoderLayer(c.width, c.heads, 2 * c.width, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.layers)
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.words + 3)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> the grid as a sequence [B, cells, width]."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.cnn(x).flatten(2).transpose(1, 2) + self.grid_pos

    def forward(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.pos[:t]
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)
        h = self.decoder(h, memory, tgt_mask=causal, tgt_key_padding_mask=ids == PAD)
        return self.head(self.norm(h))

    def rows(self, caption_ids: list[list[int]]) -> torch.Tensor:
        """BOS words EOS, padded: [B, longest + 2]."""
        cut = [ids[: self.config.max_words] for ids in caption_ids]
        x = torch.full((len(cut), max(map(len, cut)) + 2), PAD, dtype=torch.long)
        for i, ids in enumerate(cut):
            x[i, : len(ids) + 2] = torch.tensor([BOS, *(w + 3 for w in ids), EOS])
        return x

    def loss(self, images: torch.Tensor, caption_ids: list[list[int]]) -> torch.Tensor:
        ids = self.rows(caption_ids)
        logits = self(self.encode(images), ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)

    @torch.inference_mode()
    def score(self, images: np.ndarray, caption_ids: list[list[int]], batch_size: int = 256) -> np.ndarray:
        """log p(caption | image) for each (image, caption) row: float64 [N]."""
        if len(images) != len(caption_ids):
            raise InvalidParameterError(f"{len(images)} images but {len(caption_ids)} captions to score")
        self.eval()
        out = []
        for s in range(0, len(images), batch_size):
            ims = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))
            ids = self.rows(caption_ids[s:s + batch_size])
            logp = self(self.encode(ims), ids[:, :-1]).log_softmax(-1)
            target = ids[:, 1:]
            picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            out.append((picked * (target != PAD)).sum(1).double())
        return torch.cat(out).numpy()

    def save(self, folder) -> Path:
        """captioner.safetensors + captioner.json, written as a whole (temp, rename)."""
        return save_network(folder, "captioner", self, {"config": asdict(self.config)})

    @classmethod
    def load(cls, folder) -> "Captioner":
        return load_network(folder, "captioner", lambda info: cls(CaptionerConfig(**info["config"])), "captioner")[0]


def train_captioner(images: np.ndarray, caption_ids: list[list[int]], words: int, max_steps: int = 2000,
                    max_minutes: float | None = None, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                    console: Console | None = None) -> tuple[Captioner, dict]:
    """A captioner for uint8 images [N, S, S, 3] and their caption word ids (vocabulary of
    `words`), trained until max_steps or max_minutes; the learning rate warms up over 100 steps
    and then follows a cosine (of the steps, or of the clock when timed) down to a tenth."""
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3 or images.dtype != np.uint8:
        raise DataError(f"captioner images must be uint8 [N, S, S, 3]; got {images.dtype} {images.shape}")
    if len(images) != len(caption_ids) or not len(images):
        raise DataError(f"{len(images)} images and {len(caption_ids)} captions: need the same number, at least one")
    if max_steps < 1 or batch_size < 1 or (max_minutes is not None and max_minutes <= 0):
        raise InvalidParameterError("max_steps and batch_size must be >= 1, max_minutes > 0")
    torch.manual_seed(seed)
    module = Captioner(CaptionerConfig(words=words, size=int(images.shape[1]))).train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 23])
    pixels, budget = torch.from_numpy(images), None if max_minutes is None else 60 * max_minutes
    start, step, losses = time.perf_counter(), 0, []
    while step < max_steps:
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed >= budget and step:  # at least one step, however small the budget
            break
        done = max(step / max_steps, 0 if budget is None else elapsed / budget)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))
        rows = rng.integers(0, len(images), batch_size)
        loss = module.loss(pixels[rows], [caption_ids[r] for r in rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if console is not None and step % 250 == 0:
            console.print(f"captioner step {step}: loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - start:.0f}s)")
    info = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "final_loss": float(np.mean(losses[-50:])),
            "batch_size": batch_size, "lr": lr, "seed": seed}
    return module.eval(), info

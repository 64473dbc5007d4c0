"""Images as tokens (the DALL-E 1 recipe, with FSQ instead of a learned codebook).

A small convolutional encoder maps a 32x32 RGB image to an 8x8 grid of 4-number vectors; finite
scalar quantization (FSQ, Mentzer et al. 2023) rounds each number to one of a few levels, so the
grid holds 64 codes out of prod(levels) (8*5*5*5 = 1000 by default); a mirrored decoder turns the
codes back into pixels. FSQ has no codebook to learn, so no codebook collapse, commitment loss
or code reseeding: training is plain reconstruction MSE through a straight-through round.

Codes are read in raster order (row by row), which is the order a next-token model sees them.
A model folder carries the tokenizer as `image_codec.json` (config) + `image_codec.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from genlab.errors import InvalidParameterError, ModelLoadError

CONFIG_FILE = "image_codec.json"
WEIGHTS_FILE = "image_codec.safetensors"


@dataclass(frozen=True)
class ImageCodecConfig:
    size: int = 32  # images are size x size RGB (genlab.data.images normalises any input to it)
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels per latent channel; codebook = product
    width: int = 64  # channels at the grid resolution (half of it at full resolution)
    downsample: int = 2  # stride-2 stages: grid side = size / 2**downsample
    blocks: int = 1  # residual blocks per resolution

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        if not self.levels or min(self.levels) < 2:
            raise InvalidParameterError(f"FSQ levels must be integers >= 2, got {list(self.levels)}")
        if self.downsample < 0 or self.size % (2 ** self.downsample) or self.size < 4:
            raise InvalidParameterError(f"image size {self.size} must be divisible by 2**downsample = {2 ** self.downsample}")
        if self.width < 8 or self.width % 8 or self.blocks < 0:
            raise InvalidParameterError("width must be a multiple of 8 and blocks >= 0")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.size // 2 ** self.downsample
        return side, side

    @property
    def channels(self) -> list[int]:
        """Channels per resolution, full resolution first: width/2 at full size, width below."""
        return [self.width // 2] + [self.width] * self.downsample if self.downsample else [self.width]


class FSQ(nn.Module):
    """Finite scalar quantization: bound each channel with tanh, round to `levels[i]` values."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        lv = torch.tensor(levels, dtype=torch.long)
        self.register_buffer("levels", lv, persistent=False)
        # mixed-radix place values: code = sum(digit_i * basis_i)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1, *levels[:-1]]), 0), persistent=False)
        self.codebook_size = int(np.prod(levels))

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        # even level counts need a half-step offset so rounding yields exactly L values
        half = (self.levels - 1) * (1 - eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> quantized values in [-1, 1], gradients passed straight through the round."""
        b = self.bound(z)
        q = b + (torch.round(b) - b).detach()
        return q / (self.levels // 2)

    def to_codes(self, q: torch.Tensor) -> torch.Tensor:
        digits = torch.round(q * (self.levels // 2) + self.levels // 2).long()
        return (digits * self.basis).sum(-1)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes.long().unsqueeze(-1) // self.basis) % self.levels
        return (digits - self.levels // 2).float() / (self.levels // 2)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _encoder(cfg: ImageCodecConfig) -> nn.Sequential:
    ch = cfg.channels
    layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
    for i in range(cfg.downsample):
        layers += [ResBlock(ch[i]) for _ in range(cfg.blocks)]
        layers.append(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1))
    layers += [ResBlock(ch[-1]) for _ in range(cfg.blocks)]
    layers += [nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], len(cfg.levels), 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: ImageCodecConfig) -> nn.Sequential:
    ch = cfg.channels
    layers: list[nn.Module] = [nn.Conv2d(len(cfg.levels), ch[-1], 3, padding=1)]
    layers += [ResBlock(ch[-1]) for _ in range(cfg.blocks)]
    for i in reversed(range(cfg.downsample)):
        # nearest upsample + conv instead of a transposed conv: no checkerboard artefacts
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i + 1], ch[i], 3, padding=1)]
        layers += [ResBlock(ch[i]) for _ in range(cfg.blocks)]
    layers += [nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
    return nn.Sequential(*layers)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1], NCHW -> uint8 NHWC."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ImageTokenizer(nn.Module):
    """encode(uint8 [N, S, S, 3]) -> int64 codes [N, h, w]; decode(codes) -> uint8 images."""

    def __init__(self, config: ImageCodecConfig | None = None):
        super().__init__()
        self.config = config or ImageCodecConfig()
        self.encoder, self.decoder = _encoder(self.config), _decoder(self.config)
        self.fsq = FSQ(self.config.levels)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- tensors (training) --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [N, 3, S, S] in [-1, 1] -> (reconstruction, quantized latents [N, h, w, d])."""
        q = self.fsq.quantize(self.encoder(x).permute(0, 2, 3, 1))
        return self.decoder(q.permute(0, 3, 1, 2)), q

    def pixels_to_input(self, images) -> torch.Tensor:
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[None]
        s = self.config.size
        if a.ndim != 4 or a.shape[1:] != (s, s, 3):
            raise InvalidParameterError(f"images must be uint8 [N, {s}, {s}, 3] (read them with "
                                        f"genlab.data.images.read_image_folder(size={s})); got shape {a.shape}")
        if a.dtype != np.uint8:
            raise InvalidParameterError(f"images must be uint8 pixels 0-255, got {a.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(a)).to(self.device).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1

    # --- numpy in, numpy out (the codec interface) ---------------------------------------
    @torch.no_grad()
    def encode(self, images, batch_size: int = 256) -> np.ndarray:
        """uint8 [N, S, S, 3] (or one [S, S, 3] image) -> int64 codes [N, h, w] (or [h, w])."""
        single = np.asarray(images).ndim == 3
        x = self.pixels_to_input(images)
        was = self.training
        self.eval()
        codes = [self.fsq.to_codes(self.fsq.quantize(self.encoder(x[i:i + batch_size]).permute(0, 2, 3, 1)))
                 for i in range(0, len(x), batch_size)]
        self.train(was)
        out = torch.cat(codes).cpu().numpy()
        return out[0] if single else out

    @torch.no_grad()
    def decode(self, codes, batch_size: int = 256) -> np.ndarray:
        """int codes [N, h, w] or [N, h*w] (raster order), or one [h, w] grid -> uint8 images."""
        c = torch.as_tensor(np.asarray(codes), dtype=torch.long, device=self.device)
        h, w = self.grid
        single = c.dim() == 2 and tuple(c.shape) == (h, w)
        c = c.reshape(1, h, w) if single else c
        if c.dim() == 2 and c.shape[1] == h * w:
            c = c.reshape(-1, h, w)
        if c.dim() != 3 or tuple(c.shape[1:]) != (h, w):
            raise InvalidParameterError(f"codes must be [N, {h}, {w}] or [N, {h * w}]; got shape {tuple(c.shape)}")
        if c.numel() and (c.min() < 0 or c.max() >= self.codebook_size):
            raise InvalidParameterError(f"codes must be in [0, {self.codebook_size})")
        was = self.training
        self.eval()
        out = [to_pixels(self.decoder(self.fsq.from_codes(c[i:i + batch_size]).permute(0, 3, 1, 2)))
               for i in range(0, len(c), batch_size)]
        self.train(was)
        images = np.concatenate(out) if out else np.zeros((0, self.config.size, self.config.size, 3), np.uint8)
        return images[0] if single else images

    def reconstruct(self, images) -> np.ndarray:
        return self.decode(self.encode(images))

    # --- folders -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The codec spec genlab.json records for a model folder."""
        cfg = asdict(self.config)
        cfg["levels"] = list(cfg["levels"])
        return {"type": "image", **cfg, "codebook_size": self.codebook_size, "grid": list(self.grid)}

    def save_pretrained(self, folder) -> None:
        """Write image_codec.json + image_codec.safetensors into `folder` (each via a temporary
        name and a rename, so a model folder never holds half a codec)."""
        from safetensors.torch import save_file

        from genlab.fsutil import atomic_file, write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_file(folder / WEIGHTS_FILE) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_json(folder / CONFIG_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, spec: dict) -> "ImageTokenizer":
        keep = {k: v for k, v in spec.items() if k in ImageCodecConfig.__dataclass_fields__}
        return cls(ImageCodecConfig(**keep))

    @classmethod
    def from_folder(cls, folder, device: str = "cpu") -> "ImageTokenizer":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        spec = _read_config(folder / CONFIG_FILE)
        if spec.get("type") != "image":
            raise ModelLoadError(f"{folder / CONFIG_FILE}: not an image codec (type {spec.get('type')!r})")
        try:
            tok = cls.from_dict(spec)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: invalid image codec config ({e})") from None
        weights = folder / WEIGHTS_FILE
        try:
            state = load_file(weights)
        except FileNotFoundError:
            raise ModelLoadError(f"{weights}: missing") from None
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{weights}: corrupt safetensors file ({e})") from None
        try:
            tok.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ModelLoadError(f"{weights}: weights do not match {CONFIG_FILE} ({first})") from None
        return tok.to(device).eval()


def _read_config(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing (not an image tokenizer folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return spec


def codebook_stats(codes, codebook_size: int) -> dict:
    """Fraction of the codebook used and the perplexity (exp entropy) of the code histogram."""
    counts = np.bincount(np.asarray(codes).ravel(), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse <= 0 else float(10 * np.log10(peak ** 2 / mse))

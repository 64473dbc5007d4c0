"""A series model at work: sample many future paths with the KV cache, summarise them as a
probabilistic forecast (mean, median, quantiles), or generate synthetic continuations.

Every path is one row of a batch: the context is encoded once (minus its mean for centred
models, then scaled by its mean absolute value), prefilled for all rows, then each step samples
one value token per row (top-k 50 at temperature 1 by default, as Chronos samples). Paths
longer than the model's window slide it: the newest tokens are prefilled again and decoding
goes on.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from genlab.codecs.series import SPECIAL, SeriesCodec
from genlab.errors import DataError, InvalidParameterError
from genlab.generate.sampling import draw
from genlab.model import adapters, io
from genlab.model.transformer import KVCache
from genlab.series.backtest import QUANTILES, Forecast


class SeriesModel:
    """A forecaster over a series model folder (optionally with a LoRA adapter)."""

    def __init__(self, module: torch.nn.Module, codec: SeriesCodec, context_length: int, name: str = "genlab",
                 num_samples: int = 100, temperature: float = 1.0, top_k: int = 50, seed: int = 0,
                 device: str = "cpu", center: bool = False):
        if num_samples < 1 or temperature <= 0 or top_k < 0:
            raise InvalidParameterError("num_samples must be >= 1, temperature > 0 and top_k >= 0")
        self.module, self.codec, self.name = module.eval(), codec, name
        self.config = adapters.base_module(module).config
        self.context_length = min(context_length, self.config.max_seq_len - 1)
        self.num_samples, self.temperature, self.top_k, self.seed = num_samples, temperature, top_k, seed
        self.center = center  # subtract the context's mean before scaling (as the model was trained)
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path, adapter: str | Path | None = None, device: str = "cpu", **kw) -> "SeriesModel":
        """A series model folder; or an adapter folder (its base is found from its config), or
        a model folder plus `adapter`."""
        path = Path(path)
        if adapter is None and (path / "adapter_config.json").exists():
            base = io.read_json(path / "adapter_config.json").get("base_model_name_or_path")
            if not base:
                raise InvalidParameterError(f"{path}: adapter folder names no base model; pass the model and --adapter")
            path, adapter = Path(base), path
        loaded = io.load(path, dtype=torch.float32, device=device)
        if not isinstance(loaded.tokenizer, SeriesCodec):
            raise InvalidParameterError(f"{path}: not a series model (genlab.json names no series codec); "
                                        "train one with `genlab series pretrain`")
        module = loaded.module
        if adapter is not None:
            module = adapters.load_adapter(module, adapter, "series")
            module.set_adapter("series")
        trained = loaded.meta.get("series", {})
        kw.setdefault("name", "genlab" + ("-finetuned" if adapter is not None else ""))
        return cls(module, loaded.tokenizer, trained.get("context_length", loaded.module.config.max_seq_len // 2),
                   device=device, center=trained.get("center", False), **kw)

    # --- sampling --------------------------------------------------------------------------
    def _forward(self, ids, start: int, cache: KVCache):
        t = ids.shape[1]
        positions = torch.arange(start, start + t, device=self.device)
        return self.module(ids, positions.expand(ids.shape[0], t), cache, positions, start + t, None, last_only=True)

    def _next(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        logits = logits[:, -1].float()
        logits[:, :SPECIAL] = -math.inf  # forecasts are values: never padding, end or missing
        logits = logits / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1] - SPECIAL), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return draw(logits.softmax(-1), generator)

    @torch.inference_mode()
    def sample_tokens(self, prefix: np.ndarray, steps: int, rows: int, seed: int) -> np.ndarray:
        """[rows, steps] token ids continuing `prefix`, each row its own path."""
        window = self.config.max_seq_len
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = torch.as_tensor(np.asarray(prefix, dtype=np.int64), device=self.device)[None].expand(rows, -1)
        out = []
        while steps > 0:
            # the newest `keep` tokens as context, then as many steps as the window has room for
            keep = min(tokens.shape[1], self.context_length)
            n = min(steps, window - keep)
            ctx = tokens[:, tokens.shape[1] - keep:]
            cache = KVCache(self.config, rows, keep + n, self.device, next(self.module.parameters()).dtype)
            logits = self._forward(ctx, 0, cache)
            new = []
            for i in range(n):
                token = self._next(logits, generator)
                new.append(token)
                if i < n - 1:
                    logits = self._forward(token, keep + i, cache)
            new = torch.cat(new, dim=1)
            tokens = torch.cat([tokens, new], dim=1)
            out.append(new)
            steps -= n
        return torch.cat(out, dim=1).cpu().numpy()

    def context_tokens(self, context) -> tuple[np.ndarray, float, float]:
        """(token ids, loc, scale) of the newest `context_length` values."""
        x = np.asarray(context, dtype=np.float64)[-self.context_length:]
        if x.size == 0 or not np.isfinite(x).any():
            raise DataError("the forecast context has no observed values")
        loc = float(np.nanmean(x)) if self.center else 0.0
        ids, scale = self.codec.encode(x - loc)
        return ids, loc, scale

    def sample(self, context, horizon: int, num_samples: int | None = None, seed: int | None = None) -> np.ndarray:
        """[num_samples, horizon] sampled future values after `context` (NaN = missing)."""
        if horizon < 1:
            raise InvalidParameterError("horizon must be >= 1")
        ids, loc, scale = self.context_tokens(context)
        paths = self.sample_tokens(ids, horizon, num_samples or self.num_samples, self.seed if seed is None else seed)
        return self.codec.decode(paths.ravel(), scale).reshape(paths.shape) + loc

    def __call__(self, contexts: list[np.ndarray], horizon: int) -> list[Forecast]:
        """The backtest's forecaster interface: one probabilistic forecast per context."""
        return [summarise(self.sample(c, horizon, seed=self.seed + i)) for i, c in enumerate(contexts)]


def summarise(paths: np.ndarray) -> Forecast:
    """Mean and quantiles (QUANTILES) over sampled paths [S, H]."""
    return Forecast(mean=paths.mean(axis=0), quantiles=np.quantile(paths, QUANTILES, axis=0))

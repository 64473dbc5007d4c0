"""Time series as tokens (the Chronos recipe): scale a series by the mean of its absolute
values, quantise each scaled value into one of `bins` uniform bins over [low, high], and let the
language model predict the next bin. Decoding maps a token back to its bin centre times the
scale, so a value inside the range comes back within half a bin (times the scale).

Token ids: 0 = padding, 1 = end of series, 2 = missing value, then the bins in increasing order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from genlab.errors import DataError, InvalidParameterError

PAD, EOS, MISSING = 0, 1, 2
SPECIAL = 3
CODEC_FILE = "series_codec.json"


@dataclass(frozen=True)
class SeriesCodec:
    bins: int = 4096
    low: float = -15.0  # scaled values below `low` / above `high` are clipped to the outer bins
    high: float = 15.0

    def __post_init__(self):
        if self.bins < 2 or not self.low < self.high:
            raise InvalidParameterError("a series codec needs bins >= 2 and low < high")

    @property
    def vocab_size(self) -> int:
        return SPECIAL + self.bins

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.bins

    @property
    def centers(self) -> np.ndarray:
        return self.low + self.width * (np.arange(self.bins) + 0.5)

    # the ids a model folder's config.json records (Hugging Face's tokenizer attributes)
    bos_token_id = None
    eos_token_id = EOS
    pad_token_id = PAD

    def __len__(self) -> int:
        return self.vocab_size

    def to_dict(self) -> dict:
        return {"type": "series", **asdict(self)}

    @classmethod
    def from_dict(cls, spec: dict) -> "SeriesCodec":
        return cls(**{k: v for k, v in spec.items() if k not in ("type", "kind")})

    def save_pretrained(self, folder) -> None:
        """Model folders keep their codec beside the weights (the text tokenizer's counterpart);
        genlab.json names it too, which is what `genlab.model.io.load` reads."""
        from genlab.fsutil import write_json

        write_json(Path(folder) / CODEC_FILE, self.to_dict())

    @staticmethod
    def scale_of(values) -> float:
        """Mean absolute value of the observed (finite) values; 1 for an all-zero series."""
        x = _numbers(values)
        observed = x[np.isfinite(x)]
        if observed.size == 0:
            raise DataError("the series has no observed values (all missing)")
        scale = float(np.abs(observed).mean())
        return scale if scale > 0 else 1.0

    def encode(self, values, scale: float | None = None) -> tuple[np.ndarray, float]:
        """(token ids, scale). NaN / missing values become the MISSING token. Give `scale` to
        encode a continuation with its context's scale."""
        x = _numbers(values)
        scale = self.scale_of(x) if scale is None else float(scale)
        if not np.isfinite(scale) or scale <= 0:
            raise InvalidParameterError(f"scale must be a positive number, got {scale}")
        finite = np.isfinite(x)
        scaled = np.where(finite, x, 0.0) / scale
        bins = np.clip(np.floor((scaled - self.low) / self.width), 0, self.bins - 1).astype(np.int64)
        return np.where(finite, SPECIAL + bins, MISSING), scale

    def decode(self, ids, scale: float) -> np.ndarray:
        """Values for token ids: bin centres times `scale`; NaN for missing and padding; the
        series ends at the first end-of-series token."""
        ids = np.asarray(ids, dtype=np.int64)
        ends = np.flatnonzero(ids == EOS)
        if ends.size:
            ids = ids[: ends[0]]
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InvalidParameterError(f"token ids must be in [0, {self.vocab_size})")
        out = np.full(ids.shape, np.nan)
        value = ids >= SPECIAL
        out[value] = self.centers[ids[value] - SPECIAL] * scale
        return out


def _numbers(values) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError("a series must hold numbers (or NaN for missing values)") from None
    if x.ndim != 1:
        raise DataError(f"a series is one-dimensional; got shape {x.shape}")
    return x

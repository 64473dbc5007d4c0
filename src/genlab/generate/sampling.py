"""Sampling parameters and the batched logits -> next-token step.

Every parameter is per row (a [B] tensor), so one batch can mix requests with different
settings; each row also draws from its own seeded generator, so a seeded request gives the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from genlab.errors import InvalidParameterError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos ids
    seed: int | None = None  # sample j of a prompt uses seed + j
    n: int = 1  # samples per prompt
    logprobs: bool = False  # log-probability of each chosen token (raw model distribution)
    top_logprobs: int = 0  # also the k most likely alternatives per position

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20, "top_logprobs must be an integer in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidParameterError(f"invalid sampling parameter: {message}")


class RowSampler:
    """Per-row sampling state for a batch: parameters as tensors, generators, seen-token masks."""

    def __init__(self, rows: list[SamplingParams], seeds: list[int] | None, vocab_size: int, device,
                 generators: list[torch.Generator] | None = None, seen: torch.Tensor | None = None):
        """Either `seeds` (new generators) or the rows' own `generators` (a batch whose rows come
        and go keeps each row's generator); `seen` [B, V] may be given to keep it across batches."""
        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(p, name) for p in rows], dtype=dtype, device=device)[:, None]

        self.temperature = col("temperature")
        self.top_k = col("top_k", torch.long)
        self.top_p, self.min_p, self.penalty = col("top_p"), col("min_p"), col("repetition_penalty")
        self.greedy = bool((self.temperature == 0).all())
        self.any_penalty = bool((self.penalty != 1).any())
        self.any_truncation = bool((self.top_k > 0).any() or (self.top_p < 1).any())
        self.any_min_p = bool((self.min_p > 0).any())
        self.generators = generators or [torch.Generator(device=device).manual_seed(s) for s in seeds]
        if seen is None and self.any_penalty:
            seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
        self.seen = seen if self.any_penalty else None
        self.vocab_size = vocab_size

    def observe(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Mark tokens [B, T] as seen (for the repetition penalty); `valid` masks left padding."""
        if self.seen is not None:
            if valid is not None:  # point pad slots at the last token, which is always real
                tokens = torch.where(valid, tokens, tokens[:, -1:])
            self.seen.scatter_(1, tokens, True)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from raw logits [B, V] (float32)."""
        if self.any_penalty:
            # HF/CTRL definition: shrink seen tokens' logits towards "less likely" by the factor.
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.greedy:
            return logits.argmax(-1)
        greedy_tokens = logits.argmax(-1)
        logits = logits / self.temperature.clamp_min(1e-6)
        if self.any_truncation:
            logits = self._top_k_top_p(logits)
        probs = logits.softmax(-1)
        if self.any_min_p:
            floor = self.min_p * probs.amax(-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        # Exponential-race sampling: argmax(p / E), E ~ Exp(1), equals a multinomial draw.
        noise = torch.stack([torch.empty(self.vocab_size, device=logits.device).exponential_(generator=g) for g in self.generators])
        sampled = (probs / noise).argmax(-1)
        return torch.where(self.temperature[:, 0] == 0, greedy_tokens, sampled)

    def _top_k_top_p(self, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        k = torch.where(self.top_k > 0, self.top_k, logits.shape[-1])
        drop = rank >= k
        probs = sorted_logits.masked_fill(drop, -math.inf).softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first is always kept).
        drop |= (probs.cumsum(-1) - probs) >= self.top_p
        return logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [B, V] (rows need not sum to 1) from one generator, by the
    inverse CDF: a cumulative sum and a binary search. On CPU this is several times faster than
    torch.multinomial at large batches; zero-probability tokens are never drawn."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max_(probs.shape[-1] - 1)

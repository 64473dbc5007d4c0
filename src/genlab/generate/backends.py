"""Forward passes for the generation engine: genlab's transformer with a static KV cache, or
any transformers causal LM (fallback) with its own cache. Both take left-padded prompts and
return next-token logits [B, V] in float32."""

from __future__ import annotations

import torch

from genlab.model.adapters import base_module
from genlab.model.transformer import KVCache, Transformer


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] left-padded to the longest prompt, and the validity mask [B, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, width - len(p):] = True
    return ids.to(device), valid.to(device)


def additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive float mask (0 keep, -inf drop), built once per step."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class NativeBackend:
    """genlab Transformer + preallocated KV cache written by index (gpt-fast style).

    With `compile=True` the one-token decode step runs under torch.compile over the whole
    fixed-size cache (static shapes; CUDA graphs on GPU via mode="reduce-overhead").
    """

    def __init__(self, module, compile: bool = False, pack: bool = True):
        base = base_module(module)
        pack = pack and base is module  # with adapters (PEFT-wrapped projections) the plain path runs
        if pack:
            module.pack_for_inference(prepack=not compile)  # compile can't trace oneDNN's packed weights
        self.module = module
        self.max_seq_len = base.config.max_seq_len
        self.device = base.lm_head.weight.device
        self.dtype = base.lm_head.weight.dtype
        self.compiled = None
        if compile and pack:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self.compiled = torch.compile(module, mode=mode, dynamic=False, fullgraph=True)

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, max_len: int) -> torch.Tensor:
        b, t = ids.shape
        if self.compiled is not None:
            max_len = self.max_seq_len  # one cache size -> one compiled graph
        self.cache = KVCache(self.module.config, b, max_len, self.device, self.dtype)
        self.key_valid = torch.zeros(b, max_len, dtype=torch.bool, device=self.device)
        self.key_valid[:, :t] = valid
        self.padded = not bool(valid.all())
        self.length = t
        self.next_pos = valid.sum(1, keepdim=True)  # RoPE position of each row's next token
        positions = (valid.cumsum(1) - 1).clamp_min(0)
        mask = None
        if self.padded:
            causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
            # Pad queries attend to themselves only, so no softmax row is empty (NaN).
            mask = (causal & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=self.device)
            mask = additive(mask[:, None], self.dtype)
        cache_pos = torch.arange(t, device=self.device)
        logits = self.module(ids, positions, self.cache, cache_pos, t, mask, last_only=True)
        return logits[:, -1].float()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.length
        if self.padded or self.compiled is not None:  # the mask is only built in these cases
            self.key_valid[:, pos] = True
        cache_pos = torch.tensor([pos], device=self.device)
        if self.compiled is not None:
            mask = additive(self.key_valid[:, None, None, :], self.dtype)
            logits = self.compiled(tokens[:, None], self.next_pos, self.cache, cache_pos, self.cache.max_len, mask)
        else:
            mask = additive(self.key_valid[:, None, None, : pos + 1], self.dtype) if self.padded else None
            logits = self.module(tokens[:, None], self.next_pos, self.cache, cache_pos, pos + 1, mask)
        self.length += 1
        self.next_pos = self.next_pos + 1
        return logits[:, -1].float()


class TransformersBackend:
    """Any transformers causal LM, driven step by step with its own (dynamic) cache."""

    def __init__(self, module):
        self.module = module
        cfg = module.config
        self.max_seq_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        self.device = next(module.parameters()).device

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, max_len: int) -> torch.Tensor:
        self.attention_mask = valid.long()
        positions = (valid.cumsum(1) - 1).clamp_min(0)
        out = self.module(input_ids=ids, attention_mask=self.attention_mask, position_ids=positions, use_cache=True)
        self.past = out.past_key_values
        self.next_pos = valid.sum(1, keepdim=True)
        return out.logits[:, -1].float()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(tokens), 1)], 1)
        out = self.module(input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=self.next_pos,
                          past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1].float()


def backend_for(module, compile: bool = False, pack: bool = True):
    """`pack=False` leaves a genlab transformer's projections separate (a model being trained)."""
    if isinstance(base_module(module), Transformer):
        return NativeBackend(module, compile=compile, pack=pack)
    return TransformersBackend(module)

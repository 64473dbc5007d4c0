"""A Llama-family decoder-only transformer in one file.

Token embeddings -> N x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head.

Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`
...), so a state dict moves between genlab and transformers without renaming. The same module
covers Mistral (no sliding window in use) and Qwen2 (`attention_bias=True`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from genlab.model.losses import linear_cross_entropy


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 688
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None)  # {"rope_type": "linear"|"llama3", ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    def to_dict(self) -> dict:
        return asdict(self)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for RoPE, with the 'linear' and 'llama3' scalings of HF configs."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu") / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF's (non-interleaved) RoPE convention: the head is split in two halves, not in pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values for all layers, updated in place by index (gpt-fast style)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of batch rows [start, stop): writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:stop], self.v[:, start:stop], self.max_len
        return view


# oneDNN's per-call cost outweighs its faster product on small matrices (measured here: a
# 1.3M-parameter model decodes faster with plain products, 10M+ with every projection packed).
PREPACK_MIN_ELEMENTS = 50_000


class FusedLinear:
    """Projections of one input as a single matrix product, for inference.

    On CPU a large fused weight is pre-packed for oneDNN, whose small-batch matrix products run
    1.3-2.3x faster than MKL's here; that is a packed copy beside the parameters. Otherwise it is
    one plain matrix and the parameters become views into it (no extra memory).
    """

    def __init__(self, *linears: nn.Linear, prepack: bool = True):
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        self.bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        self.packed = None
        cpu = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
        if prepack and cpu and weight.numel() >= PREPACK_MIN_ELEMENTS and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            except (RuntimeError, AttributeError):  # a torch build without this oneDNN op
                self.packed = None
        if self.packed is None:
            self.weight, start = weight, 0
            for lin in linears:
                n = lin.weight.shape[0]
                lin.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
                start += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv = self.out = None  # FusedLinear after pack_for_inference()

    def forward(self, x, cos, sin, cache: KVCache | None, cache_pos, kv_len, mask):
        b, t, _ = x.shape
        if self.qkv is not None:
            # One matmul for q, k and v; RoPE on q and k together (they are adjacent columns).
            qkv = self.qkv(x).view(b, t, self.n_heads + 2 * self.n_kv, self.hd)
            qk, v = qkv[:, :, : self.n_heads + self.n_kv].transpose(1, 2), qkv[:, :, self.n_heads + self.n_kv :].transpose(1, 2)
            qk = qk * cos + rotate_half(qk) * sin
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        else:
            q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
            k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            # Write this step's keys/values into their slots, then attend over the filled prefix.
            ck, cv = cache.k[self.layer], cache.v[self.layer]
            if cache_pos.dim() == 2:  # [B, 1]: each row writes its own slot (rows of different lengths)
                rows = torch.arange(b, device=ck.device)
                ck[rows, :, cache_pos[:, 0]] = k[:, :, 0]
                cv[rows, :, cache_pos[:, 0]] = v[:, :, 0]
            else:
                ck.index_copy_(2, cache_pos, k)
                cv.index_copy_(2, cache_pos, v)
            k, v = ck[:, :, :kv_len], cv[:, :, :kv_len]
        if t == 1:
            y = self.attend_one(q, k, v, mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return (self.out or self.o_proj)(y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))

    def attend_one(self, q, k, v, mask):
        """Attention for a single query position (decoding): two small matmuls, which on CPU
        beat the fused SDPA kernel ~4x at this shape. Query heads sharing a kv head (GQA) are
        stacked as rows, so keys/values are never repeated."""
        b = q.shape[0]
        q = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.hd)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.hd**-0.5
        if mask is not None:
            scores = scores + mask  # additive float mask [B, 1, 1, S]
        y = torch.matmul(scores.softmax(-1), v)
        return y.reshape(b, self.n_heads, 1, self.hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up = self.down = None  # FusedLinear after pack_for_inference()

    def forward(self, x):
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In fp32 like HF Llama, so bf16 runs match reference numerics. Written out, in place
        # where possible: on CPU this is faster than F.rms_norm's composite kernel.
        h = x if x.dtype == torch.float32 else x.float()
        h = h * h.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * (h if h.dtype == x.dtype else h.to(x.dtype))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, cache_pos, kv_len, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_pos, kv_len, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` prefix of HF names: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head = None  # FusedLinear after pack_for_inference()
        # A plain fp32 attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_inv_freq(cfg)

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "Transformer":
        """GPT-2 style init: N(0, std), residual projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                scale = std / math.sqrt(2 * self.config.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return self

    @torch.no_grad()
    def pack_for_inference(self, prepack: bool = True) -> "Transformer":
        """Fuse and pre-pack the projections for fast decoding (parameters keep their values,
        names and shapes). A block then runs 4 matrix products instead of 7. Inference only:
        the fused path bypasses the parameters, so gradients would not reach them.
        `prepack=False` keeps plain matrices (what torch.compile can trace)."""
        if self.head is None:
            for block in self.model.layers:
                a, m = block.self_attn, block.mlp
                a.qkv = FusedLinear(a.q_proj, a.k_proj, a.v_proj, prepack=prepack)
                a.out = FusedLinear(a.o_proj, prepack=prepack)
                m.gate_up = FusedLinear(m.gate_proj, m.up_proj, prepack=prepack)
                m.down = FusedLinear(m.down_proj, prepack=prepack)
            self.head = FusedLinear(self.lm_head, prepack=prepack)
            if self.config.tie_embeddings:
                self.model.embed_tokens.weight = self.lm_head.weight
        return self

    def unpack(self) -> "Transformer":
        """Back to the separate projections (the training path), e.g. before adding adapters."""
        for block in self.model.layers:
            block.self_attn.qkv = block.self_attn.out = block.mlp.gate_up = block.mlp.down = None
        self.head = None
        return self

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n if embeddings else n - self.model.embed_tokens.weight.numel()

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        kv_len: int | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T].

        Without a cache this is plain causal attention (training, scoring). With a cache, the
        new keys/values go to slots `cache_pos` ([T], or [B, 1] per row when decoding rows of
        different lengths) and attention covers the first `kv_len` slots
        under the additive float `mask` [B, 1, T, kv_len] (0 = attend, -inf = not); `positions` [B, T] are the
        RoPE positions, which differ per row when prompts are left-padded.

        With `targets` [B, T] (-100 = ignore) it returns the mean next-token cross-entropy
        instead, through the fused chunked head + loss (no [B, T, V] logits tensor).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, cache_pos, kv_len, mask)
        if targets is not None:
            return linear_cross_entropy(self.model.norm(x), self.lm_head.weight, targets)
        if last_only:
            x = x[:, -1:]  # the LM head over a large vocab is costly: skip positions nobody reads
        return (self.head or self.lm_head)(self.model.norm(x))

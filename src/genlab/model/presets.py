"""Named model sizes, from a ~1M-parameter toy to a ~1B foundation model.

Sizes are quoted for the preset's reference vocabulary (8,192 tokens up to 110m, 32,000 above);
the real count depends on the tokenizer the model is built with (`genlab model presets`).
"""

from __future__ import annotations

from dataclasses import replace

from genlab.errors import InvalidParameterError
from genlab.model.transformer import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "1m": ModelConfig(hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256, max_seq_len=256, tie_embeddings=True),
    "2m": ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=352, max_seq_len=256, tie_embeddings=True),
    "10m": ModelConfig(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=688, max_seq_len=512),
    "30m": ModelConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376, max_seq_len=1024),
    "110m": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048, max_seq_len=1024, vocab_size=32000, tie_embeddings=True),
    "350m": ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=2816, max_seq_len=2048, vocab_size=32000),
    "1b": ModelConfig(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, max_seq_len=2048, vocab_size=32000),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of preset `name`, with fields (e.g. vocab_size) overridden."""
    if name not in PRESETS:
        raise InvalidParameterError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count of a config without building it (tied embeddings counted once)."""
    attn_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    attn = cfg.hidden_size * (attn_out + 2 * kv_out) + attn_out * cfg.hidden_size
    if cfg.attention_bias:
        attn += attn_out + 2 * kv_out
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    per_layer = attn + mlp + 2 * cfg.hidden_size
    emb = cfg.vocab_size * cfg.hidden_size
    return cfg.num_layers * per_layer + cfg.hidden_size + emb * (1 if cfg.tie_embeddings else 2)

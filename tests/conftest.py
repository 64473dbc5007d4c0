"""Shared fixtures: a tiny tokenizer and tiny random models, all built by the tests."""

from __future__ import annotations

import random

import pytest
import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Le café coûte 3 € — très cher ! 東京は晴れ。 🙂🚀",
    "Climate records: 1958 CO2 315.7 ppm; 2024 CO2 422.8 ppm.",
    "Patients were randomised to treatment or placebo; the primary endpoint was mortality.",
] * 4


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from genlab.codecs.text import train_tokenizer

    rng = random.Random(0)
    words = [w for t in TEXTS for w in t.split()]
    texts = TEXTS + [" ".join(rng.choice(words) for _ in range(40)) for _ in range(50)]
    return train_tokenizer(texts=texts, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok") / "tok")


def tiny_hf(kind: str = "llama", **overrides):
    """A tiny random transformers model of the given family (fp32, eval mode)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    }
    config_cls, model_cls = classes[kind]
    if kind == "gpt2":
        args = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=400)
    else:
        args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=400, max_position_embeddings=128)
    args.update(bos_token_id=0, eos_token_id=1, pad_token_id=2, **overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**args)).eval()
    with torch.no_grad():  # larger weights than the default init, so logits differ clearly per token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def hf_folder(tmp_path, tokenizer):
    """Factory: save a tiny transformers model + the test tokenizer as a local HF folder."""

    def make(kind: str = "llama", **overrides):
        model = tiny_hf(kind, **overrides)
        folder = tmp_path / kind
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread: on 2 shared cores two intra-op threads contend
    (with each other and other processes) and run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

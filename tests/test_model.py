"""The transformer and model folders: parity with transformers in both directions."""

from __future__ import annotations

import json

import pytest
import torch

import genlab
from genlab.errors import ModelLoadError, UnsupportedArchitectureError
from genlab.model.presets import PRESETS, count_params, preset
from genlab.model.transformer import ModelConfig, Transformer

IDS = torch.tensor([[0, 5, 17, 300, 42, 42, 7, 99, 250, 3, 11, 12], [0, 9, 8, 7, 6, 5, 4, 3, 200, 201, 202, 203]])


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def genlab_logits(model: genlab.LanguageModel, ids=IDS):
    with torch.no_grad():
        return model.module(ids)


@pytest.mark.parametrize("tied", [False, True])
def test_genlab_folder_loads_in_transformers_with_same_logits(tmp_path, tokenizer, tied):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160,
                      max_seq_len=64, tie_embeddings=tied)
    model = genlab.build(cfg, tokenizer, seed=1)
    ours = genlab_logits(model)
    model.save(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "genlab.json"} <= files
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(hf_logits(hf), ours, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "m" / "genlab.json").read_text())["model_config"]["tie_embeddings"] is tied


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    ("llama", {"rope_theta": 500000.0, "max_position_embeddings": 256,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("mistral", {"sliding_window": 64}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
])
def test_hf_folders_load_natively_with_same_logits(hf_folder, kind, overrides):
    folder, hf = hf_folder(kind, **overrides)
    model = genlab.load(folder)
    assert model.native, f"{kind} should run on genlab's own transformer"
    torch.testing.assert_close(genlab_logits(model), hf_logits(hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_loaded_models_save_back_to_their_own_architecture(hf_folder, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    folder, hf = hf_folder(kind)
    genlab.load(folder).save(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").eval()
    assert type(again) is type(hf)
    torch.testing.assert_close(hf_logits(again), hf_logits(hf), atol=1e-5, rtol=0)


def test_other_architectures_fall_back_to_transformers(hf_folder):
    folder, hf = hf_folder("gpt2")
    model = genlab.load(folder)
    assert not model.native
    torch.testing.assert_close(model.module(IDS).logits, hf_logits(hf), atol=1e-6, rtol=0)
    out = model.generate("The quick", max_new_tokens=5, temperature=0)
    ids = model.encode("The quick")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert out.token_ids == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("prepack_min", [0, 10**9], ids=["onednn-packed", "plain-fused"])
def test_packing_for_inference_keeps_logits_and_names(tokenizer, monkeypatch, prepack_min):
    import genlab.model.transformer as transformer

    monkeypatch.setattr(transformer, "PREPACK_MIN_ELEMENTS", prepack_min)
    model = genlab.build("1m", tokenizer, seed=3)  # building an engine packs the weights
    packed = model.module.model.layers[0].self_attn.qkv.packed
    assert (packed is not None) == (prepack_min == 0 and torch.backends.mkldnn.is_available())
    fresh = Transformer(model.config)
    fresh.load_state_dict({k: v.contiguous() for k, v in model.module.state_dict().items()})
    assert model.module.model.layers[0].self_attn.qkv is not None
    assert set(fresh.state_dict()) == set(model.module.state_dict())
    torch.testing.assert_close(model.module(IDS), fresh(IDS), atol=1e-5, rtol=0)


def test_presets_span_1m_to_1b_and_counts_match_built_models():
    counts = {name: count_params(cfg) for name, cfg in PRESETS.items()}
    assert min(counts.values()) < 1.5e6 and 0.9e9 < max(counts.values()) < 1.3e9
    for name in ("1m", "2m", "10m"):
        assert Transformer(preset(name)).num_params() == counts[name]
    assert abs(counts["10m"] - 10e6) < 1e6 and abs(counts["110m"] - 110e6) < 10e6


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(genlab.InvalidParameterError, match="unknown model preset 'huge'"):
        preset("huge")


# --- bad model folders -------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        genlab.load(tmp_path / "nope")


def test_invalid_config_json(hf_folder):
    folder, _ = hf_folder()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        genlab.load(folder)


def test_truncated_safetensors(hf_folder):
    folder, _ = hf_folder()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt safetensors"):
        genlab.load(folder)


def test_pickled_weights_are_refused(hf_folder):
    folder, hf = hf_folder()
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        genlab.load(folder)


def test_config_weights_mismatch(hf_folder):
    folder, _ = hf_folder()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mlp.gate_proj.weight has shape"):
        genlab.load(folder)


def test_unsupported_architecture(hf_folder):
    folder, _ = hf_folder()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="neither genlab nor transformers"):
        genlab.load(folder)


def test_missing_tokenizer(hf_folder):
    folder, _ = hf_folder()
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelLoadError):
        genlab.load(folder)

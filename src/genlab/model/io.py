"""Model folders: Hugging Face layout in, Hugging Face layout out.

A genlab model folder is a plain HF folder (config.json, model.safetensors, tokenizer files,
generation_config.json) plus genlab.json. Any local Llama-, Mistral- or Qwen2-style folder loads
into genlab's own `Transformer`; other causal LMs load through transformers' class behind the
same interface. Weights are read from safetensors only (never pickle).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from genlab import __version__
from genlab.errors import ModelLoadError, UnsupportedArchitectureError
from genlab.fsutil import atomic_dir, write_json
from genlab.model.transformer import ModelConfig, Transformer

NATIVE_TYPES = {"llama", "mistral", "qwen2"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    module: torch.nn.Module  # genlab Transformer, or a transformers PreTrainedModel (fallback)
    tokenizer: object
    path: Path
    native: bool
    meta: dict = field(default_factory=dict)  # genlab.json ({} for foreign folders)
    generation: dict = field(default_factory=dict)  # generation_config.json
    hf_config: dict = field(default_factory=dict)  # config.json as found (written back on save)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def config_from_hf(hf: dict) -> ModelConfig:
    """Translate an HF config dict; raise UnsupportedArchitectureError if genlab's module can't run it."""
    kind = hf.get("model_type")
    why = None
    if kind not in NATIVE_TYPES:
        why = f"model_type {kind!r} is not one of {sorted(NATIVE_TYPES)}"
    elif hf.get("hidden_act", "silu") != "silu":
        why = f"hidden_act {hf.get('hidden_act')!r}"
    elif hf.get("mlp_bias") or (kind == "llama" and hf.get("attention_bias")):
        why = "biases on MLP / output projections"
    elif kind == "qwen2" and hf.get("use_sliding_window"):
        why = "sliding-window attention"
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear", "llama3"):
        why = f"rope scaling {scaling!r}"
    if why:
        raise UnsupportedArchitectureError(f"genlab's transformer cannot run this model: {why}")
    max_len = hf.get("max_position_embeddings", 2048)
    if kind == "mistral" and hf.get("sliding_window"):
        max_len = min(max_len, hf["sliding_window"])  # within the window, sliding = full attention
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_seq_len=max_len,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_scaling=dict(scaling) if scaling else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=kind == "qwen2",
    )


def config_to_hf(cfg: ModelConfig, tokenizer=None) -> dict:
    """An HF `LlamaConfig` dict, in the format of the installed transformers version."""
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if cfg.attention_bias:
        raise UnsupportedArchitectureError("a Llama config cannot express q/k/v-only biases")
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_embeddings,
        **ids,
    ).to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    hf["torch_dtype"] = hf["dtype"] = "float32"
    return hf


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        files = [folder / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(f"{folder}: only pickled weights (.bin/.pt) found; genlab loads safetensors only "
                             "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    else:
        raise ModelLoadError(f"{folder}: no model.safetensors in the folder")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{f}: corrupt safetensors file ({e})") from None
    return state


def load_native(folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: str) -> Transformer:
    state = read_state_dict(folder)
    state.pop("model.rotary_emb.inv_freq", None)  # buffer some older checkpoints saved
    with torch.device("meta"):
        module = Transformer(cfg)
    expected = module.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{folder}: weights missing from safetensors: {', '.join(missing[:4])}"
                             + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    for name, t in expected.items():
        if state[name].shape != t.shape:
            raise ModelLoadError(f"{folder}: tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"config.json implies {tuple(t.shape)}")
    module = module.to_empty(device=device)
    module.load_state_dict({k: state[k] for k in expected}, strict=False)
    if cfg.tie_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    return module.to(dtype).eval()


def load_transformers(folder: Path, dtype: torch.dtype, device: str):
    """Fallback for architectures genlab doesn't implement: transformers' own class."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedArchitectureError(f"{folder}: neither genlab nor transformers can load this model ({e})") from None
    return model.to(device).eval()


def resolve(path_or_id: str | Path) -> Path:
    """A local folder, or (for users with internet) a hub id downloaded to the local HF cache."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: not a model folder (expected a directory with config.json)")
        return path
    if HUB_ID.match(str(path_or_id)):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # offline, unknown repo, gated ...: one line either way
            raise ModelLoadError(f"{path_or_id}: no such local folder, and the hub download failed ({type(e).__name__})") from None
    raise ModelLoadError(f"{path}: no such model folder")


def load(path_or_id: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    folder = resolve(path_or_id)
    hf = read_json(folder / "config.json")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        module, native = load_native(folder, config_from_hf(hf), dtype, device), True
    except UnsupportedArchitectureError:
        module, native = load_transformers(folder, dtype, device), False
    gen_file = folder / "generation_config.json"
    meta_file = folder / "genlab.json"
    meta = read_json(meta_file) if meta_file.exists() else {}
    return LoadedModel(
        module=module,
        tokenizer=load_codec(folder, meta),
        path=folder,
        native=native,
        meta=meta,
        generation=read_json(gen_file) if gen_file.exists() else {},
        hf_config=hf,
    )


def load_codec(folder: Path, meta: dict):
    """The folder's token codec: a text tokenizer, or the series / table / text-image codec genlab.json names."""
    spec = meta.get("codec") or {"type": "text"}
    if spec.get("type") == "series":
        from genlab.codecs.series import SeriesCodec

        try:
            return SeriesCodec.from_dict(spec)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{folder / 'genlab.json'}: invalid series codec {spec!r} ({e})") from None
    if spec.get("type") == "table":
        from genlab.synth.grammar import TableTokenizer

        return TableTokenizer.from_folder(folder)
    if spec.get("type") == "text-image":
        from genlab.image.codec import TextImageCodec

        return TextImageCodec.from_folder(folder, spec)
    from genlab.codecs.text import load_tokenizer

    return load_tokenizer(folder)


def save(path: str | Path, module: torch.nn.Module, tokenizer, meta: dict | None = None, generation: dict | None = None,
         hf_config: dict | None = None) -> Path:
    """Write an HF-loadable folder atomically (a failed save leaves any previous folder intact).

    `hf_config`: the config.json a loaded model came with, kept as is (a Qwen2 model stays
    Qwen2); new genlab models get a Llama config.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        if isinstance(module, Transformer):
            write_json(tmp / "config.json", hf_config or config_to_hf(module.config, tokenizer))
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            if module.config.tie_embeddings:
                state.pop("lm_head.weight")  # safetensors can't store shared tensors; HF re-ties
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            module.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "generation_config.json", generation or {})
        write_json(tmp / "genlab.json", {"genlab_version": __version__, "codec": {"type": "text"}, **(meta or {})})
    return path


# --------------------------------------------------------------------------- small networks

def save_network(folder: str | Path, name: str, module: torch.nn.Module, info: dict) -> Path:
    """A small network (checker, captioner) as `NAME.safetensors` + `NAME.json` (`info`: what
    rebuilds it) in `folder`, written as a whole (temporary name, then renamed)."""
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        (tmp / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def load_network(folder: str | Path, name: str, build, what: str):
    """(module, info) from `save_network`'s files: `build(info)` makes the module, the weights are
    loaded into it; anything missing or mismatched is one ModelLoadError naming the folder."""
    folder = Path(folder)
    try:
        info = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        module = build(info)
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise ModelLoadError(f"{folder}: not a {what} folder ({e})") from e
    return module.eval(), info

"""LoRA adapters through PEFT, as PEFT folders that `peft.PeftModel.from_pretrained` loads.

genlab's transformer uses Hugging Face Llama's module names, so an adapter trained on it has
exactly the keys PEFT expects on `LlamaForCausalLM` (and vice versa). Several adapters can
sit on one base at once; which one a forward pass uses is switched per call (`active`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from genlab.errors import InvalidParameterError, ModelLoadError
from genlab.fsutil import atomic_dir, write_json
from genlab.model.transformer import Transformer

# Every projection of a block (attention and MLP), as in the QLoRA paper; not the LM head.
NATIVE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = "base"  # the name that selects the base model without any adapter


def base_module(module: torch.nn.Module) -> torch.nn.Module:
    """The model under any PEFT wrapping (genlab Transformer or transformers model)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def has_adapters(module: torch.nn.Module) -> bool:
    """A PEFT wrapper (PEFT also marks the wrapped model itself with `peft_config`)."""
    return hasattr(module, "get_base_model") and hasattr(module, "peft_config")


def default_targets(module: torch.nn.Module) -> list[str] | str:
    # For transformers models PEFT finds every linear layer of the blocks itself (GPT-2's Conv1D too).
    return NATIVE_TARGETS if isinstance(base_module(module), Transformer) else "all-linear"


def add_lora(module: torch.nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             targets: list[str] | str | None = None, seed: int = 0):
    """Wrap `module` with a fresh trainable LoRA adapter ("default"); the base is frozen."""
    from peft import LoraConfig, get_peft_model

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise InvalidParameterError("LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1)")
    if isinstance(module, Transformer):
        module.unpack()  # PEFT wraps the separate projections; the fused inference path would bypass it
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or default_targets(module),
                        bias="none")
    torch.manual_seed(seed)  # LoRA's A matrices are random (B starts at zero: the adapter starts as a no-op)
    try:
        return get_peft_model(module, config)
    except ValueError as e:  # e.g. a target module name the model doesn't have
        raise InvalidParameterError(f"cannot add LoRA: {e}") from None


def save_adapter(peft_model, out: str | Path, base_path: str | Path | None, meta: dict | None = None,
                 name: str = "default") -> Path:
    """Write adapter `name` as a PEFT folder (adapter_config.json + adapter_model.safetensors)
    plus genlab.json, atomically."""
    out = Path(out)
    config = peft_model.peft_config[name]
    config.base_model_name_or_path = str(base_path) if base_path else None
    task_type, config.task_type = config.task_type, "CAUSAL_LM"  # what AutoPeftModelForCausalLM expects
    try:
        with atomic_dir(out) as tmp:
            peft_model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True,
                                       save_embedding_layers=False)  # genlab never resizes embeddings
            if name != "default":  # PEFT puts non-default adapters in a subfolder
                for f in (tmp / name).iterdir():
                    f.rename(tmp / f.name)
                (tmp / name).rmdir()
            write_json(tmp / "genlab.json", {"kind": "lora-adapter", **(meta or {})})
    finally:
        config.task_type = task_type
    return out


def load_adapter(module: torch.nn.Module, path: str | Path, name: str):
    """Add the PEFT adapter folder `path` under `name` to `module` (wrapping it on first use).
    Returns the PEFT-wrapped module."""
    from peft import PeftConfig, PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise ModelLoadError(f"{path}: not an adapter folder (no adapter_config.json)")
    if name == BASE:
        raise InvalidParameterError(f"'{BASE}' is reserved for the model without adapters; choose another name")
    if has_adapters(module) and name in module.peft_config:
        raise InvalidParameterError(f"an adapter named {name!r} is already loaded")
    try:
        config = PeftConfig.from_pretrained(path)
        if config.peft_type != "LORA":
            raise ModelLoadError(f"{path}: a {config.peft_type} adapter; genlab loads LoRA adapters")
        config.task_type = None  # the generic wrapper passes genlab's forward arguments through unchanged
        config.inference_mode = True
        if has_adapters(module):
            module.load_adapter(path, adapter_name=name, is_trainable=False)
            return module
        base = base_module(module)
        if isinstance(base, Transformer):
            base.unpack()
        return PeftModel.from_pretrained(base, path, adapter_name=name, config=config)
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # shapes or module names that don't match
        raise ModelLoadError(f"{path}: adapter does not fit this model ({type(e).__name__}: {str(e)[:300]})") from None


@contextmanager
def active(module: torch.nn.Module, name: str | None):
    """Run the body with adapter `name` active (BASE or None on a plain model: no adapter)."""
    if not has_adapters(module):
        if name not in (None, BASE):
            raise InvalidParameterError(f"unknown adapter {name!r}: no adapters are loaded")
        yield
        return
    if name in (None, BASE):
        with module.disable_adapter():
            yield
        return
    if name not in module.peft_config:
        raise InvalidParameterError(f"unknown adapter {name!r}; loaded: {', '.join(module.peft_config)}")
    previous = module.active_adapter
    module.set_adapter(name)
    try:
        yield
    finally:
        module.set_adapter(previous)


def merge(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The base with adapter `name` folded into its weights (other adapters dropped)."""
    if not has_adapters(module) or name not in module.peft_config:
        raise InvalidParameterError(f"no adapter named {name!r} to merge")
    for other in [n for n in module.peft_config if n != name]:
        module.delete_adapter(other)
    module.set_adapter(name)
    return module.merge_and_unload()

"""Checkpoints that survive a kill: model + optimizer + trainer state, written atomically.

Layout: CHECKPOINTS/step-000200/{model.safetensors, optimizer.safetensors, trainer.json}. No
pickle: optimizer moments are flattened into safetensors, scalars go to JSON. A folder appears
under its final name only once complete (temporary folder + rename), and only the newest
`keep` folders are kept. Full (unsharded) state dicts, so DDP, FSDP and single-process runs
read each other's checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from genlab.errors import GenlabError
from genlab.fsutil import atomic_dir, write_json

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def list_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("step-*") if (p / "trainer.json").exists())


def refuse_overwrite(out: Path, resume: bool) -> None:
    """A run folder with checkpoints is continued with --resume, never silently restarted."""
    if not resume and list_checkpoints(Path(out) / "checkpoints"):
        raise GenlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def save_checkpoint(folder: Path, model, optimizer, trainer_state: dict, keep: int, is_writer: bool = True,
                    only: set[str] | None = None) -> Path | None:
    """Gather full state on every rank (collective under FSDP), write on the writer rank.
    `only`: the parameter names to keep (LoRA: the adapter, not the frozen base)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)
    if not is_writer:
        return None
    if only is not None:
        model_sd = {k: v for k, v in model_sd.items() if k in only}
    tensors, scalars = {}, {}
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{fqn}::{key}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{fqn}::{key}"] = value
    path = Path(folder) / f"step-{trainer_state['step']:06d}"
    with atomic_dir(path) as tmp:
        # clone: tied weights share storage, which safetensors refuses to write twice
        save_file({k: v.detach().clone().contiguous() for k, v in model_sd.items()}, tmp / "model.safetensors")
        save_file(tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in optim_sd["param_groups"]]
        write_json(tmp / "trainer.json", {**trainer_state, "optimizer_scalars": scalars, "param_groups": groups})
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise GenlabError(f"{path}: unreadable checkpoint ({e})") from None


def load_checkpoint(path: Path, model, optimizer, strict: bool = True) -> dict:
    """Restore model and optimizer in place; return the trainer state. `strict=False` for
    checkpoints that hold only the trainable parameters."""
    state = read_trainer_state(path)
    try:
        model_sd = load_file(path / "model.safetensors")
        flat = load_file(path / "optimizer.safetensors")
    except (OSError, ValueError, RuntimeError) as e:
        raise GenlabError(f"{path}: unreadable checkpoint ({e})") from None
    optim_state: dict[str, dict] = {}
    for key, value in list(flat.items()) + list(state.pop("optimizer_scalars").items()):
        if key == "_empty":
            continue
        fqn, name = key.split("::")
        optim_state.setdefault(fqn, {})[name] = value
    optim_sd = {"state": optim_state, "param_groups": state.pop("param_groups")}
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=strict))
    return state

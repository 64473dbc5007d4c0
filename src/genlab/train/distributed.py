"""One process or many: torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*.

Data-parallel with DDP (gloo on CPU, NCCL on GPU), or parameter sharding with FSDP2
(`fully_shard`, one unit per transformer block) for models that do not fit one GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: list[float]) -> list[float]:
        """Average a few numbers over processes (identity in a single process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup(device: str = "auto") -> Dist:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def wrap(module: torch.nn.Module, d: Dist, fsdp: bool) -> torch.nn.Module:
    if d.world == 1 and not fsdp:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # Shard each transformer block (the model's first ModuleList), then the rest.
        blocks = next((m for m in module.modules() if isinstance(m, torch.nn.ModuleList)), [])
        for block in blocks:
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def main_first(d: Dist, fn):
    """fn() on the main process first (it writes shared caches), then on the others (which
    read them)."""
    result = fn() if d.is_main else None
    barrier(d)
    return result if d.is_main else fn()


def start(cfg, resume: bool, console):
    """The opening of a training run: processes, a logger that only the main one prints to,
    and the run folder (refused if it already holds a run and `resume` is off)."""
    from pathlib import Path

    from genlab.train.checkpoint import refuse_overwrite

    d = setup(cfg.device)
    log = console.print if d.is_main else (lambda *a, **k: None)
    out = Path(cfg.out)
    refuse_overwrite(out, resume)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return d, log, out


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

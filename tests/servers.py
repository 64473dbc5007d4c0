"""Test helpers: a tiny genlab model folder and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import socket
import time

import genlab
from genlab.model.transformer import ModelConfig
from genlab.serve.app import background

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=256)


def tiny_model_folder(tokenizer, folder, seed: int = 0):
    """A random genlab model saved as a folder (larger init: outputs differ clearly per prompt)."""
    import torch

    model = genlab.build(TINY, tokenizer, seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.base.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


running = background  # the package's own in-thread server


def wait_healthy(url: str, proc, timeout: float = 120) -> None:
    """Wait until a server subprocess answers /health (fail with its output if it dies)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy")

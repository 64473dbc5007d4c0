"""Training throughput: genlab's transformer + loop step vs plain transformers, one run.

    python bench/train.py                       # ~10M model on CPU, fp32
    python bench/train.py --device cuda --preset 110m --seq-len 1024 --batch 16 --compile   # GPU: bf16, MFU

Both sides: the same config and initial weights, the same batches, forward + backward + AdamW
step (the anchor: `LlamaForCausalLM` in eager mode with torch's default AdamW). genlab's side is
the step its trainer runs (fused AdamW, its own attention/norm/loss code; bf16 autocast and
optional torch.compile on GPU). Prints tokens/s and the ratio; on GPU also MFU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext
from datetime import date

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genlab.model.io import config_to_hf
from genlab.model.presets import count_params, preset
from genlab.model.transformer import Transformer
from genlab.train.config import TrainConfig
from genlab.train.loop import make_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def flops_per_token(cfg, seq_len: int) -> float:
    """6N for the matmuls plus attention's 12 * layers * hidden * seq (PaLM appendix B)."""
    n = count_params(cfg) - cfg.vocab_size * cfg.hidden_size  # embeddings lookups are not matmuls
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.hidden_size  # ... but a tied table is also the LM head
    return 6 * n + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, batches, device, warmup: int) -> float:
    """Median seconds per step over `batches`, after `warmup` steps."""
    for x, y in batches[:warmup]:
        step(x, y)
    sync(device)
    times = []
    for x, y in batches[warmup:]:
        start = time.perf_counter()
        step(x, y)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, 256))
    tcfg = TrainConfig(lr=1e-3, compile=args.compile)

    torch.manual_seed(0)
    ours = Transformer(cfg).init_weights(seed=0).to(device).train()
    theirs = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg))).to(device).train()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
               for _ in range(args.steps + args.warmup)]
    batches = [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches]
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    opt_ours = make_optimizer(ours, tcfg, device)
    forward = torch.compile(ours) if args.compile else ours

    def genlab_step(x, y):
        with autocast():
            loss = forward(x, targets=y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3)

    def hf_step(x, y):
        with autocast():
            loss = theirs(input_ids=x, labels=None).logits
            loss = torch.nn.functional.cross_entropy(loss.float().reshape(-1, loss.shape[-1]), y.reshape(-1))
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    # Interleaved rounds, so drift on a shared machine hits every variant alike.
    sides = {"genlab": genlab_step, "transformers": hf_step}
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            times[name].append(measure(fn, batches, device, args.warmup))
    median = {name: statistics.median(t) for name, t in times.items()}
    t_ours, t_hf = median["genlab"], median["transformers"]
    tokens = args.batch * args.seq_len
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# training step: genlab vs transformers — {date.today()} — {machine} — torch {torch.__version__} — "
          f"{args.preset} ({ours.num_params() / 1e6:.1f}M), batch {args.batch} x {args.seq_len}, "
          f"{'bf16 autocast' if cuda else 'fp32'}{' + compile (genlab)' if args.compile else ''}, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    for name, t in median.items():
        print(f"{name:<22} {tokens / t:>10,.0f} tok/s  ({t * 1e3:.1f} ms/step)  ratio {t_hf / t:.2f}x")
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            fpt = flops_per_token(cfg, args.seq_len)
            print(f"MFU           genlab {fpt * tokens / t_ours / (peak * 1e12):.1%}, "
                  f"transformers {fpt * tokens / t_hf / (peak * 1e12):.1%} (peak {peak:.0f} TFLOPS bf16)")


if __name__ == "__main__":
    main()

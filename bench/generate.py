"""Decode speed: genlab's engine vs transformers' `generate`, same weights, same prompts, one run.

    python bench/generate.py                 # ~10M and ~110M models, batch 1 and 16, fp32 on CPU
    python bench/generate.py --sizes 10m --new-tokens 64
    python bench/generate.py --device cuda --dtype bfloat16 --compile   # on a GPU

Greedy decoding with end-of-sequence ignored, so both sides generate exactly --new-tokens
tokens per row; prompts have different lengths (left padding on both sides). Prints tokens/s,
the ratio genlab / transformers and whether the generated tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genlab.generate.engine import Engine
from genlab.generate.sampling import SamplingParams
from genlab.model.io import config_to_hf
from genlab.model.presets import preset
from genlab.model.transformer import Transformer


class NoText:
    """The engine only needs a tokenizer for text output; the benchmark compares token ids."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns, device, repeats):
    """Median seconds of each function, run in interleaved rounds (drift hits all alike)."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            results[i] = fn()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


def run(size: str, batch: int, args) -> dict:
    cfg = preset(size, max_seq_len=512)
    torch.manual_seed(0)
    ours = Transformer(cfg).init_weights(seed=0).eval()
    theirs = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg))).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    dtype = getattr(torch, args.dtype)
    ours, theirs = ours.to(args.device, dtype), theirs.to(args.device, dtype)
    engine = Engine(ours, NoText(), eos_token_ids=[], compile=args.compile)

    gen = torch.Generator().manual_seed(batch)
    lengths = [12 + (7 * i) % 13 for i in range(batch)]
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(args.device), mask.to(args.device)
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=0)

    def genlab_run():
        return [c.token_ids for c in engine.generate(prompts, params)]

    @torch.inference_mode()
    def hf_run():
        out = theirs.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        return out[:, width:].tolist()

    engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))  # warm-up (and compile)
    hf_run() if args.repeats > 1 else None
    (t_ours, t_hf), (tokens_ours, tokens_hf) = timed([genlab_run, hf_run], args.device, args.repeats)
    same = sum(a == b for a, b in zip(tokens_ours, tokens_hf))
    return dict(model=size, params_m=round(ours.num_params() / 1e6, 1), batch=batch,
                genlab_tok_s=round(batch * n / t_ours, 1), transformers_tok_s=round(batch * n / t_hf, 1),
                ratio=round(t_hf / t_ours, 2), identical_rows=f"{same}/{batch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10m", "110m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# genlab vs transformers generate — {date.today()} — {machine} — torch {torch.__version__} — "
          f"{args.dtype}{' + compile' if args.compile else ''}, greedy, {args.new_tokens} new tokens")
    print(f"{'model':>6} {'params':>8} {'batch':>5} {'genlab tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} {'identical':>9}")
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            r = run(size, batch, args)
            rows.append(r)
            print(f"{r['model']:>6} {r['params_m']:>7}M {r['batch']:>5} {r['genlab_tok_s']:>13,.1f} "
                  f"{r['transformers_tok_s']:>19,.1f} {r['ratio']:>5.2f}x {r['identical_rows']:>9}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(date.today()), "machine": machine, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

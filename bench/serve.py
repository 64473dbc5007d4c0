"""Serving under load: N concurrent streaming clients against `genlab serve` on loopback.

    python bench/serve.py                       # 1, 4, 16, 64 clients; batch vs sequential
    python bench/serve.py --clients 1 16 --seconds 20 --model runs/quickstart/pretrain/model

For each engine — genlab's continuous batching (`--engine batch`) and the anchor, transformers'
`generate()` called per request behind the same endpoint (`--engine sequential`) — a fresh
server process is started, then for each client count every client streams chat completions
(max_tokens tokens each) back to back until its request budget or the time budget runs out.
Printed: aggregate generated tokens/s (server-reported usage), p50/p95 time to first token,
errors. Floor: with batching, 16 clients get >= 4x the single-client tokens/s, with no errors.
Without --model a random 10m-preset model with a tokenizer trained on the bundled text is used
(throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def make_model(folder: Path, preset: str = "10m") -> Path:
    """A random model of `preset` with a tokenizer trained on the bundled text (also used by bench/loop.py)."""
    import genlab
    from genlab.codecs.text import train_tokenizer
    from genlab.data.corpus import python_docs_corpus

    tok = train_tokenizer(texts=python_docs_corpus()[:1500], vocab_size=4096, out_dir=folder / "tok")
    genlab.build(preset, tok, seed=0).save(folder / "model")
    return folder / "model"


def start_server(model: Path, engine: str, port: int, db: Path, slots: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "genlab.cli", "serve", str(model), "--port", str(port), "--engine", engine,
           "--db", str(db), "--slots", str(slots), "--max-queue", "1024", "--name", "model"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 180 s")


async def one_request(client, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed chat completion."""
    body = {"model": "model", "messages": [{"role": "user", "content": f"Question {i}: explain the module number {i}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), tokens


async def load_level(url: str, clients: int, requests: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    ttft, tokens, errors = [], [], []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w: int):
            for k in range(requests):
                if time.perf_counter() > deadline:
                    return
                try:
                    t, n = await one_request(client, url, w * 1000 + k, max_tokens)
                    ttft.append(t)
                    tokens.append(n)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(str(e)[:200])

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(tokens), "tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "ttft_p50_ms": float(np.percentile(ttft, 50) * 1000) if ttft else None,
            "ttft_p95_ms": float(np.percentile(ttft, 95) * 1000) if ttft else None, "errors": len(errors),
            "error_examples": errors[:3]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a random 10m-preset model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--engines", nargs="+", default=["batch", "sequential"])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at most")
    parser.add_argument("--seconds", type=float, default=40, help="time budget per level (requests in flight finish)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="genlab-serve-bench-"))
    model = Path(args.model) if args.model else make_model(tmp)
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    for engine in args.engines:
        proc = start_server(model, engine, args.port, tmp / f"{engine}.db", args.slots)
        try:
            asyncio.run(load_level(url, 2, 1, 30, 8))  # warm-up
            for clients in args.clients:
                r = asyncio.run(load_level(url, clients, args.requests, args.seconds, args.max_tokens))
                results.setdefault(engine, []).append(r)
                print(f"{engine:10} {clients:3} clients: {r['tokens_per_s']:8.1f} tok/s  ttft p50 {r['ttft_p50_ms']:.0f} ms "
                      f"p95 {r['ttft_p95_ms']:.0f} ms  {r['requests']} requests  {r['errors']} errors", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\n# serving benchmark — {date.today()} — {platform.machine()} CPU, {os.cpu_count()} cores — "
          f"{'random 10m model' if not args.model else args.model}, {args.max_tokens} tokens per request, streaming")
    print(f"{'engine':11} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'requests':>8} {'errors':>6}")
    for engine, rows in results.items():
        for r in rows:
            print(f"{engine:11} {r['clients']:>7} {r['tokens_per_s']:>8.1f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>7.0f}ms "
                  f"{r['requests']:>8} {r['errors']:>6}")
    if "batch" in results:
        by = {r["clients"]: r for r in results["batch"]}
        if 1 in by and 16 in by:
            ratio = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
            print(f"batch: 16 clients / 1 client tokens/s = {ratio:.2f}x (floor 4x); errors at 16: {by[16]['errors']}")
    if "batch" in results and "sequential" in results:
        seq = {r["clients"]: r for r in results["sequential"]}
        for r in results["batch"]:
            if r["clients"] in seq:
                print(f"{r['clients']:>3} clients: batch / sequential (transformers generate) tokens/s = "
                      f"{r['tokens_per_s'] / seq[r['clients']]['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "results": results}, indent=2))


if __name__ == "__main__":
    main()

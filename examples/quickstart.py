"""genlab quickstart: the whole tour on bundled data, offline, on a laptop CPU.

    bash scripts/quickstart.sh            # writes everything under runs/quickstart/

1. Text codec: train a byte-level BPE tokenizer on CPython's bundled documentation.
2. Pretraining: a ~2M-parameter Llama-family transformer learns that corpus for ~2 minutes
   (validation loss, tokens/s, loss curve), saved as a Hugging Face folder; plain
   `transformers` loads it with the same logits.
3. Generation: greedy decoding equals transformers' `generate`; seeded sampling; streaming.
4. Speed: genlab's engine vs transformers' `generate` on the same weights (plot).
5. Domain adaptation: LoRA continued pretraining on bundled statistics text (scipy.stats
   docstrings, scikit-learn / statsmodels dataset descriptions): held-out domain perplexity
   falls while general (Python docs) perplexity stays within 20%; then instruction tuning on
   bundled statistics Q&A with base-vs-adapted answers; both adapters served from one base.
6. Retrieval: index CPython's documentation topics (MiniLM embeddings, SQLite + FTS5 + FAISS),
   measure dense / BM25 / hybrid retrieval on the labelled question set in tests/data, and ask
   the pretrained model a question grounded in retrieved, cited chunks.
7. Serving: the OpenAI-compatible server in this process, the official client streaming,
   RAG through the API, JSON mode, continuous batching, feedback recorded and exported.
8. Time series: a series model pretrained on KernelSynth + TSMixup series, a CO2 fan chart,
   and rolling-origin backtests (zero-shot and per-series fine-tuned vs seasonal naive, ETS,
   ARIMA) on the bundled statsmodels series.
9. Synthetic tables: a table model learns 80% of statsmodels' randhie (health insurance) as
   token rows, samples new records through the row grammar (every row valid), and a report scores
   fidelity, utility and privacy against the 20% holdout, beside independent marginals and a
   Gaussian copula.
10. Music: a tune model on music21's bundled ABC corpus for ~1 minute; held-out bits per character
   next to a character Kneser-Ney n-gram fitted on the same tunes; 20 tunes over five keys / meters,
   the share music21 parses, one tune written as ABC and MIDI.
11. Images: a few thousand procedural captioned scenes; the FSQ image tokenizer (held-out PSNR next
   to a mean-colour and a thumbnail baseline); a text-to-image model for ~1 minute (validation loss
   before / after) and its best-of-N captioner for 15 s; a grid for "a cat wearing sunglasses",
   "a red circle left of a blue square"..., and the same grid with each image the best of 4.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import transformers  # noqa: E402

import genlab  # noqa: E402
from genlab.data.corpus import python_docs_corpus  # noqa: E402

console = Console()


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def tokenizer_tour(out: Path, summary: dict):
    step("1 · tokenizer on bundled Python documentation")
    docs = python_docs_corpus()
    start = time.perf_counter()
    tok = genlab.train_tokenizer(texts=docs, vocab_size=4096, out_dir=out / "tokenizer")
    seconds = time.perf_counter() - start
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    n_tokens = sum(map(len, ids))
    lossless = all(tok.decode(i, skip_special_tokens=False) == d for i, d in zip(ids, docs))
    chars = sum(map(len, docs))
    console.print(f"{len(docs)} documents, {chars:,} characters -> {n_tokens:,} tokens "
                  f"({chars / n_tokens:.2f} chars/token), trained in {seconds:.1f}s; lossless round trip: {lossless}")
    summary.update(corpus_docs=len(docs), corpus_chars=chars, corpus_tokens=n_tokens,
                   chars_per_token=round(chars / n_tokens, 2), tokenizer_lossless=lossless)
    return tok


def pretrain_tour(out: Path, summary: dict, max_steps: int):
    step("2 · pretraining a ~2M-parameter transformer on the same corpus")
    from transformers import AutoModelForCausalLM

    run = out / "pretrain"
    shutil.rmtree(run, ignore_errors=True)  # the tour always starts fresh
    result = genlab.pretrain(out=str(run), tokenizer=str(out / "tokenizer"), preset="2m", seq_len=256, batch_size=16,
                             max_steps=max_steps, warmup_steps=30, eval_every=50, checkpoint_every=100,
                             max_minutes=3, lr=3e-3, device="cpu", console=console)
    model = genlab.load(result.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    ids = torch.tensor([model.encode("def fibonacci(n):")])
    with torch.no_grad():
        diff = (model.module(ids) - hf(ids).logits).abs().max().item()
    r = result.result
    console.print(f"validation loss {result.first_val_loss:.3f} -> {r.val_loss:.3f} "
                  f"(perplexity {math.exp(result.first_val_loss):,.0f} -> {math.exp(r.val_loss):,.1f}) after "
                  f"{r.tokens:,} tokens in {r.seconds:.0f}s ({r.tokens_per_s:,.0f} tok/s); transformers loads "
                  f"{result.model_dir} as {type(hf).__name__}, max logit difference {diff:.1e}")
    summary.update(params_m=round(model.module.num_params() / 1e6, 2), val_loss_before=round(result.first_val_loss, 3),
                   val_loss_after=round(r.val_loss, 3), train_tokens=r.tokens, train_tokens_per_s=round(r.tokens_per_s),
                   hf_logit_max_diff=diff)
    return model, hf, run / "loss.png"


def generation_tour(model, hf, summary: dict):
    step("3 · generation from the pretrained model")
    prompt = "The for statement is"
    ours = model.generate(prompt, max_new_tokens=24, temperature=0)
    ids = model.encode(prompt)
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=24, do_sample=False, pad_token_id=model.tokenizer.pad_token_id,
                      eos_token_id=model.eos_token_ids)[0, len(ids):].tolist()
    same = ours.token_ids == [t for t in ref if t not in model.eos_token_ids][: len(ours.token_ids)]
    a = model.generate(prompt, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=42).text
    b = model.generate(prompt, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=42).text
    console.print(f"greedy equals transformers' generate: {same}; same seed -> same text: {a == b}")
    console.print("streamed: ", end="")
    for piece in model.stream(prompt, max_new_tokens=16, temperature=0.8, seed=1):
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    summary.update(greedy_equals_transformers=same, seeded_sampling_reproducible=a == b)


def speed_tour(model, hf, out: Path, summary: dict, new_tokens: int):
    step("4 · decode speed vs transformers' generate (same weights, greedy)")
    rows = []
    for batch in (1, 16):
        prompts = [model.encode(f"Topic {i}: the with statement") for i in range(batch)]
        width = max(map(len, prompts))
        ids = torch.tensor([[model.tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        params = genlab.SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=[])
        model.engine.eos_token_ids = []  # both sides generate exactly new_tokens tokens
        model.engine.generate(prompts, params)
        start = time.perf_counter()
        model.engine.generate(prompts, params)
        ours = batch * new_tokens / (time.perf_counter() - start)
        with torch.inference_mode():
            start = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, pad_token_id=model.tokenizer.pad_token_id, eos_token_id=None)
            theirs = batch * new_tokens / (time.perf_counter() - start)
        rows.append((batch, ours, theirs))
    table = Table("batch", "genlab tok/s", "transformers tok/s", "ratio")
    for batch, ours, theirs in rows:
        table.add_row(str(batch), f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}x")
    console.print(table)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], width=0.4, label="genlab")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], width=0.4, label="transformers generate")
    ax.set_xticks(list(x), [f"batch {r[0]}" for r in rows])
    ax.set_ylabel("tokens / s")
    ax.set_title("Decode speed, 2M-parameter model, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "generate_speed.png", dpi=120)
    summary.update({f"decode_ratio_batch{b}": round(o / t, 2) for b, o, t in rows})
    return out / "generate_speed.png"


def adaptation_tour(out: Path, base_dir: Path, summary: dict, steps: int):
    step("5 · domain adaptation: LoRA on bundled statistics text, then instruction tuning")
    root = out / "adapt"
    shutil.rmtree(root, ignore_errors=True)
    common = dict(model=str(base_dir), seq_len=256, batch_size=8, warmup_steps=5, device="cpu", console=console)
    cpt = genlab.finetune(out=str(root / "cpt"), mode="cpt", max_steps=steps, lr=1e-3, eval_every=40,
                          checkpoint_every=steps, **common)
    (d0, d1), (g0, g1) = cpt.domain_ppl, cpt.general_ppl
    console.print(f"continued pretraining (LoRA r=16, {steps} steps): held-out statistics perplexity {d0:,.1f} -> "
                  f"{d1:,.1f} ({(d1 / d0 - 1) * 100:+.0f}%); general perplexity {g0:,.1f} -> {g1:,.1f} "
                  f"({(g1 / g0 - 1) * 100:+.0f}%, bound +20%: {'within' if not cpt.forgetting else 'EXCEEDED'})")
    console.print("instruction tuning: 300 short Q&A pairs for 30 steps (~6 epochs), so the forgetting check has "
                  "something to say")
    sft = genlab.finetune(out=str(root / "sft"), mode="sft", max_steps=30, lr=2e-3, eval_every=15,
                          checkpoint_every=30, samples=2, **common)
    s0, s1 = sft.domain_ppl
    model = genlab.load(base_dir, adapters={"statistics": cpt.output_dir, "qa": sft.output_dir})
    prompt = "What does scipy.stats.norm do?"
    table = Table("adapter (one base in memory)", f"greedy answer to {prompt!r}")
    for name in ("base", "statistics", "qa"):
        text = model.generate(prompt, adapter=name, max_new_tokens=24, temperature=0).text
        table.add_row(name, repr(text[:80]))
    console.print(table)
    summary.update(domain_ppl_before=round(d0, 1), domain_ppl_after=round(d1, 1), general_ppl_before=round(g0, 1),
                   general_ppl_after=round(g1, 1), general_within_bound=not cpt.forgetting,
                   sft_answer_ppl_before=round(s0, 1), sft_answer_ppl_after=round(s1, 1),
                   sft_forgetting_warning=sft.forgetting)
    return cpt.out / "loss.png"


def rag_tour(out: Path, model_dir: Path, summary: dict):
    step("6 · retrieval-augmented generation over CPython's documentation topics")
    import sys

    from genlab.evaluate.retrieval import evaluate_retrieval, read_qrels
    from genlab.rag.embed import Embedder

    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    sys.path.insert(0, str(data))
    from make_pydoc_qrels import topic_documents

    docs, store = out / "rag" / "docs", out / "rag" / "store"
    shutil.rmtree(out / "rag", ignore_errors=True)
    docs.mkdir(parents=True)
    for name, text in topic_documents().items():
        (docs / f"{name}.txt").write_text(text)
    embedder = Embedder()
    report = genlab.index([docs], store, embedder, console=console)
    console.print(f"indexed {len(report.added)} files -> {report.chunks_total} chunks in {report.seconds:.1f}s")
    retriever = genlab.Retriever(store, embedder)
    results = evaluate_retrieval(retriever, read_qrels(data / "pydoc_qrels.jsonl"))
    table = Table("method", *results["hybrid"], title="79 labelled questions (tests/data/pydoc_qrels.jsonl)")
    for method, values in results.items():
        table.add_row(method, *(f"{v:.3f}" for v in values.values()))
    console.print(table)
    model = genlab.load(model_dir)
    question = "What does the with statement do?"
    console.print(f"[bold]ask:[/] {question}\n[dim]answer (a 1.3M-parameter model, so mostly the form):[/] ", end="")
    answer = genlab.ask(model, retriever, question, k=3, template="context", max_new_tokens=40, temperature=0,
                        on_text=lambda t: console.print(t, end="", markup=False, highlight=False))
    console.print()
    for n, hit in enumerate(answer.sources, 1):
        console.print(f"  [{n}]{' (cited)' if n in answer.cited else ''} {hit.source}", markup=False, highlight=False)
    summary.update({f"retrieval_{m}_recall@5": round(v["recall@5"], 3) for m, v in results.items()})
    summary.update(retrieval_hybrid_mrr10=round(results["hybrid"]["mrr@10"], 3), rag_chunks=report.chunks_total)


def serve_tour(out: Path, model_dir: Path, summary: dict):
    step("7 · serving: OpenAI-compatible API, continuous batching, feedback capture")
    import threading

    import httpx
    import openai

    from genlab.feedback.store import FeedbackStore
    from genlab.serve.app import ServeConfig, background, create_app

    root = out / "serve"
    shutil.rmtree(root, ignore_errors=True)
    adapters = {"qa": out / "adapt" / "sft" / "adapter"}
    model = genlab.load(model_dir, adapters={k: v for k, v in adapters.items() if v.exists()})
    app = create_app(model, ServeConfig(name="quickstart", db=root / "feedback.db", store=out / "rag" / "store"))
    with background(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        console.print(f"server at {url} (web UI at {url}/); models: {[m.id for m in client.models.list()]}")
        console.print("[bold]openai client, streaming from quickstart:qa:[/] ", end="")
        question = [{"role": "user", "content": "What does scipy.stats.norm do?"}]
        for chunk in client.chat.completions.create(model="quickstart:qa", messages=question, max_tokens=32,
                                                    temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        console.print()
        grounded = client.chat.completions.create(model="quickstart+docs", max_tokens=24, temperature=0, messages=[
            {"role": "user", "content": "What does the with statement do?"}])
        console.print("RAG answer sources: " + ", ".join(s["source"] for s in grounded.model_extra["sources"]),
                      markup=False, highlight=False)
        as_json = client.chat.completions.create(model="quickstart", max_tokens=40, temperature=0.8, seed=1,
                                                 response_format={"type": "json_object"}, messages=question)
        console.print(f"json_object answer (always parses): {as_json.choices[0].message.content}", markup=False)

        def load(clients: int) -> float:
            tokens = []

            def one(i):
                r = client.chat.completions.create(model="quickstart", max_tokens=48, temperature=1.0, seed=i,
                                                   messages=[{"role": "user", "content": f"Tell me about module {i}."}])
                tokens.append(r.usage.completion_tokens)

            start = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(tokens) / (time.perf_counter() - start)

        single, eight = load(1), load(8)
        console.print(f"continuous batching: 1 client {single:,.0f} tok/s, 8 concurrent clients {eight:,.0f} tok/s "
                      f"aggregate ({eight / single:.1f}x; clients and server share this process and its GIL, and a "
                      f"1.3M model is mostly Python overhead: bench/serve.py measures a separate server)")
        a = client.chat.completions.create(model="quickstart", messages=question, max_tokens=24, temperature=1.0, seed=1)
        b = client.chat.completions.create(model="quickstart", messages=question, max_tokens=24, temperature=1.0, seed=2)
        for body in ({"completion_id": a.id, "rating": 1}, {"completion_id": b.id, "rating": -1},
                     {"completion_id": b.id, "correction": "It is the normal (Gaussian) continuous random variable."},
                     {"completion_id": a.id, "preferred": a.id, "rejected": b.id}):
            httpx.post(url + "/v1/feedback", json=body).raise_for_status()
    with FeedbackStore(root / "feedback.db") as store:
        counts = {kind: store.export(kind, root / f"{kind}.jsonl") for kind in ("dpo", "kto", "sft")}
        recorded = store.count_completions()
    console.print(f"recorded {recorded} exchanges; feedback exported as TRL datasets: {counts} -> {root}/")
    summary.update(serve_tok_s_1_client=round(single), serve_tok_s_8_clients=round(eight),
                   serve_batching_gain=round(eight / single, 1), serve_recorded_exchanges=recorded,
                   feedback_dpo_rows=counts["dpo"])


def series_tour(out: Path, summary: dict, steps: int, finetune_steps: int):
    step("8 · time series as tokens: pretrain on synthetic series, forecast CO2, fine-tune, backtest")
    from genlab.series.data import bundled
    from genlab.series.evaluate import evaluate_series, wins
    from genlab.series.model import SeriesModel, summarise
    from genlab.series.plots import fan_chart
    from genlab.series.train import pretrain_series

    root = out / "series"
    shutil.rmtree(root, ignore_errors=True)
    run = pretrain_series(out=str(root / "pretrain"), max_steps=steps, max_minutes=3, device="cpu", console=console)
    r = run.result
    console.print(f"series model: validation loss {run.val_loss_before:.3f} -> {r.val_loss:.3f} nats/value after "
                  f"{r.tokens:,} tokens in {r.seconds:.0f}s (KernelSynth {run.data['kernel_synth']:,} series + "
                  f"TSMixup {run.data['ts_mixup']['windows']:,} windows of the bundled series' first 80%)")
    co2 = bundled(["co2"])["co2"]
    model = SeriesModel.load(run.output_dir, num_samples=100)
    start = time.perf_counter()
    forecast = summarise(model.sample(co2.values, 52))
    seconds = time.perf_counter() - start
    future = co2.future_index(52)
    fan = fan_chart(co2.index[-260:], co2.values[-260:], future, forecast, root / "co2_forecast.png",
                    "Mauna Loa CO2 (weekly): 100 sampled paths, one year ahead")
    console.print(f"CO2 forecast for {future[-1]:%Y-%m-%d}: median {forecast.median[-1]:.1f} ppm, 80% band "
                  f"{forecast.quantiles[0][-1]:.1f} .. {forecast.quantiles[-1][-1]:.1f} (last observed "
                  f"{co2.values[-1]:.1f}); 100 paths x 52 weeks sampled in {seconds:.1f}s -> {fan}")
    result = evaluate_series(run.output_dir, out=root / "eval", windows=3, finetune_steps=finetune_steps,
                             console=console)
    console.print(result.table())
    rel = result.relative()
    won = {other: wins(result, "genlab-finetuned", other) for other in ("genlab-zero-shot", "ets")}
    console.print(f"geometric mean relative to seasonal naive: zero-shot MASE {rel['genlab-zero-shot']['mase']:.3f} / "
                  f"WQL {rel['genlab-zero-shot']['wql']:.3f}, fine-tuned {rel['genlab-finetuned']['mase']:.3f} / "
                  f"{rel['genlab-finetuned']['wql']:.3f}, ETS {rel['ets']['mase']:.3f} / {rel['ets']['wql']:.3f}; "
                  f"fine-tuned beats zero-shot on {won['genlab-zero-shot'][0]}/{won['genlab-zero-shot'][1]} series "
                  f"and ETS on {won['ets'][0]}/{won['ets'][1]} (MASE)")
    summary.update(series_val_loss=round(r.val_loss, 3), co2_median_in_1_year=round(float(forecast.median[-1]), 1),
                   **{f"series_rel_{metric}_{name}": round(rel[name][metric], 3)
                      for name in ("genlab-zero-shot", "genlab-finetuned", "ets", "arima") for metric in ("mase", "wql")})
    return [root / "pretrain" / "loss.png", fan, root / "eval" / "relative.png"]


def synth_tour(out: Path, summary: dict, steps: int):
    step("9 · synthetic tables: randhie as token rows, constrained sampling, fidelity / utility / privacy")
    import numpy as np

    from genlab.data.tables import bundled_table
    from genlab.synth.model import TableModel, fit_table
    from genlab.synth.report import report

    root = out / "synth"
    shutil.rmtree(root, ignore_errors=True)
    df = bundled_table("randhie")
    order = np.random.default_rng(0).permutation(len(df))
    cut = int(len(df) * 0.8)
    train, holdout = df.iloc[order[:cut]].reset_index(drop=True), df.iloc[order[cut:]].reset_index(drop=True)
    run = fit_table(train, out=str(root / "fit"), max_steps=steps, max_minutes=1.5, console=console)
    model = TableModel.load(run.model_dir)
    start = time.perf_counter()
    synth = model.sample(len(holdout), seed=1)
    rows_per_s = len(holdout) / (time.perf_counter() - start)
    seen = set(model.row_texts(train))  # randhie repeats itself: count how often a fresh real row does too
    copies, base_rate = (sum(t in seen for t in model.row_texts(f)) / len(f) for f in (synth, holdout))
    rep = report(train, synth, holdout, target="mdvis", out=root / "report")
    s = rep["summary"]
    for name, values in s.items():
        console.print(f"{name:>22}: shape {values['fidelity.shape']:.3f}, pair trends {values['fidelity.pair_trends']:.3f}, "
                      f"utility R2 {values['utility.synthetic']:.3f} (real {values['utility.real']:.3f}), exact copies "
                      f"{values['privacy.exact_copies']}, DCR median {values['privacy.dcr_synthetic_median']:.3f} "
                      f"(holdout {values['privacy.dcr_holdout_median']:.3f}), membership-inference AUC "
                      f"{values['privacy.mia_auc']:.3f}")
    console.print(f"{len(synth):,} rows sampled at {rows_per_s:,.0f} rows/s; {copies:.1%} equal a training row, as do "
                  f"{base_rate:.1%} of the real holdout rows (`synth sample --no-copies-of` drops and redraws such rows); "
                  f"report -> {root / 'report' / 'report.html'}")
    mine = s["synthetic"]
    summary.update(synth_shape=round(mine["fidelity.shape"], 3), synth_pair_trends=round(mine["fidelity.pair_trends"], 3),
                   synth_utility_r2=round(mine["utility.synthetic"], 3), real_utility_r2=round(mine["utility.real"], 3),
                   synth_mia_auc=round(mine["privacy.mia_auc"], 3), synth_exact_copies=mine["privacy.exact_copies"],
                   synth_rows_per_s=round(rows_per_s))
    return [root / "fit" / "loss.png", root / "report" / "shapes.png", root / "report" / "dcr.png"]


def music_tour(out: Path, summary: dict, steps: int, minutes: float):
    step("10 · music as ABC text: a tune model on music21's corpus, held-out bits/char, tunes music21 parses")
    from genlab.music.codec import conditioning, music_model_spec
    from genlab.music.generate import GenerationResult, generate_for, write_abc, write_midi
    from genlab.music.train import train_music

    root = out / "music"
    shutil.rmtree(root, ignore_errors=True)
    run = train_music(out=str(root), max_steps=steps, max_minutes=minutes, warmup_steps=50, eval_every=100,
                      checkpoint_every=steps, device="cpu", console=console)
    held, tr = run.report["heldout"], run.report["training"]
    console.print(f"{tr['parameters'] / 1e6:.2f}M-parameter tune model, {tr['steps']} steps ({tr['tokens']:,} tokens) in "
                  f"{tr['seconds']:.0f}s on {run.report['corpus']['train']:,} tunes; {held['tunes']} held-out tunes: "
                  f"{held['bits_per_char']:.3f} bits/char vs {held['baseline']} {held['baseline_bits_per_char']:.3f} "
                  f"(ratio {held['bits_per_char_vs_baseline']:.3f})")
    model = genlab.load(run.model_dir)
    spec = music_model_spec(model)
    conds = [conditioning(spec, key, meter) for key, meter in (("D", "6/8"), ("G", "2/4"), ("A", "4/4"),
                                                              ("F", "3/4"), ("Em", "6/8"))]
    gen = generate_for(model, conds, 4, seed=0)
    s = gen.summary()
    console.print(f"{s['tunes']} tunes over {len(conds)} key/meter conditions in {gen.seconds:.1f}s: music21 parses "
                  f"{s['parsed']}/{s['tunes']} ({s['parse_rate']:.0%}); failures {s['failure_reasons'] or 'none'}")
    files = write_abc(gen, root / "tunes.abc")  # the parsed tunes; failures with their reason beside them
    first = next((t for t in gen.tunes if t.ok), None)
    if first:
        files += write_abc(GenerationResult([first]), root / "tune.abc") + write_midi(GenerationResult([first]),
                                                                                      root / "tune.mid")[0]
        console.print(first.text, markup=False, highlight=False)
    console.print(f"written: {', '.join(map(str, files))}")
    summary.update(music_bits_per_char=round(held["bits_per_char"], 3),
                   music_ngram_bits_per_char=round(held["baseline_bits_per_char"], 3),
                   music_parse_rate=round(s["parse_rate"], 2))
    return root / "loss.png"


def image_tour(out: Path, summary: dict, images: int, tokenizer_steps: int, steps: int, minutes: float):
    step("11 · images as tokens: procedural scenes, FSQ image tokenizer, text-to-image")
    from genlab.data.scenes import make_dataset
    from genlab.image.grid import save_grid
    from genlab.image.model import ImageModel, fit_image_model
    from genlab.image.train import train_image_tokenizer

    root = out / "image"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    pictures, captions, _ = make_dataset(images, "train", seed=0)
    console.print(f"rendered {len(pictures):,} captioned 32x32 scenes ({len(set(captions)):,} distinct captions, "
                  f"e.g. {captions[0]!r}) in {time.perf_counter() - start:.1f}s")
    tok = train_image_tokenizer(pictures, root / "tokenizer", steps=tokenizer_steps, batch_size=32, lr=3e-3,
                                console=console)
    console.print(f"image tokenizer ({tok.steps} steps, {tok.seconds:.0f}s): {tok.summary()}")
    fit = fit_image_model((pictures, captions), root / "tokenizer", root / "t2i", max_steps=steps, max_minutes=minutes,
                          warmup_steps=30, eval_every=max(1, steps // 4), checkpoint_every=steps, samples=0,
                          captioner_minutes=0.25, console=console)
    console.print(f"text-to-image: validation loss {fit.val_loss_before:.3f} -> {fit.result.val_loss:.3f} nats/token "
                  f"after {fit.result.step} steps in {fit.result.seconds:.0f}s")
    prompts = ["a cat wearing sunglasses", "a red circle left of a blue square", "a large yellow circle",
               "a sun above a tree"]
    model = ImageModel.load(fit.model_dir)
    grid = save_grid(model.generate(prompts, n=6, seed=0), root / "grid.png", columns=6, labels=prompts)
    best = save_grid(model.generate(prompts, n=6, seed=0, candidates=4), root / "grid-best-of-4.png", columns=6,
                     labels=prompts)
    console.print(f"grid: {', '.join(map(repr, prompts))} -> {grid}; each image the best of 4 by the captioner "
                  f"({fit.data['captioner']['steps']} steps, loss {fit.data['captioner']['final_loss']:.3f}) -> {best}")
    m = tok.metrics
    summary.update(image_tokenizer_psnr_db=round(m["psnr"], 2), image_thumbnail_psnr_db=round(m["baseline_thumbnail_psnr"], 2),
                   image_mean_colour_psnr_db=round(m["baseline_mean_colour_psnr"], 2),
                   t2i_val_loss_before=round(fit.val_loss_before, 3), t2i_val_loss_after=round(fit.result.val_loss, 3),
                   t2i_captioner_loss=round(fit.data["captioner"]["final_loss"], 3))
    return [tok.files["reconstructions_png"], root / "t2i" / "loss.png", grid, best]


def main():
    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=240, help="pretraining steps (16 x 256 tokens each)")
    parser.add_argument("--adapt-steps", type=int, default=80, help="LoRA continued-pretraining steps (8 x 256 tokens)")
    parser.add_argument("--series-steps", type=int, default=600, help="series pretraining steps (16 windows of 256 values)")
    parser.add_argument("--series-finetune-steps", type=int, default=30, help="per-series fine-tuning steps in the backtest")
    parser.add_argument("--synth-steps", type=int, default=150, help="table model steps (16 x 256 tokens each)")
    parser.add_argument("--music-steps", type=int, default=400, help="tune model steps (4 x 256 tokens each)")
    parser.add_argument("--music-minutes", type=float, default=1.0, help="cap on the tune model's training time")
    parser.add_argument("--images", type=int, default=3000, help="procedural captioned scenes rendered")
    parser.add_argument("--image-tokenizer-steps", type=int, default=300, help="FSQ image tokenizer steps (32 images)")
    parser.add_argument("--t2i-steps", type=int, default=250, help="text-to-image steps (32 sequences of 75 tokens)")
    parser.add_argument("--t2i-minutes", type=float, default=1.0, help="cap on the text-to-image training time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary, plots, seconds = {}, [], {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:  # seconds per step, for the closing table
        nonlocal last
        seconds[name], last = time.perf_counter() - last, time.perf_counter()

    tokenizer_tour(args.out, summary)
    lap("1 tokenizer")
    model, hf, curve = pretrain_tour(args.out, summary, args.max_steps)
    plots.append(curve)
    lap("2 pretraining")
    generation_tour(model, hf, summary)
    lap("3 generation")
    plots.append(speed_tour(model, hf, args.out, summary, args.new_tokens))
    lap("4 decode speed")
    plots.append(adaptation_tour(args.out, args.out / "pretrain" / "model", summary, args.adapt_steps))
    lap("5 adaptation")
    rag_tour(args.out, args.out / "pretrain" / "model", summary)
    lap("6 retrieval")
    serve_tour(args.out, args.out / "pretrain" / "model", summary)
    lap("7 serving")
    plots += series_tour(args.out, summary, args.series_steps, args.series_finetune_steps)
    lap("8 time series")
    plots += synth_tour(args.out, summary, args.synth_steps)
    lap("9 synthetic tables")
    plots.append(music_tour(args.out, summary, args.music_steps, args.music_minutes))
    lap("10 music")
    plots += image_tour(args.out, summary, args.images, args.image_tokenizer_steps, args.t2i_steps, args.t2i_minutes)
    lap("11 images")
    step("summary")
    table = Table("measured", "value")
    for key, value in summary.items():
        table.add_row(key, f"{value:.2e}" if isinstance(value, float) and value < 1e-3 else str(value))
    console.print(table)
    times = Table("step", "seconds")
    for name, s in seconds.items():
        times.add_row(name, f"{s:.0f}")
    console.print(times)
    console.print(f"plots: {', '.join(map(str, plots))}")
    console.print(f"tour finished in {time.perf_counter() - start:.0f}s; outputs in {args.out}/")


if __name__ == "__main__":
    main()

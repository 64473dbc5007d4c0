"""Domain adaptation: instruction data and loss masks, packing, LoRA / full fine-tuning,
adapters (PEFT interop, merge, per-request switching), evaluation, resume, bad input."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

import genlab
from genlab.codecs.text import render_chat
from genlab.data.instructions import encode_record, prepare_examples
from genlab.errors import DataError, GenlabError
from genlab.model.transformer import ModelConfig, Transformer
from genlab.train.batches import PackedExamples, pack_first_fit
from genlab.train.finetune import CausalLMLoss, evaluate_model, finetune

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=128)


def spans(ids, labels):
    """Contiguous runs of labelled tokens."""
    out, cur = [], []
    for i, on in zip(ids, labels):
        if on:
            cur.append(int(i))
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


# --- instruction data ------------------------------------------------------------------------
def test_chat_loss_mask_token_by_token(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "CO2 in 1958?"},
                {"role": "assistant", "content": "315.7 ppm"}, {"role": "user", "content": "And 2024?"},
                {"role": "assistant", "content": "422.8 ppm"}]
    ex = encode_record(tokenizer, {"messages": messages}, "x:1")
    assert len(ex.ids) == len(ex.labels)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert [decode(s) for s in spans(ex.ids, ex.labels)] == ["315.7 ppm<|end|>\n", "422.8 ppm<|end|>\n"]
    # Everything else is prompt, and the prompt is exactly what generation is given.
    assert decode(ex.prompt_ids) == render_chat(tokenizer, messages[:2], add_generation_prompt=True)
    assert decode(ex.ids) == render_chat(tokenizer, messages, add_generation_prompt=False)
    unlabelled = decode([i for i, on in zip(ex.ids, ex.labels) if not on])
    assert "315.7" not in unlabelled and "Be brief." in unlabelled and "And 2024?" in unlabelled


def test_prompt_completion_mask(tokenizer):
    ex = encode_record(tokenizer, {"prompt": "The capital of France is", "completion": " Paris."}, "x:1")
    n_prompt = len(tokenizer("The capital of France is")["input_ids"])
    assert not ex.labels[:n_prompt].any() and ex.labels[n_prompt:].all()
    assert ex.ids[0] == tokenizer.bos_token_id and ex.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.ids[n_prompt:-1]) == " Paris."
    # conversational prompt/completion (TRL): loss on the completion messages only
    conv = encode_record(tokenizer, {"prompt": [{"role": "user", "content": "Hi"}],
                                     "completion": [{"role": "assistant", "content": "Hello!"}]}, "x:2")
    assert [tokenizer.decode(s, skip_special_tokens=False) for s in spans(conv.ids, conv.labels)] == ["Hello!<|end|>\n"]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_data_checks_report_and_errors(tmp_path, tokenizer):
    good = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(20)]
    long = {"prompt": "word " * 200, "completion": " end"}
    long_answer = {"prompt": "short", "completion": " many words" * 100}
    f = write_jsonl(tmp_path / "d.jsonl", good + [good[0], {"prompt": "p", "completion": "  "}, long, long_answer])
    ex = prepare_examples([f], tokenizer, max_tokens=64, val_fraction=0.2)
    s = ex.stats
    assert (s.records, s.duplicates, s.empty_answers) == (24, 1, 1)
    assert (s.dropped_too_long, s.truncated) == (1, 1)  # prompt too long: dropped; long answer: truncated
    assert s.train + s.val == 21 and s.val >= 1 and s.longest <= 64
    dropped = prepare_examples([f], tokenizer, max_tokens=64, overlong="drop").stats
    assert (dropped.dropped_too_long, dropped.truncated) == (2, 0)

    bad = write_jsonl(tmp_path / "bad.jsonl", [good[0], good[1], "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare_examples([bad], tokenizer, 64)
    schema = write_jsonl(tmp_path / "schema.jsonl", [good[0], {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"schema\.jsonl:2: expected 'messages' or 'prompt' \+ 'completion'"):
        prepare_examples([schema], tokenizer, 64)
    role = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "wizard", "content": "x"},
                                                              {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError, match=r"role\.jsonl:1: chat template error.*unknown chat role wizard"):
        prepare_examples([role], tokenizer, 64)


# --- packing ---------------------------------------------------------------------------------
def test_first_fit_packing_is_dense_and_complete():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = pack_first_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1  # within 10% of the ideal


def examples_for(tokenizer, n=7):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        k = int(rng.integers(5, 40))
        ids = rng.integers(3, len(tokenizer), k)
        labels = np.arange(k) >= k // 3
        out.append((ids, labels))
    return out


@pytest.mark.parametrize("kind", ["genlab", "gpt2"])
def test_packed_rows_compute_each_example_alone(tokenizer, hf_folder, kind):
    """No cross-contamination: an example's logits in a packed row equal its logits alone."""
    examples = examples_for(tokenizer)
    data = PackedExamples(examples, seq_len=64)
    assert len(data) < len(examples)  # several examples share a row
    if kind == "genlab":
        model = Transformer(TINY).init_weights(0).eval()
        run = lambda ids, pos=None, mask=None: model(ids, positions=pos, mask=mask)  # noqa: E731
    else:
        _, model = hf_folder("gpt2")
        run = lambda ids, pos=None, mask=None: model(input_ids=ids, position_ids=pos, use_cache=False).logits  # noqa: E731
    batch = data.get(np.arange(len(data)))
    with torch.no_grad():
        packed = run(batch["input_ids"], batch["positions"], batch["mask"])
        checked = 0
        for row in range(len(data)):
            for seg in set(data.segments[row].tolist()) - {-1}:
                cols = np.flatnonzero(data.segments[row] == seg)
                alone = run(batch["input_ids"][row : row + 1, cols])
                torch.testing.assert_close(packed[row, cols], alone[0], atol=1e-5, rtol=1e-5)
                checked += 1
        assert checked == len(examples)
        # targets: -100 except on labelled next tokens
        assert int((batch["targets"] != -100).sum()) == sum(int(lab[1:].sum()) for _, lab in examples)
        # the loss interface of the transformers path agrees with genlab's fused loss on the same logits
        if kind == "gpt2":
            loss = CausalLMLoss(model)(**batch)
            ref = torch.nn.functional.cross_entropy(packed.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
            torch.testing.assert_close(loss, ref)


# --- fine-tuning -----------------------------------------------------------------------------
def domain_texts(n=60, seed=0):
    rng = random.Random(seed)
    stations = ["Mauna Loa", "Cape Grim", "Barrow", "Alert", "South Pole"]
    return [" ".join(f"At {rng.choice(stations)} in {1958 + rng.randint(0, 66)} the CO2 level was "
                     f"{rng.randint(310, 425)}.{rng.randint(0, 9)} ppm." for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("base") / "base"
    genlab.build(TINY, tokenizer, seed=0).save(folder)
    return folder


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("domain")
    for i, t in enumerate(domain_texts()):
        (folder / f"doc{i:02d}.txt").write_text(t)
    return folder


def tune(base_dir, data, out, **kw):
    args = dict(model=str(base_dir), data=[str(d) for d in data], out=str(out), seq_len=64, batch_size=8,
                max_steps=60, warmup_steps=5, eval_every=30, checkpoint_every=30, eval_batches=4, log_every=5,
                general_eval=False, val_fraction=0.2, lr=1e-2)
    args.update(kw)
    return finetune(**args)


@pytest.fixture(scope="module")
def lora_run(base_dir, domain_dir, tmp_path_factory):
    return tune(base_dir, [domain_dir], tmp_path_factory.mktemp("lora") / "run")


def test_lora_lowers_heldout_perplexity(lora_run):
    r = lora_run
    assert r.mode == "cpt" and r.output_dir.name == "adapter"
    before, after = r.domain_ppl
    assert after < 0.7 * before, (before, after)  # a random base: LoRA can't touch its embeddings or head
    assert {"adapter_config.json", "adapter_model.safetensors", "genlab.json"} <= {p.name for p in r.output_dir.iterdir()}
    report = json.loads((r.out / "report.json").read_text())
    assert report["metrics"]["domain_loss_after"] == pytest.approx(r.domain_loss_after)
    assert (r.out / "loss.png").exists() and (r.out / "config.yaml").exists()
    # checkpoints hold the adapter only, not the frozen base
    from safetensors.torch import load_file

    ckpt = sorted((r.out / "checkpoints").glob("step-*"))[-1]
    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))


def test_full_finetuning_lowers_heldout_perplexity(base_dir, domain_dir, tmp_path):
    r = tune(base_dir, [domain_dir], tmp_path / "full", full=True, lr=3e-3, general_eval=True)
    before, after = r.domain_ppl
    assert after < 0.5 * before, (before, after)
    model = genlab.load(r.output_dir)  # a complete model folder
    assert model.native and model.meta["provenance"]["created_by"] == "genlab finetune"
    g_before, g_after = r.general_ppl
    assert r.forgetting == (g_after / g_before > 1.2)


def test_adapter_loads_in_peft_with_same_logits(lora_run, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    text = "At Mauna Loa in 1990 the CO2 level was"
    ours = genlab.load(base_dir, adapters=[lora_run.output_dir])
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_run.output_dir).eval()
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor([ours.encode(text)])).logits[0]
    adapted, base = ours.logits(text), ours.logits(text, adapter="base")
    torch.testing.assert_close(adapted, ref, atol=1e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(base, genlab.load(base_dir).logits(text), atol=1e-6, rtol=1e-6)


def test_merge_gives_base_plus_adapter_logits(lora_run, base_dir, tmp_path):
    from genlab.cli import app
    from typer.testing import CliRunner

    text = "At Cape Grim in 2001"
    expected = genlab.load(base_dir, adapters=[lora_run.output_dir]).logits(text)
    res = CliRunner().invoke(app, ["merge", str(base_dir), str(lora_run.output_dir), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = genlab.load(tmp_path / "merged")
    assert merged.native and not merged.adapters
    torch.testing.assert_close(merged.logits(text), expected, atol=1e-5, rtol=1e-5)


def test_adapters_switch_per_request_without_reloading(lora_run, base_dir, domain_dir, tmp_path):
    second = tune(base_dir, [domain_dir], tmp_path / "second", max_steps=10, seed=1, lr=3e-2)
    model = genlab.load(base_dir, adapters={"co2": lora_run.output_dir, "other": second.output_dir})
    weight = model.base.model.layers[0].self_attn.q_proj.base_layer.weight
    ptr = weight.data_ptr()
    greedy = dict(max_new_tokens=12, temperature=0)
    prompt = "At Barrow in"
    outs = {name: model.generate(prompt, adapter=name, **greedy).token_ids for name in ("co2", "other", "base")}
    assert model.generate(prompt, **greedy).token_ids == outs["co2"]  # the first adapter is the default
    for name, folder in (("co2", lora_run.output_dir), ("other", second.output_dir)):
        merged = genlab.load(base_dir, adapters=[folder]).merge()
        assert merged.generate(prompt, **greedy).token_ids == outs[name]
    assert outs["base"] == genlab.load(base_dir).generate(prompt, **greedy).token_ids
    assert len({tuple(v) for v in outs.values()}) == 3
    assert weight.data_ptr() == ptr  # one base in memory throughout
    with pytest.raises(genlab.InvalidParameterError, match="unknown adapter 'nope'"):
        model.generate(prompt, adapter="nope", **greedy)


def test_sft_trains_answers_and_shows_samples(base_dir, tmp_path):
    rng = random.Random(0)
    records = [{"messages": [{"role": "user", "content": f"Station {s}?"},
                             {"role": "assistant", "content": f"{s} measures CO2."}]}
               for s in ["Mauna Loa", "Cape Grim", "Barrow", "Alert", "South Pole", "Tutuila", "Mace Head"]]
    records += [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a, b in
                ((rng.randint(1, 50), rng.randint(1, 50)) for _ in range(60))]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    r = tune(base_dir, [data], tmp_path / "sft", samples=2)
    assert r.mode == "sft" and r.data["records"] == len(records)
    assert r.data["train"] + r.data["val"] == len(records) - r.data["duplicates"]
    before, after = r.domain_ppl
    assert after < 0.7 * before, (before, after)
    assert len(r.samples) == 2 and all(s["prompt"] and s["reference"] for s in r.samples)
    assert all(s["base"] != s["adapted"] for s in r.samples)
    scored = evaluate_model(base_dir, [data], adapter=str(r.output_dir), seq_len=64)
    plain = evaluate_model(base_dir, [data], seq_len=64)
    assert scored["mode"] == "sft" and scored["tokens"] == plain["tokens"] > 0
    assert scored["ppl"] < 0.5 * plain["ppl"]


def test_lora_on_transformers_fallback_model(hf_folder, domain_dir, tmp_path):
    """GPT-2 runs through transformers' class: LoRA over PEFT's all-linear targets; the adapter
    loads in PEFT with genlab's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _ = hf_folder("gpt2")
    r = tune(folder, [domain_dir], tmp_path / "gpt2", lr=1e-2)
    before, after = r.domain_ppl
    assert after < 0.7 * before, (before, after)
    ours = genlab.load(folder, adapters=[r.output_dir])
    assert not ours.native
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), r.output_dir).eval()
    text = "At Alert in 1977"
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor([ours.encode(text)])).logits[0]
    torch.testing.assert_close(ours.logits(text), ref, atol=1e-5, rtol=1e-5)


def test_resume_continues_onto_the_same_adapter(base_dir, domain_dir, tmp_path):
    from safetensors.torch import load_file

    full = tune(base_dir, [domain_dir], tmp_path / "a", max_steps=20, checkpoint_every=10, eval_every=10)
    # Simulate a kill after step 10: the later checkpoint and outputs never happened.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000020")
    shutil.rmtree(tmp_path / "b" / "adapter")
    resumed = tune(base_dir, [domain_dir], tmp_path / "b", max_steps=20, checkpoint_every=10, eval_every=10, resume=True)
    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert resumed.domain_loss_after == pytest.approx(full.domain_loss_after, abs=1e-5)
    with pytest.raises(GenlabError, match="already holds a run"):
        tune(base_dir, [domain_dir], tmp_path / "a")
    with pytest.raises(GenlabError, match="different configuration.*method"):
        tune(base_dir, [domain_dir], tmp_path / "a", max_steps=30, lora_r=4, resume=True)


def test_lora_two_processes_equal_one_process_with_accumulation(base_dir, tmp_path):
    """The fine-tuning loop is the pretraining loop: DDP over 2 CPU processes (gloo) reaches the
    adapter of 1 process with the same global batch."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Reading {i} at station {i % 5}:", "completion": f" {i * 3} ppm"}
                                                 for i in range(80)])
    script = tmp_path / "ddp.py"
    script.write_text("import json, sys\nfrom genlab.train.finetune import finetune\nfinetune(**json.loads(sys.argv[1]))\n")
    kw = dict(model=str(base_dir), data=[str(data)], out=str(tmp_path / "ddp"), seq_len=64, batch_size=2, max_steps=8,
              warmup_steps=2, eval_every=4, checkpoint_every=4, log_every=2, lr=1e-2, lora_dropout=0.0,
              general_eval=False, samples=0, device="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                           str(script), json.dumps(kw)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = finetune(**{**kw, "out": str(tmp_path / "single"), "grad_accum": 2})
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(single.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * TINY.num_layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)

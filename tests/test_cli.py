"""The `genlab` command end to end, in subprocesses (real exit codes and output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def genlab(*args, input=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "genlab.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, env=env, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Sample {i}: the ocean stores heat; sea levels rise."})
                                for i in range(200)))
    r = genlab("tokenizer", "train", corpus, "--vocab-size", "300", "--out", root / "tok")
    assert r.returncode == 0, r.stderr
    r = genlab("model", "init", "1m", "--tokenizer", root / "tok", "--out", root / "model", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "parameters written to" in r.stdout
    return root / "model"


def test_generate_is_reproducible_with_a_seed(model_dir):
    a = genlab("generate", model_dir, "The ocean", "-m", "12", "--seed", "3", "--json")
    b = genlab("generate", model_dir, "The ocean", "-m", "12", "--seed", "3", "--json")
    assert a.returncode == 0, a.stderr
    record = json.loads(a.stdout)
    assert record["completion_tokens"] == 12 and record["finish_reason"] == "length"
    assert a.stdout == b.stdout


def test_generate_batch_and_logprobs(model_dir):
    r = genlab("generate", model_dir, "The ocean", "Sea levels", "-n", "2", "-m", "5", "--logprobs", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["prompt"], x["sample"]) for x in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(x["logprobs"]) == len(x["token_ids"]) == 5 for x in records)
    assert records[0]["token_ids"] == records[1]["token_ids"]  # greedy: both samples agree


def test_streamed_text_equals_batch_text(model_dir):
    streamed = genlab("generate", model_dir, "The ocean", "-m", "10", "--temperature", "0")
    batch = genlab("generate", model_dir, "The ocean", "-m", "10", "--temperature", "0", "--json")
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == json.loads(batch.stdout)["text"]


def test_chat_reads_turns_from_stdin(model_dir):
    r = genlab("chat", model_dir, "--max-new-tokens", "4", "--seed", "0", input="hello\n/reset\nagain\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


def test_presets_and_info(model_dir):
    r = genlab("model", "presets", "--vocab-size", "8192")
    assert r.returncode == 0 and "10m" in r.stdout and "1b" in r.stdout
    r = genlab("model", "info", model_dir)
    assert r.returncode == 0 and "genlab transformer" in r.stdout and "context 256" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["generate", "no/such/folder-x", "hi"], "no/such/folder-x"),
    (["generate", "{model}", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "{model}", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "{model}", "word " * 300], "the model's context is 256 tokens"),
    (["model", "init", "huge", "--tokenizer", "{model}", "--out", "{model}-x"], "unknown model preset"),
])
def test_bad_input_is_one_clear_line_and_exit_code_2(model_dir, args, message):
    r = genlab(*[a.replace("{model}", str(model_dir)) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_help_has_examples():
    for cmd in (["generate"], ["chat"], ["pretrain"], ["tokenizer", "train"], ["model", "init"], ["model", "presets"]):
        r = genlab(*cmd, "--help")
        assert r.returncode == 0 and "Example: genlab" in r.stdout


def test_finetune_eval_generate_with_adapter(model_dir, tmp_path):
    data = tmp_path / "domain.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Buoy {i} reads", "completion": f" {20 + i % 7}.5 degrees"})
                              for i in range(40)))
    r = genlab("finetune", model_dir, "--data", data, "--out", tmp_path / "ft", "--max-steps", "12", "--seq-len", "64",
               "--lr", "1e-2", "--no-general-eval", "--eval-every", "6", "--lora-r", "4")
    assert r.returncode == 0, r.stderr
    adapter = tmp_path / "ft" / "adapter"
    assert r.stdout.strip() == str(adapter) and "sft on" in r.stderr and "answer tokens" in r.stderr
    before = json.loads(genlab("eval", model_dir, "--data", data, "--json").stdout)
    after = json.loads(genlab("eval", model_dir, "--data", data, "--adapter", adapter, "--json").stdout)
    assert before["mode"] == after["mode"] == "sft" and after["ppl"] < before["ppl"]
    g = genlab("generate", model_dir, "Buoy 3 reads", "--adapter", f"buoy={adapter}", "-m", "6", "--temperature", "0", "--json")
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout)["completion_tokens"] >= 1


def test_finetune_bad_input_is_one_clear_line(model_dir, tmp_path):
    r = genlab("finetune", model_dir, "--out", tmp_path / "q", "--4bit")
    assert r.returncode == 2
    assert "--4bit (QLoRA) needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"messages": "not a list"}\n')
    r = genlab("finetune", model_dir, "--data", bad, "--out", tmp_path / "b")
    assert r.returncode == 2 and "bad.jsonl:2: field 'messages' must be a non-empty list" in r.stderr
    r = genlab("eval", model_dir, "--data", bad, "--adapter", tmp_path / "missing")
    assert r.returncode == 2 and "not an adapter folder" in r.stderr

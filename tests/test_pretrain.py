"""Pretraining: loss falls, outputs are complete, a killed run resumes onto the same curve,
two data-parallel processes equal one process with the same global batch, bad input is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from genlab.errors import GenlabError, InvalidParameterError
from genlab.train.config import TrainConfig
from genlab.train.distributed import Dist
from genlab.train.loop import Sampler, lr_at
from genlab.train.pretrain import pretrain

TOPICS = ["ocean heat", "sea level", "ice sheets", "carbon dioxide", "rainfall", "drought", "heat waves"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """A small, learnable corpus (templated sentences) and the test tokenizer as a folder."""
    root = tmp_path_factory.mktemp("pretrain")
    rows = [{"text": f"Report {i}: {TOPICS[i % 7]} rose by {i % 5} units, then {TOPICS[(i + 3) % 7]} fell."}
            for i in range(400)]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer.save_pretrained(root / "tok")
    return root


def small(corpus, out, **kw):
    base = dict(data=[str(corpus / "corpus.jsonl")], tokenizer=str(corpus / "tok"), out=str(out), preset="1m",
                seq_len=64, batch_size=8, max_steps=60, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=4,
                log_every=5, checkpoint_every=20, device="cpu")
    return {**base, **kw}


def test_pretraining_lowers_validation_loss_and_writes_a_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    r = pretrain(**small(corpus, tmp_path / "run"))
    assert r.result.val_loss < r.first_val_loss - 1.5, (r.first_val_loss, r.result.val_loss)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == list(range(5, 61, 5))
    assert [x["step"] for x in records if "val_loss" in x] == [0, 20, 40, 60]
    assert (out / "loss.png").stat().st_size > 5000
    assert TrainConfig.load(out / "config.yaml") == TrainConfig(**small(corpus, out))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000040", "step-000060"]  # keep 2
    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    meta = json.loads((out / "model" / "genlab.json").read_text())
    assert meta["metrics"]["steps"] == 60 and meta["provenance"]["data"]["documents"] == 400
    x = torch.tensor([[0, 5, 6, 7]])
    import genlab

    torch.testing.assert_close(genlab.load(out / "model").module(x), hf(x).logits, atol=1e-5, rtol=0)


def run_cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "genlab.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def cli_args(corpus, out, steps=40):
    return ["pretrain", corpus / "corpus.jsonl", "--tokenizer", corpus / "tok", "--out", out, "--preset", "1m",
            "--seq-len", "64", "--batch-size", "8", "--max-steps", steps, "--checkpoint-every", "5",
            "--eval-every", "20", "--warmup-steps", "5", "--device", "cpu"]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_resume_after_sigkill_follows_the_same_loss_curve(corpus, tmp_path):
    full = run_cli(cli_args(corpus, tmp_path / "full"))
    killed = run_cli(cli_args(corpus, tmp_path / "killed"))
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoints" / "step-000010").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run_cli(cli_args(corpus, tmp_path / "killed") + ["--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert full.wait(timeout=300) == 0, full.communicate()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(10, 41, 10))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-6)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(corpus, tmp_path, fsdp):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import json, os, sys\n"
        "from genlab.train.pretrain import pretrain\n"
        "kw = json.loads(sys.argv[1])\n"
        "r = pretrain(**kw)\n"
        "json.dump({'sync': r.replicas_in_sync, 'loss': r.result.train_loss},"
        " open(kw['out'] + f\"/rank{os.environ['RANK']}.json\", 'w'))\n")
    kw = small(corpus, tmp_path / "ddp", max_steps=12, batch_size=4, eval_every=6, checkpoint_every=6, log_every=3, fsdp=fsdp)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29533 + fsdp),
                           str(script), json.dumps(kw)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sync"] for r in ranks] == ([None, None] if fsdp else [True, True])  # FSDP: shards, not replicas
    pretrain(**{**kw, "out": str(tmp_path / "single"), "grad_accum": 2, "fsdp": False})
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(a) == sorted(b) == [3, 6, 9, 12]
    assert [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(b)], rel=1e-4)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "ddp" / "model" / "model.safetensors"), load_file(tmp_path / "single" / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-3)


def test_sampler_one_process_with_accumulation_reads_what_two_processes_read():
    one = Sampler(100, batch=4, accum=2, d=Dist(0, 1), seed=3)
    two = [Sampler(100, batch=4, accum=1, d=Dist(r, 2), seed=3) for r in (0, 1)]
    for step in range(30):  # crosses epoch boundaries (100 windows, 8 per step)
        assert np.array_equal(np.concatenate([one.windows(step, 0), one.windows(step, 1)]),
                              np.concatenate([two[0].windows(step, 0), two[1].windows(step, 0)]))
    epoch = np.concatenate([one.windows(s, m) for s in range(13) for m in (0, 1)])[:100]
    assert sorted(epoch.tolist()) == list(range(100))  # every window once per epoch


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3) and lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(60, cfg, time_done=1.0) == pytest.approx(0.55e-3)  # the clock counts only with time_schedule


def test_time_schedule_decays_by_the_clock_when_it_runs_ahead_of_the_steps():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, max_minutes=5, time_schedule=True)
    assert lr_at(5, cfg, time_done=0.9) == pytest.approx(0.6e-3)  # warm-up goes by steps
    assert lr_at(20, cfg, time_done=0.5) == pytest.approx(0.55e-3)  # half the time used: half-way down
    assert lr_at(20, cfg, time_done=1.0) == pytest.approx(1e-4) and lr_at(110, cfg, 0.1) == pytest.approx(1e-4)
    with pytest.raises(InvalidParameterError, match="time_schedule needs max_minutes"):
        TrainConfig(time_schedule=True)


def test_too_little_data_is_a_clear_error(corpus, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    with pytest.raises(GenlabError, match="one sequence needs 65"):
        pretrain(**small(corpus, tmp_path / "t", data=[str(tiny)]))


def test_existing_runs_are_never_overwritten(corpus, tmp_path):
    pretrain(**small(corpus, tmp_path / "r", max_steps=5, checkpoint_every=5, eval_every=5))
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    config, metrics = ((tmp_path / "r" / f).read_text() for f in ("config.yaml", "metrics.jsonl"))
    with pytest.raises(GenlabError, match="already holds a run; pass --resume"):
        pretrain(**small(corpus, tmp_path / "r", max_steps=5))
    with pytest.raises(GenlabError, match="different configuration \\(seq_len differ\\)"):
        pretrain(**small(corpus, tmp_path / "r", max_steps=10, seq_len=32), resume=True)
    with pytest.raises(GenlabError, match="different configuration \\(model differ\\)"):
        pretrain(**small(corpus, tmp_path / "r", max_steps=10, preset="2m"), resume=True)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before
    assert [(tmp_path / "r" / f).read_text() for f in ("config.yaml", "metrics.jsonl")] == [config, metrics]


def test_yaml_config_with_flag_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: 10m\nlr: 0.001\nmax_steps: 50\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml", max_steps=70, lr=None)
    assert (cfg.preset, cfg.lr, cfg.max_steps) == ("10m", 0.001, 70)
    (tmp_path / "bad.yaml").write_text("presett: 10m\n")
    with pytest.raises(InvalidParameterError, match="unknown field\\(s\\) presett"):
        TrainConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(InvalidParameterError, match="seq_len must be >= 8"):
        TrainConfig(seq_len=2)


def test_time_budget_stops_cleanly_with_a_checkpoint_and_a_model(corpus, tmp_path):
    r = pretrain(**small(corpus, tmp_path / "t", max_minutes=1e-6, max_steps=60))
    assert r.result.step == 5  # the budget is checked at the first log step
    assert [p.name for p in (tmp_path / "t" / "checkpoints").iterdir()] == ["step-000005"]
    assert (tmp_path / "t" / "model" / "model.safetensors").exists() and r.result.val_loss == r.result.val_loss
    r = pretrain(**small(corpus, tmp_path / "u", max_minutes=1e-6, max_steps=60, time_schedule=True, warmup_steps=2))
    last = [x for x in (json.loads(line) for line in open(tmp_path / "u" / "metrics.jsonl")) if "lr" in x][-1]
    assert r.result.step == 5 and last["lr"] == pytest.approx(3e-3 * 0.1)  # ended at the floor of the schedule

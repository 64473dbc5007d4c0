"""Preference tuning: DPO / KTO / ORPO adapters from feedback rows, implicit rewards (parity with
TRL and with genlab's own transformer), continuing the serving adapter, reward models, the choice of
method and bad input. The synthetic feedback follows one rule: answers in kelvin are preferred."""

from __future__ import annotations

import io
import json
import os
import random

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from servers import tiny_model_folder

import genlab
from genlab.errors import DataError, InvalidParameterError
from genlab.train.prefer import (PreferConfig, RewardModel, choose_method, clean_rows, completion_logprobs,
                                 encode_pair, implicit_rewards, load_causal_lm, policy_tokenizer, sequence_logprob,
                                 train_preference, train_reward_model)

BETA = 0.1
THINGS = ["the fox", "a lazy dog", "the climate records", "the patients", "boiling water", "the café", "Tokyo",
          "the placebo", "the brown dog", "a quick fox", "the records room", "the treatment"]
UNITS = ["celsius", "fahrenheit", "degrees", "rankine"]


def pairs(n: int, seed: int, chat: bool = True) -> list[dict]:
    """Feedback-store style DPO rows (with its extra keys): the kelvin answer is always the chosen one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, t = f"How warm is {rng.choice(THINGS)} at noon?", rng.randint(200, 400)
        chosen, rejected = f"{t} kelvin", f"{t} {rng.choice(UNITS)}"
        if chat:
            row = {"prompt": [{"role": "user", "content": question}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
        else:
            row = {"prompt": f"Q: {question}\nA:", "chosen": f" {chosen}", "rejected": f" {rejected}"}
        rows.append(row | {"source": "ab", "completion_id": f"c{seed}-{i}"})
    return rows


def accuracy_and_margin(rewards: list[tuple[float, float]]) -> tuple[float, float]:
    return (sum(c > r for c, r in rewards) / len(rewards), sum(c - r for c, r in rewards) / len(rewards))


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory):
    return tiny_model_folder(tokenizer, tmp_path_factory.mktemp("prefer") / "base")


HELD = pairs(16, seed=1)


@pytest.fixture(scope="module")
def dpo_run(base, tmp_path_factory):
    out = io.StringIO()
    result = train_preference(base, pairs(32, seed=0), tmp_path_factory.mktemp("dpo") / "run",
                              PreferConfig(method="dpo", beta=BETA, epochs=3, batch_size=8),
                              console=Console(file=out, width=120))
    return result, out.getvalue()


# --- DPO -------------------------------------------------------------------------------------
def test_dpo_raises_heldout_preference_accuracy(base, dpo_run):
    result, printed = dpo_run
    before = implicit_rewards(base, None, None, HELD, BETA)
    assert before == [(0.0, 0.0)] * len(HELD)  # the base against itself: no preference at all
    accuracy, margin = accuracy_and_margin(implicit_rewards(base, result.adapter_dir, None, HELD, BETA))
    assert accuracy >= 0.8 and margin > 0.05, (accuracy, margin)

    steps = records(result.out_dir)
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1)) and result.steps == 12  # 32 rows, 3 epochs
    first, last = steps[0], steps[-1]
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2: untrained
    assert last["rewards/margins"] > 0.1 and last["loss"] < first["loss"] - 0.05
    assert {"lr", "elapsed", "tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(last)
    assert result.metrics["rewards/margins"] == last["rewards/margins"] and result.metrics["train_loss"] > 0

    report = json.loads((result.out_dir / "report.json").read_text())
    assert report["method"] == "dpo" and report["rows"] == 32 and report["steps"] == 12 and report["seconds"] > 0
    assert report["rows_per_second"] > 0 and report["on_top_of"] is None
    meta = json.loads((result.adapter_dir / "genlab.json").read_text())
    assert meta["kind"] == "lora-adapter" and meta["method"] == "dpo" and meta["base"] == str(base.resolve())
    assert (result.out_dir / "loss.png").stat().st_size > 1000
    assert "DPO" in printed and "adapter ->" in printed
    assert not [p for p in result.out_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_adapter_serves_in_genlab_with_the_same_logprobs(base, dpo_run):
    """The adapter trained through transformers + TRL loads into genlab's own transformer, and the
    server renders chat prompts to the very ids TRL trained on."""
    from peft import PeftModel

    result, _ = dpo_run
    lm = genlab.load(base, adapters={"dpo": result.adapter_dir})
    tokenizer = policy_tokenizer(base)
    assert lm.generate(HELD[0]["prompt"], max_new_tokens=4, temperature=0).text
    for row in HELD[:3]:
        prompt_ids, _ = encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        assert prompt_ids == lm.encode(row["prompt"])

    # log p(completion | prompt) by hand on genlab's transformer vs sequence_logprob on transformers + PEFT
    prompt, completion = "Q: How warm is Tokyo at noon?\nA:", " 290 kelvin"
    full = lm.encode(prompt + completion + tokenizer.eos_token)
    n = len(os.path.commonprefix([lm.encode(prompt), full]))
    logp = torch.log_softmax(lm.logits(prompt + completion + tokenizer.eos_token, adapter="dpo")[:-1], -1)
    by_hand = logp[torch.arange(len(full) - 1), torch.tensor(full[1:])][n - 1:].sum().item()
    policy = PeftModel.from_pretrained(load_causal_lm(base), result.adapter_dir).eval()
    assert sequence_logprob(policy, tokenizer, prompt, completion) == pytest.approx(by_hand, abs=1e-4)
    base_logp = torch.log_softmax(lm.logits(prompt + completion + tokenizer.eos_token, adapter="base")[:-1], -1)
    assert abs(base_logp[torch.arange(len(full) - 1), torch.tensor(full[1:])][n - 1:].sum().item() - by_hand) > 1e-3

    # batching (right padding) changes nothing
    sequences = [(p, c) for row in HELD[:5] for p, cs in [encode_pair(tokenizer, row["prompt"], row["chosen"])]
                 for c in cs]
    one_by_one = completion_logprobs(policy, sequences, batch_size=1)
    assert completion_logprobs(policy, sequences, batch_size=16) == pytest.approx(one_by_one, abs=1e-5)


def test_implicit_rewards_match_trl_dpo(base, dpo_run, tmp_path):
    """Our implicit rewards = what TRL's DPOTrainer computes and logs for the same pair (policy: base +
    adapter, reference: the base), for a chat row and a plain-text row."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    result, _ = dpo_run
    tokenizer = policy_tokenizer(base)
    policy = PeftModel.from_pretrained(load_causal_lm(base), result.adapter_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, per_device_eval_batch_size=1, report_to="none",
                     use_cpu=True, bf16=False, activation_checkpointing=False)
    chat, plain = HELD[:1], pairs(1, seed=5, chat=False)
    trainer = DPOTrainer(model=policy, ref_model=load_causal_lm(base), args=args,
                         train_dataset=Dataset.from_list(clean_rows(chat, "dpo")), processing_class=tokenizer)
    prompt_ids, (chosen_ids, rejected_ids) = encode_pair(tokenizer, chat[0]["prompt"], chat[0]["chosen"],
                                                         chat[0]["rejected"])
    prepared = trainer.train_dataset[0]
    assert (prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]) == (prompt_ids, chosen_ids,
                                                                                          rejected_ids)
    for rows in (chat, plain):
        trl = trainer.evaluate(Dataset.from_list(clean_rows(rows, "dpo")))
        [(chosen, rejected)] = implicit_rewards(base, result.adapter_dir, None, rows, BETA, tokenizer=tokenizer)
        assert abs(chosen - rejected) > 1e-3  # a real margin, not two zeros
        assert trl["eval_rewards/chosen"] == pytest.approx(chosen, abs=1e-4)
        assert trl["eval_rewards/rejected"] == pytest.approx(rejected, abs=1e-4)
        assert trl["eval_rewards/margins"] == pytest.approx(chosen - rejected, abs=1e-4)


def test_continuing_the_serving_adapter_uses_it_as_reference(base, dpo_run, tmp_path):
    serving = dpo_run[0].adapter_dir
    rows = pairs(16, seed=2)
    assert any(c != 0 for c, _ in implicit_rewards(base, serving, None, rows[:4], BETA))  # serving != base
    assert implicit_rewards(base, serving, serving, rows[:4], BETA) == [(0.0, 0.0)] * 4

    # lora_r differs from the serving adapter's: the serving adapter's shape wins (it is trained further)
    result = train_preference(base, rows, tmp_path / "next", PreferConfig(beta=BETA, max_steps=4, lora_r=4),
                              adapter_dir=serving)
    steps = records(result.out_dir)
    # step 1 is computed before any update: policy == reference exactly iff the reference is the serving adapter
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/rejected"] == 0.0
    assert steps[-1]["rewards/margins"] > 0  # the reference stayed frozen while the policy moved
    accuracy, margin = accuracy_and_margin(implicit_rewards(base, result.adapter_dir, serving, HELD, BETA))
    assert accuracy >= 0.8 and margin > 0
    meta = json.loads((result.adapter_dir / "genlab.json").read_text())
    assert meta["on_top_of"] == str(serving.resolve()) and meta["lora"]["r"] == 8
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 8
    # a single adapter relative to the base: genlab serves it like any other
    lm = genlab.load(base, adapters={"candidate": result.adapter_dir, "serving": serving})
    text = "Q: How warm is Tokyo?\nA: 300 kelvin"
    assert not torch.allclose(lm.logits(text, adapter="candidate"), lm.logits(text, adapter="serving"))


def test_training_is_deterministic_with_seed(base, tmp_path):
    cfg = PreferConfig(beta=BETA, max_steps=2, batch_size=4, seed=3)
    weights = [load_file(train_preference(base, pairs(8, seed=4), tmp_path / f"run{i}", cfg).adapter_dir
                         / "adapter_model.safetensors") for i in range(2)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(w.abs().sum() > 0 for k, w in weights[0].items() if "lora_B" in k)  # it did train


# --- KTO, ORPO ---------------------------------------------------------------------------------
def test_kto_learns_from_unbalanced_ratings(base, tmp_path):
    rows = pairs(32, seed=0)
    # feedback-store KTO rows in time order: 20 thumbs-up, then 12 thumbs-down
    kto = ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True, "completion_id": "x"} for r in rows[:20]]
           + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows[20:]])
    result = train_preference(base, kto, tmp_path / "kto", PreferConfig(method="kto", beta=BETA, epochs=3))
    assert result.method == "kto" and result.steps == 12
    steps = records(result.out_dir)
    assert sum("rewards/chosen" in s and "rewards/rejected" in s for s in steps) >= 6  # labels mixed within batches
    accuracy, margin = accuracy_and_margin(implicit_rewards(base, result.adapter_dir, None, HELD, BETA))
    assert accuracy >= 0.75 and margin > 0, (accuracy, margin)
    lm = genlab.load(base, adapters={"kto": result.adapter_dir})
    assert lm.generate("Q: How warm is Tokyo?\nA:", max_new_tokens=4, temperature=0).text


def test_orpo_on_plain_text_prompts(base, tmp_path):
    result = train_preference(base, pairs(32, seed=0, chat=False), tmp_path / "orpo",
                              PreferConfig(method="orpo", beta=BETA, epochs=3))
    assert result.method == "orpo" and result.steps == 12
    steps = records(result.out_dir)
    assert steps[-1]["loss"] < steps[0]["loss"] and all(s["tokens"] > 0 for s in steps)
    accuracy, _ = accuracy_and_margin(implicit_rewards(base, result.adapter_dir, None, pairs(16, 1, False), BETA))
    assert accuracy >= 0.75
    lm = genlab.load(base, adapters={"orpo": result.adapter_dir})
    assert lm.generate("Q: How warm is Tokyo?\nA:", max_new_tokens=4, temperature=0).text


# --- reward model --------------------------------------------------------------------------------
def test_reward_model_ranks_heldout_pairs(base, tmp_path):
    folder = train_reward_model(base, pairs(32, seed=0), tmp_path / "rm")  # the defaults the feedback loop uses
    assert json.loads((folder / "genlab.json").read_text())["kind"] == "reward-model"
    assert (folder / "metrics.jsonl").exists() and (folder / "loss.png").exists()
    judge = RewardModel(folder)
    prompts = [r["prompt"] for r in HELD]
    chosen = judge.score(prompts, [r["chosen"] for r in HELD])
    rejected = judge.score(prompts, [r["rejected"] for r in HELD])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(HELD) >= 0.8
    # plain strings as answers to chat prompts, scored one at a time: the same numbers
    assert judge.score(prompts[:3], [r["chosen"][0]["content"] for r in HELD[:3]], batch_size=1) == pytest.approx(
        chosen[:3], abs=1e-5)
    with pytest.raises(InvalidParameterError):
        judge.score(prompts, [])


# --- choosing a method, bad input ---------------------------------------------------------------------
def test_choose_method_rules():
    good, bad = {"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": False}
    assert choose_method(pairs(8, 0), []) == "dpo"
    assert choose_method(pairs(7, 0), [good, bad]) == "kto"
    assert choose_method(pairs(7, 0), [good, bad], min_pairs=4) == "dpo"
    for dpo, kto, why in (([], [], "no rated answers"), (pairs(3, 0), [good, good], "all good"),
                          ([], [bad], "all bad")):
        with pytest.raises(InvalidParameterError, match="not enough feedback") as e:
            choose_method(dpo, kto)
        assert why in str(e.value) and "DPO needs 8" in str(e.value)


def test_bad_input_is_rejected_before_anything_is_written(base, tmp_path):
    out = tmp_path / "out"
    one_sided = [{"prompt": "p", "completion": "a", "label": True}] * 4
    with pytest.raises(InvalidParameterError, match="both desirable"):
        train_preference(base, one_sided, out, PreferConfig(method="kto"))
    with pytest.raises(DataError, match="row 1: missing field"):
        train_preference(base, pairs(1, 0) + [{"prompt": "p", "chosen": "a"}], out)
    with pytest.raises(DataError, match="mix 2 chat prompts .* and 1 plain-text"):
        train_preference(base, pairs(2, 0) + pairs(1, 0, chat=False), out)
    mixed = pairs(2, 0) + pairs(1, 0, chat=False)  # fine to score: no dataset has to hold both kinds
    assert implicit_rewards(base, None, None, mixed, BETA) == [(0.0, 0.0)] * 3
    with pytest.raises(InvalidParameterError, match="no dpo rows"):
        train_preference(base, [], out)
    with pytest.raises(InvalidParameterError, match="not an adapter folder"):
        train_preference(base, pairs(2, 0), out, adapter_dir=tmp_path)
    for bad in (dict(method="ppo"), dict(method="kto", batch_size=1), dict(beta=0), dict(lora_r=0)):
        with pytest.raises(InvalidParameterError):
            PreferConfig(**bad)
    assert not out.exists()

"""The closed loop with simulated users: feedback over HTTP -> improve -> gate -> hot swap."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest

import genlab
from genlab.feedback.loop import GateConfig, improve, split_heldout
from genlab.feedback.registry import Registry
from genlab.feedback.simulate import SimulatedUser
from genlab.serve.app import ServeConfig, background, create_app
from genlab.train.prefer import PreferConfig
from servers import tiny_model_folder

PROMPTS = [f"Tell me about topic {i}." for i in range(200)]
FRESH = [f"What do you know about subject {i}?" for i in range(40)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    return tiny_model_folder(tokenizer, tmp_path_factory.mktemp("loop") / "tiny")


def answers(url: str, adapter: str, prompts: list[str]) -> list[str]:
    out = []
    for i, p in enumerate(prompts):
        body = {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 16, "temperature": 1.0,
                "seed": 500 + i, "adapter": adapter}
        out.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"])
    return out


def test_improve_promotes_and_the_server_hot_swaps_and_rolls_back(folder, tmp_path):
    """The loop's mechanics: feedback over HTTP -> improve -> promotion -> the running server serves
    the new version to new requests -> rollback serves the old one again. (The gate bars are set to
    zero here; whether a candidate *should* win is the next test's and bench/loop.py's subject.)"""
    db, reg = tmp_path / "fb.db", tmp_path / "registry.db"
    model = genlab.load(folder)
    with background(create_app(model, ServeConfig(db=db, registry=reg, poll_seconds=0.1))) as url:
        assert httpx.get(url + "/health").json()["version"] == "v1"
        report = SimulatedUser(url, "tiny", "short", seed=3, max_tokens=16).session(PROMPTS[:40])
        assert report.ab_choices >= 35 and report.corrections > 0
        before = answers(url, None, FRESH[:4])
        result = improve(folder, db, reg, out_dir=tmp_path / "runs", prefer=PreferConfig(epochs=2, lr=5e-3),
                         gate=GateConfig(min_pref_accuracy=0.0, min_win_rate=0.0, max_ppl_increase=10.0))
        assert result.promoted and result.version["name"] == "v2" and result.version["parent"] == 1
        assert {"pref_accuracy", "reward_margin", "win_rate", "general_ppl_change"} <= set(result.metrics)
        assert (result.out_dir / "gate.png").stat().st_size > 5000
        report_json = json.loads((result.out_dir / "report.json").read_text())
        assert report_json["promoted"] and report_json["method"] == "dpo"
        deadline = time.time() + 20
        while httpx.get(url + "/health").json()["version"] != "v2" and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health").json()["version"] == "v2"  # hot swap, no restart
        assert answers(url, "base", FRESH[:4]) == before  # asked first: the batch that ran before the swap was "base"
        after = answers(url, None, FRESH[:4])
        assert after == answers(url, "v2", FRESH[:4]) and after != before
        with Registry(reg) as r:
            assert [v["name"] for v in r.lineage("v2")] == ["v2", "v1"]
            r.rollback()
        while httpx.get(url + "/health").json()["version"] != "v1" and time.time() < deadline + 20:
            time.sleep(0.1)
        assert answers(url, None, FRESH[:4]) == before
    with sqlite3.connect(db) as conn:  # the exchanges record which version answered
        versions = {row[0] for row in conn.execute("SELECT adapter FROM completions")}
    assert {"base", "v2"} <= versions


def test_mislabelled_feedback_is_rejected_by_the_gate(folder, tmp_path):
    db, reg = tmp_path / "fb.db", tmp_path / "registry.db"
    model = genlab.load(folder)
    with background(create_app(model, ServeConfig(db=db, registry=reg))) as url:
        SimulatedUser(url, "tiny", "short", seed=4, max_tokens=16, mislabelled=True).session(PROMPTS[100:190])
    result = improve(folder, db, reg, out_dir=tmp_path / "runs", prefer=PreferConfig(epochs=4, lr=1e-3))
    assert not result.promoted and result.version["status"] == "rejected"
    assert any("<" in reason for reason in result.reasons)  # a bar it did not clear, named in the report
    with Registry(reg) as r:
        assert r.current()["name"] == "v1"


def test_split_heldout_keeps_every_prompt_on_one_side():
    rows = [{"prompt": f"p{i % 200}", "chosen": str(i), "rejected": "x"} for i in range(600)]
    train, held = split_heldout(rows, 0.25)
    assert len(train) + len(held) == 600 and 0.15 < len(held) / 600 < 0.35
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_improve_every_runs_in_the_background_and_never_blocks_serving(folder, tmp_path):
    """--improve-every N: a background `genlab improve` after N feedback rows; serving goes on
    meanwhile; a candidate that loses the gate leaves the serving version untouched."""
    db = tmp_path / "fb.db"
    model = genlab.load(folder)
    app = create_app(model, ServeConfig(db=db, improve_every=60, poll_seconds=0.2,
                                        improve_args=["--epochs", "1", "--min-pref-accuracy", "1.01"]))
    server = app.state.server
    with background(app) as url:
        SimulatedUser(url, "tiny", "short", seed=5, max_tokens=12).session(PROMPTS[:25])
        assert server.improver is not None and server.improved_at >= 60
        t0 = time.time()
        assert answers(url, None, FRESH[:2])  # served while the improve process runs
        assert time.time() - t0 < 20
        assert server.improver.wait(timeout=300) == 0
        with Registry(tmp_path / "registry.db") as r:
            versions = r.list()
            assert [v["status"] for v in versions] == ["promoted", "rejected"]  # impossible bar: rejected
            assert r.current()["name"] == "v1"
        assert httpx.get(url + "/health").json()["version"] == "v1"


def test_best_of_returns_the_reward_models_favourite(folder, tmp_path):
    from genlab.train.prefer import RewardModel, train_reward_model

    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "short"}],
              "rejected": [{"role": "assistant", "content": "a much longer and rambling answer " * 2}]} for i in range(16)]
    reward = train_reward_model(folder, pairs, tmp_path / "reward", epochs=1)
    model = genlab.load(folder)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 12,
            "temperature": 1.0, "seed": 3, "best_of": 4}
    with background(create_app(model, ServeConfig(db=tmp_path / "none.db"))) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 422 and "reward model" in r.json()["error"]["message"]
    with background(create_app(model, ServeConfig(db=tmp_path / "fb.db", reward_model=reward))) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert len(r["choices"]) == 1 and r["best_of"]["samples"] == 4
        rewards = r["best_of"]["rewards"]
        assert rewards == sorted(rewards, reverse=True)
        assert httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}).status_code == 422
    with sqlite3.connect(tmp_path / "fb.db") as conn:
        texts = [t for (t,) in conn.execute("SELECT text FROM choices WHERE completion_id = ? ORDER BY idx", (r["id"],))]
    assert len(texts) == 4 and texts[0] == r["choices"][0]["message"]["content"]
    scores = RewardModel(reward).score([body["messages"]] * 4, texts)
    assert max(scores) == pytest.approx(scores[0], abs=1e-4)  # the returned answer is the best-scored sample


def test_ratings_only_feedback_trains_kto(folder, tmp_path):
    """No A/B pairs, only thumbs: improve picks KTO by itself (and gates it like any candidate)."""
    from genlab.feedback.store import ChoiceRecord, CompletionRecord, FeedbackStore

    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        for i in range(48):
            messages = [{"role": "user", "content": f"Question {i}?"}]
            good = i % 2 == 0
            store.record(CompletionRecord(id=f"c{i}", endpoint="chat", model="tiny", prompt=f"q{i}", messages=messages,
                                          choices=[ChoiceRecord(0, "yes." if good else "no no no no no no", "stop", 3)]))
            store.add_feedback(f"c{i}", rating=1 if good else -1)
    result = improve(folder, db, tmp_path / "registry.db", out_dir=tmp_path / "runs",
                     prefer=PreferConfig(epochs=2, lr=5e-3, batch_size=4))
    assert result.method == "kto" and result.metrics["heldout_rated"] > 0
    assert "pref_accuracy" in result.metrics and "win_rate" not in result.metrics  # no pairs: no reward model
    assert result.version["status"] in ("promoted", "rejected") and result.reasons


def test_promoted_version_wins_for_the_simulated_user(folder, tmp_path):
    """The proof: a user who prefers answers with numbers leaves 200 A/B choices (+ thumbs and
    corrections) over HTTP; improve promotes a candidate through the gate; on fresh prompts
    the promoted version wins >= 70% of the comparisons the user's own preference decides."""
    from genlab.feedback.simulate import win_rate

    db, reg = tmp_path / "fb.db", tmp_path / "registry.db"
    model = genlab.load(folder)
    fresh = [f"What do you know about subject {i}?" for i in range(60)]
    with background(create_app(model, ServeConfig(db=db, registry=reg, poll_seconds=0.1))) as url:
        report = SimulatedUser(url, "tiny", "numbers", seed=3, max_tokens=16).session(
            [f"Tell me about topic {i}." for i in range(200)])
        assert report.ab_choices >= 120
        # The reward-model bar is off here: on this random tiny model the reward model (112 pairs of
        # byte-level noise, held-out accuracy ~0.70) misjudges the candidate's answers (win rate 0.15
        # measured 2026-11-30, while the user's own preference below gives the candidate 0.86; it
        # judged 0.90 on 2026-11-23 with the same code, so a dependency update moved it). The bar is
        # exercised by bench/loop.py on a pretrained model and by the mislabelled-feedback test.
        result = improve(folder, db, reg, out_dir=tmp_path / "runs", prefer=PreferConfig(epochs=8, lr=2e-2),
                         gate=GateConfig(min_win_rate=0.0))
        assert result.promoted, result.reasons
        assert result.metrics["pref_accuracy"] >= 0.6 and "win_rate" in result.metrics
        deadline = time.time() + 20
        while httpx.get(url + "/health").json()["version"] != "v2" and time.time() < deadline:
            time.sleep(0.1)
        rate, decided = win_rate("numbers", answers(url, "v2", fresh), answers(url, "base", fresh))
    assert decided >= 30 and rate >= 0.7, (rate, decided)

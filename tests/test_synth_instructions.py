"""Grounded instruction drafting (`genlab synth instructions`): parsing, filters, de-duplication,
the drafting loop with a controlled generator, the retrieval check, and the CLI with a tiny model
that has memorised its drafts, read back by the finetune data reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genlab.errors import ContextLengthError, InvalidParameterError
from genlab.synth.instructions import (
    REASONS, DraftConfig, NearDuplicates, check_pair, draft_instructions, draft_prompt, fitted_prompt, grounding,
    parse_draft, read_chunks, synthesize,
)

DOCS = {  # file name -> (title, text): one chunk each
    "albatross.md": ("Albatross", "Albatrosses glide over the southern ocean for hours without flapping their wings."),
    "barometer.txt": ("Barometers", "Barometers measure air pressure in hectopascals; falling pressure warns of storms."),
    "coral.txt": ("Coral", "Coral reefs bleach when the water stays warm for weeks."),
}
GOOD_A = "Q: How do albatrosses cross the southern ocean?\nA: They glide for hours without flapping their wings."
GOOD_B = "Q: What does falling pressure on a barometer warn of?\nA: Falling pressure warns of storms."
UNGROUNDED_C = "Q: Why do coral reefs bleach?\nA: Fishermen paint them white at night."


def chunk(i: int, name: str) -> dict:
    title, text = DOCS[name]
    return {"id": i, "path": f"/docs/{name}", "title": title, "heading": "", "page": None, "start": 0,
            "end": len(text), "text": text}


def fake_store(folder: Path, docs: dict = DOCS) -> Path:
    """A store with real rows but placeholder vectors: enough for everything but retrieval."""
    from genlab.rag.store import Store

    store = Store(folder, embedder_id="placeholder:0", dim=4, create=True)
    with store.transaction():
        for name, (title, text) in docs.items():
            store.put_file(f"/docs/{name}", name, Path(name).suffix[1:], title,
                           [{"heading": "", "page": None, "start": 0, "end": len(text), "text": text}], np.ones((1, 4)))
    store.close()
    return folder


def stub(drafts: dict[str, list[str]]):
    """A Generate that answers each prompt with the drafts of the first key found in it."""
    calls = []

    def generate(prompts, n):
        calls.append((prompts, n))
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return [next(d for key, d in drafts.items() if key in t)[:n] for t in texts]

    return generate, calls


# --- parsing and filters -------------------------------------------------------------------------
def test_parse_draft_formats_and_malformed_drafts():
    assert parse_draft(GOOD_B) == ("What does falling pressure on a barometer warn of?", "Falling pressure warns of storms.")
    assert parse_draft("**Question 1:** Why is it?  **Answer:** Because.\n\nPassage: more text") == ("Why is it?", "Because.")
    assert parse_draft("Q: What is vitamin A? A: A vitamin.") == ("What is vitamin A?", "A vitamin.")
    # the plain prompt ends with "Q:": the draft starts with the question; a second pair is ignored
    assert parse_draft(" Who rang?\nA: The bell\nrang.\nQ: Another?\nA: No.") == ("Who rang?", "The bell rang.")
    assert parse_draft("Sure, here it is:\nQ: Where?\nA: Here.") == ("Where?", "Here.")
    for bad in ["no format at all", "Q: a question without an answer?", "Q: What?\nA:   ", "A: an answer only", ""]:
        assert parse_draft(bad) is None, bad


def test_filters_keep_grounded_pairs_and_name_the_reason_for_the_rest():
    cfg, source = DraftConfig(), "Albatross\n" + DOCS["albatross.md"][1]
    assert check_pair(*parse_draft(GOOD_A), source, cfg) is None
    assert grounding("They glide for hours without flapping their wings.", source) == 1.0
    assert grounding("Fishermen paint them white at night.", source) == 0.0
    assert grounding("An albatross glides far.", source) == pytest.approx(2 / 3)  # plural/singular match, "far" not
    assert check_pair("How do albatrosses fly?", "Penguins swim under the ice.", source, cfg) == "ungrounded"
    assert check_pair("How do albatrosses fly?", "Penguins swim under the ice.", source,
                      DraftConfig(min_overlap=0)) is None  # the threshold is configurable
    assert check_pair("Why?", "They glide.", source, cfg) == "too_short"
    assert check_pair("How do albatrosses fly?", "glide " * 201, source, cfg) == "too_long"
    assert check_pair("Albatrosses glide over the ocean.", "They glide.", source, cfg) == "not_a_question"
    assert check_pair("Albatrosses glide over the ocean?", "They glide.", source, cfg) == "not_a_question"
    with pytest.raises(InvalidParameterError, match="min-overlap"):
        DraftConfig(min_overlap=1.5)


def test_exact_and_near_duplicates_collapse_but_distinct_questions_stay():
    dups = NearDuplicates(0.7)
    dups.add("How do albatrosses cross the southern ocean?")
    assert dups.seen("how do albatrosses cross the Southern Ocean ?")  # exact after normalisation
    assert dups.seen("How does an albatross cross the southern ocean?")  # near: same content words
    assert not dups.seen("How do penguins cross the southern ocean?")  # 5 of 9 shingles shared
    dups.add("What is the capital of France?")
    assert not dups.seen("What is the capital of Germany?")
    assert NearDuplicates(0.3).seen("How do penguins cross the southern ocean?") is False  # nothing kept yet
    strict = NearDuplicates(0.3)
    strict.add("How do albatrosses cross the southern ocean?")
    assert strict.seen("How do penguins cross the southern ocean?")  # a lower threshold collapses more


# --- drafting with a controlled generator --------------------------------------------------------
def test_synthesize_counts_every_draft_and_writes_finetune_records():
    chunks = [chunk(1, "albatross.md"), chunk(2, "barometer.txt"), chunk(3, "coral.txt")]
    generate, calls = stub({
        "Albatrosses": [GOOD_A, "Q: How does an albatross cross the Southern Ocean?\nA: It glides without flapping.",
                        "Albatrosses are great."],
        "Barometers": [GOOD_B, "Q: Falling pressure warns of storms.\nA: Storms come.", "Q: How?\nA: Storms."],
        "Coral": [UNGROUNDED_C, "Q: What does falling pressure on a barometer warn of?\nA: Coral reefs bleach.",
                  "Q: When do coral reefs bleach?\nA: When the water stays warm for weeks."],
    })
    result = synthesize(chunks, generate, DraftConfig(per_chunk=3, batch_size=2))
    s = result.summary
    assert [n for _, n in calls] == [3, 3] and [len(p) for p, _ in calls] == [2, 1]  # batches of chunks, n drafts each
    assert isinstance(calls[0][0][0], str) and calls[0][0][0].endswith("\n\nQ:")  # plain prompts by default
    assert s["drafted"] == 9 and s["kept"] == 3
    assert s["dropped"] == {"parse_failed": 1, "too_short": 1, "too_long": 0, "not_a_question": 1, "ungrounded": 1,
                            "duplicate": 2, "not_retrieved": 0}
    assert s["drafted"] == s["kept"] + sum(s["dropped"].values()) and set(s["dropped"]) == set(REASONS)
    assert s["dropped_examples"]["ungrounded"] == ["Q:" + UNGROUNDED_C]  # as parsed: after the prompt's "Q:"
    questions = [r["messages"][0]["content"] for r in result.pairs]
    assert questions == ["How do albatrosses cross the southern ocean?",
                         "What does falling pressure on a barometer warn of?", "When do coral reefs bleach?"]
    first = result.pairs[0]
    assert first["messages"][1] == {"role": "assistant", "content": "They glide for hours without flapping their wings."}
    assert first["source"]["id"] == 1 and first["source"]["path"] == "/docs/albatross.md" and first["grounding"] == 1.0
    # the same drafts through chat prompts: one user message holding the passage
    generate, calls = stub({"Albatrosses": [GOOD_A]})
    synthesize(chunks[:1], generate, prompt_for=lambda c: draft_prompt(c, chat=True))
    (messages,), _ = calls[0]
    assert messages[0]["role"] == "user" and DOCS["albatross.md"][1] in messages[0]["content"]


def test_prompt_is_cut_to_fit_the_context():
    c = chunk(1, "albatross.md") | {"text": "word " * 200}
    count = len  # one "token" per character
    full = len(draft_prompt(c, chat=False)[0])
    prompt, prefix = fitted_prompt(c, False, count, budget=full - 300)
    assert prefix == "Q:" and len(prompt) <= full - 300 and "word word" in prompt
    assert fitted_prompt(c, False, count, budget=full) == draft_prompt(c, chat=False)
    with pytest.raises(ContextLengthError, match="max-new-tokens"):
        fitted_prompt(c, False, count, budget=10)


def test_draft_instructions_on_a_store_writes_jsonl_and_summary(tmp_path, tokenizer):
    from genlab.data.instructions import prepare_examples
    from genlab.rag.store import Store

    store = fake_store(tmp_path / "store")
    sample = read_chunks(Store(store), n=2, seed=3)
    assert len(sample) == 2 and sample == read_chunks(Store(store), n=2, seed=3)  # seeded sample, in store order
    assert [c["id"] for c in read_chunks(Store(store), n=10)] == [1, 2, 3]
    generate, _ = stub({"Albatrosses": [GOOD_A], "Barometers": [GOOD_B], "Coral": [UNGROUNDED_C]})
    out = tmp_path / "qa" / "pairs.jsonl"
    result = draft_instructions(store, generate, out, DraftConfig(seed=0))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == result.pairs and len(records) == 2 and records[1]["source"]["path"] == "/docs/barometer.txt"
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert (summary["drafted"], summary["kept"], summary["dropped"]["ungrounded"]) == (3, 2, 1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl", "pairs.summary.json"]  # no temp files
    examples = prepare_examples([out.parent], tokenizer, 256, val_fraction=0.5)  # the folder, as finetune reads it
    assert examples.stats.records == 2 and len(examples.train) + len(examples.val) == 2


def test_retrieval_check_drops_questions_that_miss_their_chunk(tmp_path):
    from genlab.rag.embed import Embedder
    from genlab.rag.indexer import index

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, (_, text) in DOCS.items():
        (docs / name).write_text(text)
    embedder = Embedder()
    index([docs], tmp_path / "store", embedder)
    # grounded in the albatross chunk, but asking about barometers: retrieval finds the barometer chunk
    off_topic = "Q: What do barometers measure in hectopascals?\nA: Albatrosses glide over the southern ocean."
    generate, _ = stub({"Albatrosses": [off_topic], "Barometers": [GOOD_B], "Coral": [UNGROUNDED_C]})
    cfg = DraftConfig(check_retrieval=True, retrieval_k=1)
    result = draft_instructions(tmp_path / "store", generate, tmp_path / "p.jsonl", cfg, embedder=embedder)
    s = result.summary
    assert (s["kept"], s["dropped"]["not_retrieved"], s["dropped"]["ungrounded"]) == (1, 1, 1)
    assert result.pairs[0]["source"]["path"].endswith("barometer.txt")
    without = draft_instructions(tmp_path / "store", generate, tmp_path / "q.jsonl", DraftConfig())
    assert without.summary["kept"] == 2  # the off-topic pair passes every other filter


# --- the command line, with a tiny model that memorised its drafts ---------------------------------
def memorised_model(folder: Path, tokenizer, chunks: list[dict], drafts: list[str]) -> Path:
    """A tiny genlab transformer trained until its greedy reply to each chunk's chat prompt is the draft."""
    import torch

    from genlab.codecs.text import END, render_chat
    from genlab.lm import LanguageModel
    from genlab.model.transformer import ModelConfig, Transformer

    end = tokenizer.convert_tokens_to_ids(END)
    seqs = [(tokenizer(render_chat(tokenizer, draft_prompt(c, chat=True)[0]), add_special_tokens=False)["input_ids"],
             tokenizer(d, add_special_tokens=False)["input_ids"] + [end]) for c, d in zip(chunks, drafts)]
    width = max(len(p) + len(a) for p, a in seqs)
    ids, targets = torch.full((len(seqs), width), tokenizer.pad_token_id), torch.full((len(seqs), width), -100)
    for i, (p, a) in enumerate(seqs):  # loss on the draft (and the end-of-turn token) only
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        targets[i, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=384)
    torch.manual_seed(0)
    module = Transformer(cfg).init_weights(0).train()
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        loss = module(ids, targets=targets)
        if loss.item() < 0.01:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm = LanguageModel(module.eval(), tokenizer, meta={"model_config": cfg.to_dict()},
                       generation={"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id})
    assert [o.text for o in lm.generate([draft_prompt(c, True)[0] for c in chunks], temperature=0,
                                        max_new_tokens=96)] == drafts
    lm.save(folder)
    return folder


def test_cli_drafts_with_a_real_model_and_finetune_reads_the_output(tmp_path, tokenizer, one_torch_thread):
    from genlab.data.instructions import prepare_examples
    from genlab.rag.store import Store

    store = fake_store(tmp_path / "store")
    model = memorised_model(tmp_path / "model", tokenizer, read_chunks(Store(store)), [GOOD_A, GOOD_B, UNGROUNDED_C])
    out = tmp_path / "pairs.jsonl"
    r = subprocess.run([sys.executable, "-m", "genlab.cli", "synth", "instructions", str(store), "--model", str(model),
                        "--out", str(out), "--temperature", "0", "--max-new-tokens", "96", "--per-chunk", "2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["chat"] is True and summary["chunks"] == 3 and summary["drafted"] == 6
    # greedy: each chunk's second draft repeats its first
    assert summary["kept"] == 2 and summary["dropped"]["ungrounded"] == 2 and summary["dropped"]["duplicate"] == 2
    assert summary["drafted"] == summary["kept"] + sum(summary["dropped"].values())
    assert "2 pairs" in r.stdout and "ungrounded" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in records] == [parse_draft(GOOD_A)[0], parse_draft(GOOD_B)[0]]
    assert [r["source"]["id"] for r in records] == [1, 2]
    examples = prepare_examples(out, tokenizer, 256)
    assert examples.stats.records == 2 and examples.stats.answer_tokens > 0


@pytest.mark.parametrize("case, message", [("missing", "no store here"), ("empty", "the store holds no chunks"),
                                           ("model", "no such model folder"), ("out", "must be a .jsonl file")])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, case, message):
    from genlab.cli import main
    from genlab.rag.store import Store

    store = fake_store(tmp_path / "store")
    if case == "empty":
        Store(tmp_path / "empty", embedder_id="placeholder:0", dim=4, create=True).close()
        store = tmp_path / "empty"
    args = [str(tmp_path / "nowhere" if case == "missing" else store), "--model", str(tmp_path / "no-model"),
            "--out", str(tmp_path / ("pairs.csv" if case == "out" else "pairs.jsonl"))]
    monkeypatch.setattr(sys, "argv", ["genlab", "synth", "instructions", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "pairs.jsonl").exists()


def test_cli_help_has_an_example(monkeypatch, capsys):
    from genlab.cli import main

    monkeypatch.setattr(sys, "argv", ["genlab", "synth", "instructions", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Example: genlab synth instructions" in text and "--check-retrieval" in text

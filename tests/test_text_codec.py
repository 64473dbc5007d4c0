"""The text codec: lossless byte-level BPE, HF-loadable folders, chat templates, input readers."""

from __future__ import annotations

import json
import random

import pytest

from genlab.codecs.text import BOS, CHAT_TEMPLATE, SPECIAL_TOKENS, render_chat, train_tokenizer
from genlab.data.corpus import python_docs_corpus
from genlab.data.readers import iter_texts
from genlab.errors import DataError, InvalidParameterError

TRICKY = [
    "plain ascii", "  leading and trailing  ", "tabs\tand\r\nCRLF\n\n", "emoji 🙂🚀👩‍👩‍👧‍👦", "東京タワーは高い",
    "combining: e\u0301 a\u0308", "math ∑∫√ and ℝ", "\x01\x02 control chars \x7f", "<|bos|> literal special",
    "zero\u200bwidth", "Ω≈ç√∫˜µ≤≥÷", "",
]


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def roundtrip(tok, text):
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=False)


def test_roundtrip_is_lossless(tokenizer):
    rng = random.Random(0)
    samples = TRICKY + [random_unicode(rng, rng.randint(1, 60)) for _ in range(200)]
    for text in samples:
        assert roundtrip(tokenizer, text) == text


def test_bos_is_added_and_skipped_on_decode(tokenizer):
    ids = tokenizer("hello world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


def test_saved_folder_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    texts = ["the cat sat on the mat"] * 20 + ["dogs and cats 🙂"] * 20
    tok = train_tokenizer(texts=texts, vocab_size=300, out_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[:3]] == [0, 1, 2]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert loaded("the cat 🙂")["input_ids"] == tok("the cat 🙂")["input_ids"]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(tok) <= 300 and len(tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]) < 10


def test_vocab_size_is_respected():
    docs = python_docs_corpus(max_docs=40)
    tok = train_tokenizer(texts=docs, vocab_size=1000)
    assert len(tok) == 1000


def test_chat_template_renders_exactly(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert render_chat(tokenizer, messages) == f"{BOS}<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"
    assert render_chat(tokenizer, messages, add_generation_prompt=False).endswith("Hi!<|end|>\n")


def test_chat_errors_name_the_problem(tokenizer):
    with pytest.raises(InvalidParameterError, match="unknown chat role tool"):
        render_chat(tokenizer, [{"role": "tool", "content": "x"}])
    with pytest.raises(InvalidParameterError, match="message 1: field 'content'"):
        render_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "user"}])


def test_models_with_their_own_template_use_it(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert render_chat(tok, [{"role": "user", "content": "q"}]) == "[user] q\n"


def test_iter_texts_reads_folders_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "gamma"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "p ", "completion": "c"},
    ]))
    assert list(iter_texts(tmp_path)) == ["alpha", "gamma", "q\na", "p c", "beta"]


def test_bad_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "name.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"name\.jsonl:2: invalid JSON"):
        list(iter_texts(bad))
    bad.write_text('{"text": "ok"}\n\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"name\.jsonl:3: no text field"):
        list(iter_texts(bad))


def test_missing_and_binary_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_texts(tmp_path / "missing"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        list(iter_texts(tmp_path / "latin1.txt"))


def test_bad_training_arguments(tmp_path):
    with pytest.raises(InvalidParameterError, match="vocab_size must be > 263"):
        train_tokenizer(texts=["abc"], vocab_size=200)
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(texts=["", ""], vocab_size=400)


def test_atomic_save_replaces_whole_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "tok"
    train_tokenizer(texts=["aaa bbb"] * 10, vocab_size=300, out_dir=out)
    (out / "stale.txt").write_text("from an older run")
    train_tokenizer(texts=["ccc ddd"] * 10, vocab_size=300, out_dir=out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    with pytest.raises(DataError):
        train_tokenizer(texts=[""], vocab_size=300, out_dir=out)
    assert (out / "tokenizer.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_bundled_corpus_is_offline_and_deterministic():
    docs = python_docs_corpus()
    assert len(docs) > 500 and sum(map(len, docs)) > 500_000
    assert docs == python_docs_corpus() and len(set(docs)) == len(docs)
    assert any("for_stmt" in d or "The \"for\" statement" in d for d in docs)

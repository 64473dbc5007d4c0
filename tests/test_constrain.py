"""JSON-object constrained decoding: the prefix automaton, closing(), token bytes, and decoding."""

from __future__ import annotations

import json
import time

import pytest
import torch

from genlab.generate.constrain import JsonObjectConstraint, JsonPrefix, token_bytes

DOCS = [
    "{}",
    "  {}  \n",
    '{"a": 1}',
    '{"a":[]}',
    '{"a": {}, "b": [], "c": [[]]}',
    '{"name": "Zoë", "city": "東京", "emoji": "🙂🚀"}',
    '{"esc": "quote \\" backslash \\\\ slash \\/ \\b\\f\\n\\r\\t", "u": "\\u00e9\\uD83D\\uDE00"}',
    '{"n": [0, -0, 1, -12, 3.25, -0.5, 1e10, 2E-3, 6.02e+23, 0.0e0, 10]}',
    '{"t": true, "f": false, "z": null, "l": [true, false, null]}',
    '{\n  "deep": {"a": [1, {"b": [2, {"c": "d"}]}]},\n\t"x": -1.5e-7\r\n}',
    '{"": ""}',
    '{"a" : 1 , "b" :\t[ 1 , 2 ] }',
    '{"k": [{"a": 1}, {"b": [null]}, "s", 0]}',
    '{"num": 123456789012345678901234567890, "neg": -9}',
    '{"a": "x"}   ',
]

INVALID = [
    '{"a" 1}', "{'a': 1}", "[1]", '{"a": 01}', '{"a": tru e}', "{} x", '{"a": "x\ny"}', '{"a": "\\q"}',
    '{"a": 1,}', '{"a": [1,]}', '{,}', '{"a": 1.}', '{"a": -}', '{"a": 1e}', '{"a": .5}', '{"a": +1}',
    '{"a": "\\u12G4"}', '{"a": "tab\there"}', '{"a\x00": 1}', '{1: 2}', '{"a": 1}}', '{"a": [1}', '{"a": nul}', '"s"', "1", "{}{}", '{"a": 1 2}',
]


def test_accepts_every_prefix_of_valid_documents():
    for doc in DOCS:
        data = doc.encode()
        p = JsonPrefix()
        for i, b in enumerate(data):
            assert p.feed(bytes([b])), (doc, i)
        assert p.complete, doc
    assert all(JsonPrefix().feed(d.encode()) for d in DOCS)  # whole documents in one call


@pytest.mark.parametrize("text", INVALID)
def test_rejects_invalid(text):
    try:  # the list itself: each really is invalid JSON, or not an object
        assert not isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        pass
    assert not JsonPrefix().feed(text.encode())


def test_not_complete_until_closed():
    p = JsonPrefix()
    for part in ["{", '"a"', ":", "[1", "]"]:
        assert p.feed(part.encode()) and not p.complete
    assert p.feed(b"}") and p.complete
    assert p.feed(b" \n") and p.complete
    assert not p.feed(b"{")


def test_closing_completes_every_prefix():
    for doc in DOCS:
        data = doc.encode()
        for i in range(len(data) + 1):
            p = JsonPrefix()
            assert p.feed(data[:i])
            try:
                prefix = data[:i].decode()
            except UnicodeDecodeError:  # cut inside a UTF-8 character: complete the bytes first
                continue
            value = json.loads(prefix + p.closing())
            assert isinstance(value, dict), (prefix, p.closing())


def test_closing_examples():
    cases = {"": "{}", "{": "}", '{"a": 1,': '"": null}', '{"a": [1,': "null]}", '{"a": tr': "ue}",
             '{"a": -': "0}", '{"a": 1.': "0}", '{"a": 1e': "0}", '{"a': '": null}', '{"a"': ": null}",
             '{"a":': "null}", '{"a": "\\u00': '00"}', '{"a": "x\\': '\\"}', '{"a": 1}': ""}
    for prefix, expected in cases.items():
        p = JsonPrefix()
        assert p.feed(prefix.encode())
        assert p.closing() == expected, prefix


def test_feed_is_all_or_nothing():
    p = JsonPrefix()
    assert p.feed(b'{"a": [1, 2')
    before = p.closing()
    assert not p.feed(b', 3 x')  # valid bytes followed by an invalid one: nothing is kept
    assert p.closing() == before
    assert p.feed(b"]}") and p.complete
    q = JsonPrefix()
    assert q.feed(b'{"s": "ab')
    assert q.accepts(b'c"}') and not q.accepts(b'c\x01')
    assert q.closing() == '"}'  # accepts() never changes the state


def test_fast_enough():
    p = JsonPrefix()
    p.feed(b'{"items": [{"name": "x", "value": 1')
    candidates = [b", ", b"}", b'"na', b"12", b" true", b'"\\u00', b"]", b"e5", b"x", b'"}'] * 10
    start = time.perf_counter()
    for c in candidates:
        p.accepts(c)
    assert time.perf_counter() - start < 0.05  # ~100 candidates per step; far under this on any machine


@pytest.fixture(scope="module")
def bpe():
    from genlab.codecs.text import train_tokenizer

    texts = ['{"name": "Zoë", "age": 31, "tags": ["a", "b"]}', "Le café coûte 3 € 東京は晴れ 🙂",
             "The quick brown fox jumps over the lazy dog.", '{"ok": true, "n": null, "x": -1.5e3}'] * 5
    return train_tokenizer(texts=texts, vocab_size=300)


def test_token_bytes_round_trip(bpe):
    table = token_bytes(bpe)
    assert len(table) == len(bpe) and token_bytes(bpe) is table  # cached per tokenizer
    for text in ["Le café coûte 3 €", "東京は晴れ 🙂🚀", '{"name": "Zoë"}\n\t end', "plain ascii"]:
        ids = bpe(text)["input_ids"]
        assert b"".join(table[i] for i in ids).decode() == text
    assert all(table[i] == b"" for i in bpe.all_special_ids)
    assert table[bpe.convert_tokens_to_ids("Ġ")] == b" "


def test_constraint_allowed(bpe):
    eos = bpe.eos_token_id
    c = JsonObjectConstraint(bpe, [eos])
    brace, quote = bpe.convert_tokens_to_ids("{"), bpe.convert_tokens_to_ids('"')
    assert c.allowed(brace) and not c.allowed(quote) and not c.allowed(eos)
    assert not c.allowed(bpe.bos_token_id) and not c.allowed(len(bpe) + 5)
    c.advance(brace)
    assert c.allowed(quote) and not c.allowed(brace)
    with pytest.raises(ValueError):
        c.advance(brace)
    c.advance(bpe.convert_tokens_to_ids("}"))
    assert c.complete and c.allowed(eos) and not c.allowed(brace)
    masked = c.mask(torch.zeros(len(bpe)))
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [eos]


def test_mask_scans_past_the_window(bpe):
    c = JsonObjectConstraint(bpe, [bpe.eos_token_id])
    logits = torch.arange(len(bpe), dtype=torch.float32)  # the highest ids (merges, specials) first
    assert not any(c.allowed(i) for i in range(len(bpe) - 8, len(bpe)))  # so the first window has nothing
    masked = c.mask(logits, window=8)
    allowed = torch.isfinite(masked).nonzero().flatten().tolist()
    chunk = next(ch for ch in (range(hi - 8, hi) for hi in range(len(bpe), 0, -8)) if any(map(c.allowed, ch)))
    assert allowed == [i for i in chunk if c.allowed(i)]  # the first chunk with an allowed token, only its allowed ones
    assert torch.equal(masked[allowed], logits[allowed])
    brace = bpe.convert_tokens_to_ids("{")
    logits[brace] = 1e4
    top = c.mask(logits, window=1)
    assert torch.isfinite(top).nonzero().flatten().tolist() == [brace]  # allowed in the window: nothing else checked


def test_random_model_emits_json_objects(bpe):
    import genlab
    from genlab.model.transformer import ModelConfig

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, max_seq_len=128)
    model = genlab.build(cfg, bpe, seed=1)
    results, values, closed = [], [], 0
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        c = JsonObjectConstraint(bpe, model.eos_token_ids)
        out = b""
        for _ in range(60):
            with torch.no_grad():
                logits = model.logits(out.decode(errors="replace"))[-1]
            masked = c.mask(logits)
            token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
            assert c.allowed(token)
            if token in model.eos_token_ids:
                break
            c.advance(token)
            out += c.tokens[token]
            if c.complete and not model.eos_token_ids:
                break
        # bytes, not UTF-8, are constrained: a string may hold a cut character (replaced here)
        text = out.decode(errors="replace") + ("" if c.complete else c.closing())
        value = json.loads(text)
        assert isinstance(value, dict)
        results.append(text)
        values.append(value)
        closed += c.complete
    assert len(set(results)) > 1 and any(values)  # the seeds really sample different, non-trivial outputs
    assert closed < 5  # some outputs were cut off by the token limit and completed by closing()

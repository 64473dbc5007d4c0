"""The generation engine: parity with transformers' generate, sampling, stops, streaming."""

from __future__ import annotations

import math

import pytest
import torch

import genlab
from genlab.errors import ContextLengthError, InvalidParameterError
from genlab.generate.detok import TextStream
from genlab.generate.sampling import RowSampler, SamplingParams, draw

PROMPTS = ["The quick brown fox", "def", "Climate records: 1958 CO2 315.7 ppm; 2024"]


@pytest.fixture(params=[0, 10**9], ids=["onednn-packed", "plain-fused"])
def pair(hf_folder, monkeypatch, request):
    """(genlab model, transformers model) with the same weights; both decode weight layouts."""
    import genlab.model.transformer as transformer

    monkeypatch.setattr(transformer, "PREPACK_MIN_ELEMENTS", request.param)
    folder, hf = hf_folder("llama")
    return genlab.load(folder), hf


def hf_greedy(hf, ids, n, **kw):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2, **kw)
    return out[0, len(ids):].tolist()


def test_greedy_batch_of_different_lengths_equals_transformers(pair):
    model, hf = pair
    outs = model.generate(PROMPTS, max_new_tokens=24, temperature=0, stop_token_ids=[], )
    assert len({len(model.encode(p)) for p in PROMPTS}) == 3  # really different lengths: left padding in use
    for prompt, out in zip(PROMPTS, outs):
        ids = model.encode(prompt)
        expected = hf_greedy(hf, ids, 24)
        stop = next((i for i, t in enumerate(expected) if t in model.eos_token_ids), None)
        assert out.token_ids == expected[:stop]


def test_repetition_penalty_equals_transformers(pair):
    model, hf = pair
    ids = model.encode(PROMPTS[0])
    out = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0, repetition_penalty=1.8)
    expected = hf_greedy(hf, ids, 20, repetition_penalty=1.8)
    stop = next((i for i, t in enumerate(expected) if t in model.eos_token_ids), None)
    assert out.token_ids == expected[:stop]
    assert out.token_ids != model.generate(PROMPTS[0], max_new_tokens=20, temperature=0).token_ids


def test_same_seed_same_output_and_seed_independent_of_batch(pair):
    model, _ = pair
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=7)
    a = model.generate(PROMPTS, **kw)
    b = model.generate(PROMPTS, **kw)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    alone = model.generate(PROMPTS[1], **kw)
    assert alone.token_ids == a[1].token_ids  # batch-mates don't change a seeded row
    other = model.generate(PROMPTS, **{**kw, "seed": 8})
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


def test_n_samples_per_prompt(pair):
    model, _ = pair
    outs = model.generate(PROMPTS[:2], n=3, max_new_tokens=12, temperature=1.0, seed=1)
    assert [(c.prompt_index, c.sample_index) for c in outs] == [(i, j) for i in range(2) for j in range(3)]
    assert len({tuple(c.token_ids) for c in outs[:3]}) > 1


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_one_token_is_greedy(pair, kw):
    model, _ = pair
    greedy = model.generate(PROMPTS[0], max_new_tokens=16, temperature=0).token_ids
    assert model.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5, seed=3, **kw).token_ids == greedy


def test_sampler_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(4000, 1)
    params = SamplingParams(temperature=1.0)
    sampler = RowSampler([params] * 4000, list(range(4000)), 4, "cpu")
    counts = torch.bincount(sampler(logits), minlength=4).float() / 4000
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)


def test_inverse_cdf_draw_follows_unnormalised_rows_and_skips_zeros():
    weights = torch.tensor([[2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]]).repeat(10000, 1)
    tokens = draw(weights, torch.Generator().manual_seed(0))[:, 0]
    first, second = tokens[0::2], tokens[1::2]
    torch.testing.assert_close(torch.bincount(first, minlength=4).float() / len(first),
                               torch.tensor([0.5, 0.0, 0.25, 0.25]), atol=0.02, rtol=0)
    assert (second == 3).all()  # the only token with weight
    assert torch.equal(draw(weights, torch.Generator().manual_seed(0))[:, 0], tokens)  # seeded


def test_top_k_top_p_min_p_keep_the_right_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(2000, 1)

    def support(**kw):
        sampler = RowSampler([SamplingParams(**kw)] * 2000, list(range(2000)), 4, "cpu")
        return set(sampler(logits).tolist())

    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.79) == {0, 1}  # 0.5 + 0.3 reaches 0.79: token 2 is cut
    assert support(top_p=0.81) == {0, 1, 2}
    assert support(min_p=0.25) == {0, 1, 2}  # 0.05 < 0.25 * 0.5
    assert support(min_p=0.5) == {0, 1}


def test_stop_strings_streaming_and_generate_agree(pair):
    model, _ = pair
    free = model.generate(PROMPTS[0], max_new_tokens=30, temperature=0).text
    assert len(free) > 6
    stop = free[3:6]
    out = model.generate(PROMPTS[0], max_new_tokens=30, temperature=0, stop=[stop])
    assert out.finish_reason == "stop" and stop not in out.text and free.startswith(out.text)
    assert out.text == free[: free.index(stop)]
    pieces = list(model.stream(PROMPTS[0], max_new_tokens=30, temperature=0, stop=[stop]))
    assert "".join(pieces) == out.text
    assert "".join(model.stream(PROMPTS[0], max_new_tokens=30, temperature=0)) == free


def test_stop_token_ids_end_generation(pair):
    model, _ = pair
    free = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0)
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_at = free.token_ids[5]
    out = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0, stop_token_ids=[stop_at])
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[:first] and out.finish_reason == "stop"


def test_logprobs_match_a_full_forward_pass(pair):
    model, _ = pair
    out = model.generate(PROMPTS[0], max_new_tokens=10, temperature=0.9, seed=2, logprobs=True, top_logprobs=3)
    ids = model.encode(PROMPTS[0]) + out.token_ids
    with torch.no_grad():
        logp = model.module(torch.tensor([ids]))[0].log_softmax(-1)
    p = len(ids) - len(out.token_ids)
    expected = [logp[p - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)
    for i, top in enumerate(out.top_logprobs):
        best = logp[p - 1 + i].topk(3)
        assert list(top) == best.indices.tolist()
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert all(v <= 0 for v in top.values())


def test_stream_never_splits_a_character(tokenizer):
    text = "naïve café 東京 🙂🚀 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # several characters span several byte-level tokens
    stream = TextStream(tokenizer, stop=[])
    pieces = [stream.add(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string(tokenizer):
    stream = TextStream(tokenizer, stop=["END"])
    pieces = [stream.add(t) for t in tokenizer("abc EN", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == "abc "  # "EN" may become "END": held back
    assert stream.flush() == "EN"


def test_context_limits(pair):
    model, _ = pair
    long_prompt = "word " * 400
    with pytest.raises(ContextLengthError, match="context is 128 tokens"):
        model.generate(long_prompt)
    prompt = "word " * 20
    out = model.generate(prompt, max_new_tokens=500, temperature=0, stop_token_ids=[])
    assert out.finish_reason in ("length", "stop")
    assert out.prompt_tokens + len(out.token_ids) <= 128


@pytest.mark.parametrize("kw,message", [
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(n=0), "n must be"),
])
def test_invalid_sampling_values(pair, kw, message):
    model, _ = pair
    with pytest.raises(InvalidParameterError, match=message):
        model.generate("hello", **kw)


def test_empty_prompts(pair):
    model, _ = pair
    with pytest.raises(InvalidParameterError, match="no prompts"):
        model.generate([])
    with pytest.raises(InvalidParameterError, match="prompt 1 is empty"):
        model.generate(["fine", ""])


def test_chat_uses_the_template_and_stops_at_end_token(tmp_path, tokenizer):
    model = genlab.build("1m", tokenizer, seed=0)
    messages = [{"role": "user", "content": "hi"}]
    ids = model.encode(messages)
    assert tokenizer.decode(ids) == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in model.eos_token_ids


def test_compiled_static_decode_equals_eager(hf_folder):
    """The torch.compile path (static cache shapes; CUDA graphs on GPU) runs on CPU too."""
    folder, _ = hf_folder("llama")
    eager, compiled = genlab.load(folder), genlab.load(folder, compile=True)
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=[])
    assert [c.token_ids for c in compiled.generate(PROMPTS, **kw)] == [c.token_ids for c in eager.generate(PROMPTS, **kw)]

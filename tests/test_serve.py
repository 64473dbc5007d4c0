"""The OpenAI-compatible server, driven by the official openai client over real HTTP."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import openai
import pytest

import genlab
from genlab.serve.app import ServeConfig, create_app
from servers import running, tiny_model_folder

CHAT = [{"role": "user", "content": "Tell me about the quick brown fox"}]


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    return tiny_model_folder(tokenizer, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def model(folder):
    return genlab.load(folder)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "feedback.db"
    app = create_app(model, ServeConfig(db=db, slots=8))
    with running(app) as url:
        yield url, db, app.state.server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "batch" and health["slots"] == 8


def test_chat_equals_the_engine_and_is_recorded(server, client, model):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    expected = model.generate(CHAT, max_new_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(model.encode(CHAT))
    assert r.usage.completion_tokens == len(expected.token_ids)
    with sqlite3.connect(server[1]) as db:
        row = db.execute("SELECT endpoint, model, prompt, prompt_tokens, completion_tokens, messages FROM completions "
                         "WHERE id = ?", (r.id,)).fetchone()
        text, = db.execute("SELECT text FROM choices WHERE completion_id = ?", (r.id,)).fetchone()
    assert row[:5] == ("chat", "tiny", model.prompt_text(CHAT), r.usage.prompt_tokens, r.usage.completion_tokens)
    assert json.loads(row[5]) == CHAT and text == expected.text


def test_streaming_chat_chunks(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks[1:-2]]
    assert all(c.choices[0].finish_reason is None for c in content) and len(content) >= 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_completions_with_logprobs_n_seed_and_stop(client, model):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, logprobs=3)
    expected = model.generate("The quick brown", max_new_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == expected.text
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    # the legacy format keys alternatives by text: tokens that decode alike (partial UTF-8) merge
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs) and any(len(t) == 3 for t in lp.top_logprobs)
    kw = dict(model="tiny", prompt="Climate records", max_tokens=12, temperature=1.0, n=3, seed=5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each sample has its own generator
    stop = a.choices[0].text[3:5]
    stopped = client.completions.create(**{**kw, "n": 1, "stop": [stop]}).choices[0]
    assert stop not in stopped.text and stopped.finish_reason == "stop"


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    expected = model.generate(CHAT, max_new_tokens=6, temperature=0, logprobs=True)
    assert [c.logprob for c in content] == pytest.approx(expected.logprobs, abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_json_object_output_always_parses(client):
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Give JSON"}],
                                           max_tokens=30, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("kw, status, code", [
    (dict(model="nope"), 404, "model_not_found"),
    (dict(temperature=5), 422, "invalid_parameter"),
    (dict(top_p=0), 422, "invalid_parameter"),
    (dict(frequency_penalty=0.5), 422, "invalid_parameter"),
    (dict(max_tokens=100_000), 400, "context_length_exceeded"),
    (dict(messages=[{"role": "user", "content": "word " * 400}]), 400, "context_length_exceeded"),
    (dict(adapter="missing"), 404, "adapter_not_found"),
])
def test_errors_in_openai_shape(client, kw, status, code):
    kw = {"model": "tiny", "messages": CHAT, "max_tokens": 5, **kw}
    extra = {k: kw.pop(k) for k in ("adapter",) if k in kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kw, extra_body=extra or None)
    assert e.value.status_code == status
    assert e.value.body["code"] == code and e.value.body["message"]


def test_requests_join_the_running_batch(server, client):
    batcher = server[2].worker
    steps, rows = batcher.steps, batcher.row_steps
    results, errors = [], []

    def one(i):
        try:
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"request {i}"}],
                                                    max_tokens=40, temperature=1.0, seed=i, stream=True)
            results.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.01 * (i % 3))  # staggered: later ones arrive while earlier ones decode
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    mean_batch = (batcher.row_steps - rows) / (batcher.steps - steps)
    assert mean_batch > 2  # decoded together, not one after the other
    # a seeded request gives the same text whatever shared its batch
    alone = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "request 3"}],
                                           max_tokens=40, temperature=1.0, seed=3)
    assert alone.choices[0].message.content in results


def test_client_disconnect_cancels_generation(server, monkeypatch):
    batcher = server[2].worker
    step = batcher._step

    def slow_step():  # a model this small finishes 200 tokens before the client can hang up
        time.sleep(0.02)
        step()

    # A seeded request is reproducible: pick a seed whose 200 tokens contain no end-of-sequence
    # token (an unseeded random model may stop early and legitimately finish before the hang-up).
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 200, "temperature": 1.0, "stop": ["\u0000never"]}
    for seed in range(20):
        done = httpx.post(server[0] + "/v1/chat/completions", json={**body, "seed": seed}, timeout=60).json()
        if done["choices"][0]["finish_reason"] == "length":
            break
    assert done["choices"][0]["finish_reason"] == "length"
    monkeypatch.setattr(batcher, "_step", slow_step)
    body = {**body, "seed": seed, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(6)]
        completion_id = json.loads(first[0][6:])["id"]
    deadline = time.time() + 10
    while batcher.rows and time.time() < deadline:
        time.sleep(0.05)
    assert not batcher.rows  # dropped long before its 200 tokens
    with sqlite3.connect(server[1]) as db:
        assert db.execute("SELECT COUNT(*) FROM completions WHERE id = ?", (completion_id,)).fetchone()[0] == 0


def test_feedback_api_and_export(server, client, tmp_path):
    url = server[0]
    a = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=1.0, seed=1)
    b = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=1.0, seed=2)
    ok = [httpx.post(url + "/v1/feedback", json=j) for j in (
        {"completion_id": a.id, "rating": 1},
        {"completion_id": b.id, "rating": -1, "comment": "off topic"},
        {"completion_id": b.id, "correction": "The fox is quick and brown."},
        {"completion_id": a.id, "preferred": a.id, "rejected": b.id},
    )]
    assert [r.status_code for r in ok] == [200] * 4
    bad = httpx.post(url + "/v1/feedback", json={"completion_id": a.id, "rating": 7, "rating_scale": "thumbs"})
    assert bad.status_code == 422 and bad.json()["error"]["message"]
    assert httpx.post(url + "/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1}).status_code == 404
    listed = httpx.get(url + "/v1/feedback", params={"completion_id": b.id}).json()
    assert {r["comment"] for r in listed["data"]} >= {"off topic"}
    from genlab.feedback.store import FeedbackStore

    with FeedbackStore(server[1]) as store:
        dpo = store.dataset("dpo")
    pair = next(r for r in dpo if r.get("source") == "ab" and r["completion_id"] == a.id)
    assert pair["chosen"] == [{"role": "assistant", "content": a.choices[0].message.content}]
    assert pair["rejected"] == [{"role": "assistant", "content": b.choices[0].message.content}]
    assert pair["prompt"] == CHAT
    import subprocess
    import sys

    out = tmp_path / "dpo.jsonl"
    r = subprocess.run([sys.executable, "-m", "genlab.cli", "feedback", "export", out, "--db", server[1], "--format", "dpo"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == dpo
    r = subprocess.run([sys.executable, "-m", "genlab.cli", "feedback", "list", "--db", server[1]], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "off topic" in r.stdout


def test_keys_file_holds_only_hashes(tmp_path):
    import subprocess
    import sys

    from genlab.serve.auth import KeyRing

    r = subprocess.run([sys.executable, "-m", "genlab.cli", "keys", "create", "carol", "--file", tmp_path / "keys.txt"],
                       capture_output=True, text=True, timeout=120)
    key = r.stdout.strip()
    assert r.returncode == 0 and key.startswith("gl-") and key not in (tmp_path / "keys.txt").read_text()
    ring = KeyRing.load(file=tmp_path / "keys.txt")
    assert ring.user(f"Bearer {key}") == "carol" and ring.user("Bearer gl-wrong") is None and ring.user(None) is None


def test_embeddings(client):
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=["the cat sat on the mat", "a cat was sitting on a rug",
                                                                  "quarterly revenue grew by 4%"])
    import numpy as np

    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="x")


def test_http_limits_auth_and_no_filesystem_paths(model, tmp_path, caplog):
    key = "gl-secret-test-key-123"
    app = create_app(model, ServeConfig(db=tmp_path / "fb.db", api_keys=[f"alice={key}"], max_body_bytes=2000,
                                        slots=2, max_queue=1))
    with running(app) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-0000", max_retries=0)
        r = good.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        fb = httpx.post(url + "/v1/feedback", json={"completion_id": r.id, "rating": 1},
                        headers={"Authorization": f"Bearer {key}"}).json()
        assert fb["user"] == "alice"
        big = httpx.post(url + "/v1/chat/completions", content=b"x" * 5000, headers={"Authorization": f"Bearer {key}"})
        assert big.status_code == 413
        for path in ("/static/..%2F..%2Fapp.py", "/static/app.py", "/static/%2Fetc%2Fpasswd", "/../pyproject.toml"):
            assert httpx.get(url + path).status_code == 404
        assert "access-control-allow-origin" not in httpx.options(url + "/v1/models", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}).headers
        # a full queue answers 503 with Retry-After
        statuses = []

        def hammer():
            resp = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 200, "n": 2,
                                                              "stop": ["\u0000never"]},
                              headers={"Authorization": f"Bearer {key}"}, timeout=60)
            statuses.append((resp.status_code, resp.headers.get("retry-after")))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (503, "1") in statuses and (200, None) in statuses
    assert key not in caplog.text


def test_sequential_engine_matches_batching(model, tmp_path):
    app = create_app(model, ServeConfig(db=tmp_path / "fb.db", engine="sequential"))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=16, temperature=0, stream=True) if ch.choices)
    expected = model.generate(CHAT, max_new_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected.text == streamed


def test_sigkill_under_load_loses_nothing_acknowledged(folder, tmp_path):
    """Every completion and feedback row a client got a 200 for survives kill -9 of the server."""
    import signal
    import subprocess
    import sys

    from genlab.feedback.store import FeedbackStore
    from servers import free_port, wait_healthy

    key, db, port = "gl-kill-test-key-42", tmp_path / "fb.db", free_port()
    cmd = [sys.executable, "-m", "genlab.cli", "serve", str(folder), "--port", str(port), "--db", str(db),
           "--api-key", f"bob={key}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    acked, feedback, stop = {}, [], threading.Event()

    def user(u):
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"user {u} turn {i}"}],
                                              max_tokens=24, temperature=1.0, seed=i)
                acked[r.id] = r.choices[0].message.content
                f = httpx.post(url + "/v1/feedback", json={"completion_id": r.id, "rating": 1 if i % 2 else -1},
                               headers={"Authorization": f"Bearer {key}"}, timeout=20)
                if f.status_code == 200:
                    feedback.append(f.json()["id"])
            except (openai.APIError, httpx.HTTPError):
                pass

    threads = [threading.Thread(target=user, args=(u,)) for u in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while (len(acked) < 12 or len(feedback) < 6) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-traffic: requests are in flight
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    log = proc.stdout.read()
    assert len(acked) >= 12 and len(feedback) >= 6
    with FeedbackStore(db) as store:
        for cid, text in acked.items():
            row = store.get_completion(cid)
            assert row is not None and row["choices"][0]["text"] == text and row["user"] == "bob"
        ids = {r["id"] for r in store.list_feedback(limit=10_000)}
    assert set(feedback) <= ids
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # restart on the same db
    try:
        wait_healthy(url, proc)
        listed = httpx.get(url + "/v1/feedback", headers={"Authorization": f"Bearer {key}"}).json()
        assert listed["total"] >= len(feedback)
    finally:
        proc.terminate()
        log += proc.communicate(timeout=30)[0]
    assert key not in log  # keys never reach the logs


def test_rag_through_the_api(model, tmp_path):
    from genlab.rag.indexer import index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fox.md").write_text("# Foxes\n\nThe red fox is quick and brown; it jumps over lazy dogs at dawn.")
    (docs / "co2.md").write_text("# Climate\n\nMauna Loa measured 315.7 ppm of CO2 in 1958 and 422.8 ppm in 2024.")
    (docs / "trials.md").write_text("# Trials\n\nPatients were randomised to treatment or placebo; mortality was the endpoint.")
    index([docs], tmp_path / "store")
    app = create_app(model, ServeConfig(db=tmp_path / "fb.db", store=tmp_path / "store"))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny", "tiny+docs"]
        question = [{"role": "user", "content": "How much CO2 did Mauna Loa measure in 1958?"}]
        r = c.chat.completions.create(model="tiny+docs", messages=question, max_tokens=10, temperature=0)
        sources = r.model_extra["sources"]
        assert sources[0]["path"].endswith("co2.md") and sources[0]["n"] == 1
        assert set(r.choices[0].model_extra["citations"]) == {"cited", "invalid"}
        same = c.chat.completions.create(model="tiny", messages=question, max_tokens=10, temperature=0,
                                         extra_body={"rag": True})
        assert same.choices[0].message.content == r.choices[0].message.content
        chunks = list(c.chat.completions.create(model="tiny+docs", messages=question, max_tokens=10, temperature=0,
                                                stream=True))
        assert chunks[-1].model_extra["sources"] == sources
    with sqlite3.connect(tmp_path / "fb.db") as db:
        prompt, stored = db.execute("SELECT prompt, sources FROM completions WHERE id = ?", (r.id,)).fetchone()
    assert "[1]" in prompt and "315.7 ppm" in prompt and json.loads(stored) == sources


def test_adapters_per_request_in_one_server(folder, tmp_path):
    """Requests for the base and for an adapter, sent together, each get their own model's output."""
    import torch

    from genlab.model.adapters import add_lora, save_adapter

    base = genlab.load(folder)
    peft = add_lora(base.module, r=4, targets=["q_proj", "v_proj"], seed=1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a no-op adapter (B = 0) would not show that it is applied
    save_adapter(peft, tmp_path / "shouty", folder)
    model = genlab.load(folder, adapters={"shouty": tmp_path / "shouty"})
    expected = {name: model.generate(CHAT, adapter=name, max_new_tokens=16, temperature=0).text
                for name in ("base", "shouty")}
    assert expected["base"] != expected["shouty"]
    app = create_app(model, ServeConfig(db=tmp_path / "fb.db"))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny", "tiny:shouty"]
        got = {}

        def ask(key, kw):
            r = c.chat.completions.create(messages=CHAT, max_tokens=16, temperature=0, **kw)
            got.setdefault(key, []).append(r.choices[0].message.content)

        calls = [("base", dict(model="tiny", extra_body={"adapter": "base"})), ("shouty", dict(model="tiny:shouty")),
                 ("shouty", dict(model="tiny")),  # the first adapter loaded is the default
                 ("base", dict(model="tiny", extra_body={"adapter": "base"}))] * 2
        threads = [threading.Thread(target=ask, args=call) for call in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got["base"] == [expected["base"]] * 4 and got["shouty"] == [expected["shouty"]] * 4
    with sqlite3.connect(tmp_path / "fb.db") as db:
        versions = dict(db.execute("SELECT adapter, model_version FROM completions").fetchall())
    assert versions["shouty"].startswith(versions["base"] + "+shouty@") and len(versions["base"]) == 12

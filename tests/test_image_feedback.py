"""Feedback on generated images: the images endpoint records every image with its token ids, the
feedback API takes thumbs and A/B choices on them, DPO on image token sequences moves the
likelihood margin of the preferred images, `improve_images` gates and registers a candidate, and
a v1 feedback database upgrades to v2 keeping its rows."""

from __future__ import annotations

import base64
import io
import json
import sqlite3

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from genlab.codecs.image import ImageCodecConfig, ImageTokenizer
from genlab.errors import InvalidParameterError
from genlab.feedback.store import FeedbackStore
from genlab.image.codec import EOS, CaptionVocab, TextImageCodec
from genlab.image.feedback import (
    ImagePreferConfig, improve_images, load_version, sequence_logprobs, tokens_of, train_image_preferences,
)
from genlab.model import io as model_io
from genlab.model.transformer import ModelConfig, Transformer
from genlab.serve.app import ServeConfig, create_app

CAPTIONS = ["a cat", "a cat wearing sunglasses", "a small cat next to a tree", "a red circle", "a sun above a tree"]


def tiny_image_model(folder):
    """A random 2-layer text-to-image model over an untrained image tokenizer (valid codes all the same)."""
    torch.manual_seed(0)
    codec = TextImageCodec(CaptionVocab.train(CAPTIONS), ImageTokenizer(ImageCodecConfig(width=16, blocks=0)))
    cfg = ModelConfig(vocab_size=len(codec), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=codec.max_length, tie_embeddings=True)
    meta = {"codec": codec.to_dict(), "model_config": cfg.to_dict()}
    return model_io.save(folder, Transformer(cfg).init_weights(0), codec, meta=meta,
                         generation={"guidance": 2.0, "temperature": 1.0})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_image_model(tmp_path_factory.mktemp("img-fb") / "t2i")


@pytest.fixture
def client(model_dir, tmp_path):
    app = create_app(None, ServeConfig(image_model=model_dir, db=tmp_path / "fb.db"))
    with TestClient(app) as c:
        yield c, tmp_path / "fb.db"


def test_images_round_trip_recorded_with_token_ids_and_feedback(client, model_dir):
    c, db = client
    r = c.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "seed": 5, "size": "32x32"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [5, 6] and body["ignored_words"] == []
    from PIL import Image

    pictures = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in body["data"]]
    assert all(p.shape == (32, 32, 3) for p in pictures)
    model = load_version(model_dir)
    codes = model.generate_codes(["a cat"], n=2, seed=5)  # same seed: the same images, rebuilt from their codes
    with FeedbackStore(db) as store:
        recs = [store.get_completion(d["id"]) for d in body["data"]]
    assert [rc["endpoint"] for rc in recs] == ["images", "images"] and recs[0]["prompt"] == "a cat"
    for rec, code, picture in zip(recs, codes, pictures):
        ids = rec["choices"][0]["token_ids"]
        assert ids == tokens_of(model.codec, code) and len(ids) == 65 and ids[-1] == EOS
        np.testing.assert_array_equal(model.codec.image.decode(code.reshape(1, 8, 8))[0], picture)
    a, b = (d["id"] for d in body["data"])
    assert c.post("/v1/feedback", json={"completion_id": a, "rating": 1}).status_code == 200
    assert c.post("/v1/feedback", json={"completion_id": b, "rating": -1}).status_code == 200
    assert c.post("/v1/feedback", json={"completion_id": a, "preferred": a, "rejected": b}).status_code == 200
    with FeedbackStore(db) as store:
        assert store.image_dataset("dpo") == [{"prompt": "a cat", "chosen": recs[0]["choices"][0]["token_ids"],
                                               "rejected": recs[1]["choices"][0]["token_ids"], "completion_id": a}]
        assert [row["label"] for row in store.image_dataset("kto")] == [True, False]
        assert store.dataset("dpo") == [] and store.dataset("kto") == []  # text datasets leave images out
    models = c.get("/v1/models").json()["data"]
    assert models == [{**models[0], "id": "t2i", "modality": "image"}]


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "a cat", "n": 0}, 422, "n"),
    ({"prompt": "a cat", "size": "1024x1024"}, 422, "size"),
    ({"prompt": "a cat", "response_format": "url"}, 422, "b64_json"),
    ({"prompt": "zebra unicorn"}, 422, "knows none of its words"),
    ({"prompt": "a cat", "model": "dall-e-3"}, 404, "dall-e-3"),
    ({"prompt": "a cat", "guidance": -1}, 422, "guidance"),
])
def test_bad_image_requests_get_one_clear_error(client, body, status, field):
    c, db = client
    r = c.post("/v1/images/generations", json=body)
    assert r.status_code == status and field in r.json()["error"]["message"], r.text
    with FeedbackStore(db) as store:
        assert store.count_completions() == 0


def test_ab_between_images_of_different_captions_is_refused(client):
    c, _ = client
    a = c.post("/v1/images/generations", json={"prompt": "a cat", "seed": 1}).json()["data"][0]["id"]
    b = c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 1}).json()["data"][0]["id"]
    r = c.post("/v1/feedback", json={"completion_id": a, "preferred": a, "rejected": b})
    assert r.status_code == 422 and "different prompts" in r.json()["error"]["message"]


def toy_pairs(model_dir, n=24):
    """Pairs whose chosen image has code 7 in its first 16 cells and the rejected one code 900: a
    preference the random model does not have."""
    codec = load_version(model_dir).codec
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        codes = rng.integers(0, 1000, 64)
        good, bad = codes.copy(), codes.copy()
        good[:16], bad[:16] = 7, 900
        rows.append({"prompt": CAPTIONS[i % 3], "chosen": tokens_of(codec, good), "rejected": tokens_of(codec, bad)})
    return rows


def margins(model, rows) -> np.ndarray:
    caps = [r["prompt"] for r in rows]
    with torch.no_grad():
        return (sequence_logprobs(model.module, model.codec, caps, [r["chosen"] for r in rows])
                - sequence_logprobs(model.module, model.codec, caps, [r["rejected"] for r in rows])).numpy()


def test_dpo_on_image_sequences_raises_the_preferred_margin(model_dir, tmp_path, one_torch_thread):
    rows = toy_pairs(model_dir)
    train, held = rows[:16], rows[16:]
    out = train_image_preferences(model_dir, train, tmp_path / "cand", "dpo",
                                  ImagePreferConfig(epochs=6, batch_size=8, lr=5e-3))
    assert out["losses"][-1] < out["losses"][0] < 0.7  # starts at log 2 (policy = reference)
    before, after = margins(load_version(model_dir), held), margins(load_version(model_dir, out["adapter"]), held)
    assert (after > before + 1.0).all(), (before, after)  # unseen pairs of the same kind: the preference generalises


def test_dpo_refuses_sequences_that_are_not_this_models_images(model_dir, tmp_path):
    rows = toy_pairs(model_dir, 2)
    rows[1]["rejected"] = rows[1]["rejected"][:-1]
    with pytest.raises(InvalidParameterError, match="pair 1: rejected"):
        train_image_preferences(model_dir, rows, tmp_path / "c")


def toy_ratings(model_dir, n=24):
    """Each toy pair as two rated images: the chosen one good, the rejected one bad."""
    return [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in toy_pairs(model_dir, n) for key in ("chosen", "rejected")]


def test_kto_on_rated_images_learns_the_preference_from_thumbs_alone(model_dir, tmp_path, one_torch_thread):
    rows = toy_ratings(model_dir)
    out = train_image_preferences(model_dir, rows[:32], tmp_path / "cand", "kto",
                                  ImagePreferConfig(epochs=6, batch_size=8, lr=5e-3))
    assert out["losses"][-1] < out["losses"][0]
    held = toy_pairs(model_dir)[16:]  # the same 8 pairs as rows[32:], as pairs
    base, tuned = load_version(model_dir), load_version(model_dir, out["adapter"])
    before, after = margins(base, held), margins(tuned, held)
    assert (after > before + 1.0).all(), (before, after)
    caps = [r["prompt"] for r in held]
    with torch.no_grad():  # on average good images became likelier, bad ones less likely than under the reference
        good = [sequence_logprobs(m.module, m.codec, caps, [r["chosen"] for r in held]) for m in (base, tuned)]
        bad = [sequence_logprobs(m.module, m.codec, caps, [r["rejected"] for r in held]) for m in (base, tuned)]
    assert (good[1] - good[0]).mean() > 0 > (bad[1] - bad[0]).mean()


def test_kto_refuses_ratings_that_are_all_good_and_tiny_batches(model_dir, tmp_path):
    rows = [r for r in toy_ratings(model_dir, 4) if r["label"]]
    with pytest.raises(InvalidParameterError, match="both good and bad"):
        train_image_preferences(model_dir, rows, tmp_path / "c", "kto")
    with pytest.raises(InvalidParameterError, match="batch_size >= 2"):
        train_image_preferences(model_dir, toy_ratings(model_dir, 4), tmp_path / "c", "kto", ImagePreferConfig(batch_size=1))
    with pytest.raises(InvalidParameterError, match="dpo, kto"):
        train_image_preferences(model_dir, rows, tmp_path / "c", "orpo")
    # thumbs are many more rows than pairs: KTO's defaults take far fewer passes, at a lower rate
    assert ImagePreferConfig().resolved("kto").epochs == 0.25 and ImagePreferConfig().resolved("dpo").epochs == 4
    assert ImagePreferConfig(epochs=1.0, lr=3e-3).resolved("kto").epochs == 1.0


def test_improve_images_with_thumbs_only_runs_kto_and_promotes(model_dir, tmp_path, one_torch_thread):
    from genlab.feedback.store import ChoiceRecord, CompletionRecord, new_completion_id

    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        for i, row in enumerate(toy_ratings(model_dir, 40)):
            cid = new_completion_id("img")
            prompt = f"{row['prompt']} {i // 2}"  # 40 prompts, each with a good and a bad image
            store.record_all([CompletionRecord(cid, "images", "t2i", prompt,
                                               [ChoiceRecord(0, "", "stop", 65, token_ids=row["completion"])])])
            store.add_feedback(cid, rating=1 if row["label"] else -1, rating_scale="thumbs")
    report = improve_images(model_dir, db, out_dir=tmp_path / "runs",
                            prefer=ImagePreferConfig(epochs=4, batch_size=8, lr=5e-3))
    assert report.method == "kto" and report.metrics["heldout_pairs"] == 0
    assert report.metrics["heldout_rated"] >= 8 and report.metrics["pref_accuracy"] >= 0.9, report.metrics
    assert report.promoted, report.reasons
    written = json.loads((report.out_dir / "report.json").read_text())
    assert written["method"] == "kto" and written["version"]["name"] == "v2"


def test_improve_images_promotes_a_winner_and_serves_it(model_dir, tmp_path, one_torch_thread):
    from genlab.feedback.registry import Registry
    from genlab.feedback.store import ChoiceRecord, CompletionRecord, new_completion_id

    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        for i, row in enumerate(toy_pairs(model_dir, 40)):
            prompt = f"{CAPTIONS[i % 3]} {i}"  # 40 prompts: a quarter held out by the prompt hash
            ids = [new_completion_id("img") for _ in range(2)]
            store.record_all([CompletionRecord(cid, "images", "t2i", prompt, [ChoiceRecord(0, "", "stop", 65, token_ids=t)])
                              for cid, t in zip(ids, (row["chosen"], row["rejected"]))])
            store.add_feedback(ids[0], preferred=ids[0], rejected=ids[1])
    report = improve_images(model_dir, db, out_dir=tmp_path / "runs",
                            prefer=ImagePreferConfig(epochs=4, batch_size=8, lr=5e-3))
    assert report.metrics["heldout_pairs"] >= 4 and report.metrics["pref_accuracy"] >= 0.9
    assert report.promoted, report.reasons
    written = json.loads((report.out_dir / "report.json").read_text())
    assert written["promoted"] and written["method"] == "dpo" and written["version"]["name"] == "v2"
    assert written["previous"]["name"] == "v1" and written["metrics"] == report.metrics
    assert len(written["losses"]) == 15 and written["losses"][-1] < written["losses"][0]  # ceil(4 * 30 / 8) steps
    assert (report.out_dir / "gate.png").stat().st_size > 0
    with Registry(tmp_path / "image-registry.db") as reg:
        assert reg.current()["name"] == "v2" and reg.current()["adapter"] == str(report.version["adapter"])
    app = create_app(None, ServeConfig(image_model=model_dir, image_registry=tmp_path / "image-registry.db",
                                       db=tmp_path / "serve.db"))
    with TestClient(app) as c:
        assert c.get("/health").json()["image_version"] == "v2"
        r = c.post("/v1/images/generations", json={"prompt": "a cat", "seed": 3})
        with FeedbackStore(tmp_path / "serve.db") as store:
            assert store.get_completion(r.json()["data"][0]["id"])["model_version"] == "v2"


def test_v1_database_upgrades_keeping_its_rows(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE completions (id TEXT PRIMARY KEY, created REAL NOT NULL,
            endpoint TEXT NOT NULL CHECK (endpoint IN ('chat', 'completions')), model TEXT NOT NULL, adapter TEXT,
            model_version TEXT, user TEXT, request TEXT NOT NULL, messages TEXT, prompt TEXT NOT NULL,
            params TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, latency_ms REAL, sources TEXT);
        CREATE TABLE choices (completion_id TEXT NOT NULL REFERENCES completions(id), idx INTEGER NOT NULL,
            text TEXT NOT NULL, finish_reason TEXT, tokens INTEGER, PRIMARY KEY (completion_id, idx));
        CREATE TABLE feedback (id INTEGER PRIMARY KEY, created REAL NOT NULL,
            completion_id TEXT NOT NULL REFERENCES completions(id), choice INTEGER NOT NULL DEFAULT 0,
            rating INTEGER, rating_scale TEXT CHECK (rating_scale IN ('thumbs', 'stars')), correction TEXT,
            comment TEXT, preferred TEXT REFERENCES completions(id), rejected TEXT REFERENCES completions(id), user TEXT);
        INSERT INTO completions VALUES ('c1', 1.0, 'completions', 'm', NULL, NULL, NULL, '{}', NULL, 'Q', '{}',
                                        1, 2, 3.0, NULL);
        INSERT INTO choices VALUES ('c1', 0, 'an answer', 'stop', 2);
        INSERT INTO feedback (created, completion_id, choice, rating, rating_scale) VALUES (2.0, 'c1', 0, 1, 'thumbs');
        PRAGMA user_version=1;
    """)
    conn.close()
    with FeedbackStore(db) as store:
        assert store.get_completion("c1")["choices"] == [{"idx": 0, "text": "an answer", "finish_reason": "stop",
                                                          "tokens": 2}]
        assert store.dataset("kto") == [{"prompt": "Q", "completion": "an answer", "label": True, "completion_id": "c1"}]
        store.add_feedback("c1", rating=-1)  # the feedback table still points at the rebuilt completions
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 2


def test_simulated_image_user_rates_every_image_and_picks_only_clear_winners(model_dir, tmp_path):
    """Thumbs by the judge's `liked` bar on every image; an A/B choice of the best over the worst
    image only when their scores differ by at least `margin` (a wider margin: fewer pairs)."""
    from genlab.feedback.simulate import SimulatedImageUser
    from genlab.serve.app import background

    def brightness(captions, images):  # a judge that likes bright images
        return [float(im.mean()) / 255 for im in np.asarray(images)]

    db = tmp_path / "fb.db"
    with background(create_app(None, ServeConfig(image_model=model_dir, db=db))) as url:
        narrow = SimulatedImageUser(url, brightness, seed=1, n=3, liked=0.484, margin=0.0).session(["a cat"] * 4)
        wide = SimulatedImageUser(url, brightness, seed=2, n=3, liked=0.484, margin=2.0).session(["a cat"] * 4)
    assert narrow.exchanges == narrow.ratings == wide.ratings == 12
    assert (narrow.ab_choices, narrow.ties, wide.ab_choices, wide.ties) == (4, 0, 0, 4)  # scores never differ by 2
    model = load_version(model_dir)
    with FeedbackStore(db) as store:
        pairs = store.image_dataset("dpo")
        rated = store.image_dataset("kto")
    assert len(pairs) == 4 and len(rated) == 24 and {r["label"] for r in rated} == {True, False}
    for row in pairs:  # the chosen image is the brighter one
        chosen, rejected = (model.codec.image.decode((np.array(row[k][:-1]) - model.codec.image_offset)
                                                     .reshape(1, *model.codec.image.grid)) for k in ("chosen", "rejected"))
        assert chosen.mean() > rejected.mean()
    for row in rated:
        image = model.codec.image.decode((np.array(row["completion"][:-1]) - model.codec.image_offset)
                                         .reshape(1, *model.codec.image.grid))
        assert row["label"] == (image.mean() / 255 >= 0.484)

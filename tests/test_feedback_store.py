"""FeedbackStore: recording, validation, durability, concurrency and TRL-format exports."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading

import pytest

from genlab.errors import DataError, InvalidParameterError
from genlab.feedback.store import ChoiceRecord, CompletionRecord, FeedbackStore, new_completion_id

FRANCE = [{"role": "user", "content": "Capital of France?"}]
CAT = [{"role": "user", "content": "Spell cat"}]


def A(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def rec(id: str, prompt: str = "2+2=", texts: tuple[str, ...] = (" 4",), messages: list | None = None, **kw):
    return CompletionRecord(id=id, endpoint="chat" if messages is not None else "completions", model="tiny",
                            prompt=prompt, messages=messages,
                            choices=[ChoiceRecord(i, t, "stop", 2) for i, t in enumerate(texts)], **kw)


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "fb" / "feedback.db") as s:
        yield s


def test_new_completion_id():
    ids = {new_completion_id() for _ in range(100)}
    assert len(ids) == 100
    for i in ids:
        prefix, rest = i.split("-", 1)
        assert prefix == "chatcmpl" and len(rest) == 24
        assert set(rest) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert new_completion_id("cmpl").startswith("cmpl-")


def test_record_get_roundtrip(store):
    r = rec("chat-1", prompt="<|user|>Capital of France?<|assistant|>", texts=("Paris.", "Lyon."), messages=FRANCE,
            request={"model": "tiny", "messages": FRANCE, "n": 2}, params={"temperature": 0.7, "top_p": 0.9},
            adapter="lora-a", model_version="v3", user="ana", sources=[{"doc": "fr.md", "score": 0.8}],
            prompt_tokens=12, completion_tokens=4, latency_ms=31.5, created=1000.0)
    store.record(r)
    got = store.get_completion("chat-1")
    assert got == {
        "id": "chat-1", "created": 1000.0, "endpoint": "chat", "model": "tiny", "adapter": "lora-a",
        "model_version": "v3", "user": "ana", "request": {"model": "tiny", "messages": FRANCE, "n": 2},
        "messages": FRANCE, "prompt": "<|user|>Capital of France?<|assistant|>",
        "params": {"temperature": 0.7, "top_p": 0.9}, "prompt_tokens": 12, "completion_tokens": 4,
        "latency_ms": 31.5, "sources": [{"doc": "fr.md", "score": 0.8}],
        "choices": [{"idx": 0, "text": "Paris.", "finish_reason": "stop", "tokens": 2},
                    {"idx": 1, "text": "Lyon.", "finish_reason": "stop", "tokens": 2}],
    }
    store.record(rec("plain-1"))
    plain = store.get_completion("plain-1")
    assert plain["endpoint"] == "completions" and plain["messages"] is None and plain["sources"] is None
    assert store.get_completion("nope") is None
    assert store.count_completions() == 2 and store.count_feedback() == 0


@pytest.mark.parametrize("bad, match", [
    (dict(endpoint="embeddings"), "endpoint"),
    (dict(endpoint="chat", messages=None), "messages"),
    (dict(choices=[]), "no choices"),
])
def test_record_rejects_bad_records(store, bad, match):
    r = rec("x")
    for k, v in bad.items():
        setattr(r, k, v)
    with pytest.raises(InvalidParameterError, match=match):
        store.record(r)
    assert store.count_completions() == 0


def test_record_duplicate_id_is_rolled_back(store):
    store.record(rec("x"))
    with pytest.raises(InvalidParameterError, match="cannot record completion x"):
        store.record(rec("x", prompt="other"))
    assert store.get_completion("x")["prompt"] == "2+2=" and store.count_completions() == 1


def test_durable_across_reopen(tmp_path):
    path = tmp_path / "feedback.db"
    with FeedbackStore(path) as s:
        s.record(rec("c1"))
        row = s.add_feedback("c1", rating=1, user="bob")
    with FeedbackStore(path) as s:
        assert s.get_completion("c1")["choices"][0]["text"] == " 4"
        assert s.list_feedback() == [{**row, "endpoint": "completions", "model": "tiny", "prompt": "2+2=",
                                      "messages": None, "choice_text": " 4"}]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2  # 2: image generations
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_second_process_reads_while_open(store):
    store.record(rec("c1"))
    store.add_feedback("c1", rating=-1)
    script = (
        "import json, sqlite3, sys\n"
        "from genlab.feedback.store import FeedbackStore\n"
        "con = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
        "raw = con.execute('SELECT rating FROM feedback').fetchall()\n"
        "with FeedbackStore(sys.argv[1]) as s:\n"
        "    print(json.dumps([raw, s.count_completions(), s.get_completion('c1')['prompt']]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(store.path)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[[-1]], 1, "2+2="]
    store.record(rec("c2"))  # the first connection still writes after the reader has gone
    assert store.count_completions() == 2


@pytest.fixture
def abc(store):
    """a (two choices) and b answer "2+2="; c answers another prompt."""
    store.record(rec("a", texts=(" 4", " four")))
    store.record(rec("b", texts=(" 5",)))
    store.record(rec("c", prompt="3+3=", texts=(" 6",)))
    return store


@pytest.mark.parametrize("kwargs, scale", [
    (dict(rating=1), "thumbs"), (dict(rating=-1), "thumbs"), (dict(rating=1, rating_scale="stars"), "stars"),
    (dict(rating=4), "stars"), (dict(rating=2), "stars"), (dict(rating=5, rating_scale="stars"), "stars"),
    (dict(rating=-1, rating_scale="thumbs"), "thumbs"), (dict(comment="x" * 10_000), None),
    (dict(correction="y" * 100_000, choice=1), None), (dict(preferred="a", rejected="b"), None),
    (dict(preferred="b", rejected="a"), None),
])
def test_valid_feedback_is_stored(abc, kwargs, scale):
    row = abc.add_feedback("a", user="u", **kwargs)
    assert row["rating_scale"] == scale and row["completion_id"] == "a" and row["user"] == "u"
    for k, v in kwargs.items():
        if k != "rating_scale":
            assert row[k] == v
    assert abc.list_feedback(completion_id="a")[0]["id"] == row["id"] and abc.count_feedback() == 1


@pytest.mark.parametrize("cid, kwargs, exc, match", [
    ("zzz", dict(rating=1), LookupError, "unknown completion_id 'zzz'"),
    ("a", dict(rating=1, choice=2), InvalidParameterError, "choice 2 does not exist"),
    ("a", dict(rating=1, choice=True), InvalidParameterError, "choice must be an integer"),
    ("a", dict(), InvalidParameterError, "at least one of rating"),
    ("a", dict(user="u"), InvalidParameterError, "at least one of rating"),
    ("a", dict(rating=0), InvalidParameterError, "rating must be 1..5"),
    ("a", dict(rating=6), InvalidParameterError, "rating must be 1..5"),
    ("a", dict(rating=-2), InvalidParameterError, "rating must be 1..5"),
    ("a", dict(rating=2, rating_scale="thumbs"), InvalidParameterError, "rating must be -1 or 1"),
    ("a", dict(rating=0, rating_scale="thumbs"), InvalidParameterError, "rating must be -1 or 1"),
    ("a", dict(rating=-1, rating_scale="stars"), InvalidParameterError, "rating must be 1..5"),
    ("a", dict(rating=6, rating_scale="stars"), InvalidParameterError, "rating must be 1..5"),
    ("a", dict(rating=True), InvalidParameterError, "rating must be an integer"),
    ("a", dict(rating=4.0), InvalidParameterError, "rating must be an integer"),
    ("a", dict(rating=1, rating_scale="likert"), InvalidParameterError, "rating_scale must be"),
    ("a", dict(rating_scale="stars", comment="x"), InvalidParameterError, "rating_scale given without"),
    ("a", dict(correction=""), InvalidParameterError, "correction must be a non-empty string"),
    ("a", dict(correction="  \n"), InvalidParameterError, "correction must be a non-empty string"),
    ("a", dict(correction=42), InvalidParameterError, "correction must be a non-empty string"),
    ("a", dict(correction="y" * 100_001), InvalidParameterError, "correction is longer than 100000"),
    ("a", dict(comment="x" * 10_001), InvalidParameterError, "comment is longer than 10000"),
    ("a", dict(comment=" "), InvalidParameterError, "comment must be a non-empty string"),
    ("a", dict(preferred="a"), InvalidParameterError, "preferred and rejected must be given together"),
    ("a", dict(rejected="b"), InvalidParameterError, "preferred and rejected must be given together"),
    ("a", dict(preferred="a", rejected="a"), InvalidParameterError, "must be different"),
    ("a", dict(preferred="b", rejected="c"), InvalidParameterError, "must be the rated completion a"),
    ("a", dict(preferred="a", rejected="zzz"), LookupError, "unknown completion_id 'zzz'"),
    ("a", dict(preferred="zzz", rejected="a"), LookupError, "unknown completion_id 'zzz'"),
    ("a", dict(preferred="a", rejected="c"), InvalidParameterError, "and rejected answer different prompts"),
])
def test_invalid_feedback_is_refused(abc, cid, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        abc.add_feedback(cid, **kwargs)
    assert abc.count_feedback() == 0


def test_list_feedback_newest_first_with_join(abc):
    ids = [abc.add_feedback("a", rating=1)["id"], abc.add_feedback("b", rating=-1)["id"],
           abc.add_feedback("a", choice=1, comment="meh")["id"]]
    rows = abc.list_feedback()
    assert [r["id"] for r in rows] == ids[::-1]
    assert [r["choice_text"] for r in rows] == [" four", " 5", " 4"]
    assert rows[0]["prompt"] == "2+2=" and rows[0]["comment"] == "meh" and rows[0]["endpoint"] == "completions"
    assert [r["id"] for r in abc.list_feedback(limit=1, offset=1)] == [ids[1]]
    assert [r["id"] for r in abc.list_feedback(completion_id="a")] == [ids[2], ids[0]]
    assert abc.list_feedback(completion_id="c") == []
    with pytest.raises(InvalidParameterError, match="limit"):
        abc.list_feedback(limit=0)
    with pytest.raises(InvalidParameterError, match="offset"):
        abc.list_feedback(offset=-1)


@pytest.fixture
def labelled(store):
    """A small hand-built set: A/B (twice), thumbs up/down, stars 5 and 3, corrections, duplicates."""
    s = store
    s.record(rec("c1", texts=(" 4",)))
    s.record(rec("c2", texts=(" 5",)))
    s.record(rec("c3", prompt="Hi", texts=("there",)))
    s.record(rec("h1", prompt="<u>Capital of France?<a>", texts=("Paris.",), messages=FRANCE))
    s.record(rec("h2", prompt="<u>Capital of France?<a>", texts=("Lyon.",), messages=FRANCE))
    s.record(rec("h3", prompt="<u>Spell cat<a>", texts=("kat",), messages=CAT))
    s.record(rec("h4", prompt="<u>Say ok<a>", texts=("ok",), messages=[{"role": "user", "content": "Say ok"}]))
    s.record(rec("h5", prompt="<u>Capital of France?<a>", texts=("Paris.",), messages=FRANCE))
    s.add_feedback("c1", preferred="c1", rejected="c2")
    s.add_feedback("c2", preferred="c1", rejected="c2")  # the same pair again: one dpo row
    s.add_feedback("c1", rating=1)
    s.add_feedback("c2", rating=-1)
    s.add_feedback("h1", rating=5)
    s.add_feedback("h2", rating=3)  # neutral: in no dataset
    s.add_feedback("h3", correction="cat")
    s.add_feedback("h3", correction="cat")  # duplicate correction
    s.add_feedback("h4", correction=" ok ")  # same as the answer after strip: skipped
    s.add_feedback("c3", rating=-1)
    s.add_feedback("c3", rating=1)  # the latest rating wins
    s.add_feedback("h5", rating=1)  # same prompt and answer as h1: deduplicated
    s.add_feedback("h1", comment="nice")  # a comment alone trains nothing
    return s


def test_dataset_dpo(labelled):
    assert labelled.dataset("dpo") == [
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "source": "ab", "completion_id": "c1"},
        {"prompt": CAT, "chosen": A("cat"), "rejected": A("kat"), "source": "correction", "completion_id": "h3"},
    ]


def test_dataset_kto(labelled):
    assert labelled.dataset("kto") == [
        {"prompt": "2+2=", "completion": " 4", "label": True, "completion_id": "c1"},
        {"prompt": "2+2=", "completion": " 5", "label": False, "completion_id": "c2"},
        {"prompt": FRANCE, "completion": A("Paris."), "label": True, "completion_id": "h1"},
        {"prompt": CAT, "completion": A("cat"), "label": True, "completion_id": "h3"},
        {"prompt": CAT, "completion": A("kat"), "label": False, "completion_id": "h3"},
        {"prompt": "Hi", "completion": "there", "label": True, "completion_id": "c3"},
    ]


def test_dataset_sft(labelled):
    assert labelled.dataset("sft") == [
        {"prompt": "2+2=", "completion": " 4"},
        {"messages": FRANCE + A("Paris.")},
        {"messages": CAT + A("cat")},
        {"prompt": "Hi", "completion": "there"},
    ]


def test_positive_rating_on_corrected_answer_gives_only_the_correction(store):
    store.record(rec("h", prompt="<u>Spell cat<a>", texts=("kat",), messages=CAT))
    store.add_feedback("h", rating=1)
    store.add_feedback("h", correction="cat")
    assert store.dataset("sft") == [{"messages": CAT + A("cat")}]


@pytest.mark.parametrize("kind", ["dpo", "kto", "sft"])
def test_export_writes_jsonl(labelled, tmp_path, kind):
    out = tmp_path / "exports" / f"{kind}.jsonl"
    n = labelled.export(kind, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert n == len(lines) == len(labelled.dataset(kind)) > 0
    assert [json.loads(line) for line in lines] == labelled.dataset(kind)


def test_export_empty_and_bad_kind(store, tmp_path):
    assert store.export("kto", tmp_path / "empty.jsonl") == 0
    assert (tmp_path / "empty.jsonl").read_text() == ""
    with pytest.raises(InvalidParameterError, match="dataset kind must be one of dpo, kto, sft"):
        store.dataset("orpo")
    with pytest.raises(InvalidParameterError, match="kind"):
        store.export("ppo", tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_failed_export_leaves_nothing_partial(labelled, tmp_path, monkeypatch):
    target = tmp_path / "out" / "dpo.jsonl"
    target.mkdir(parents=True)  # a directory where the file should go: the rename fails
    with pytest.raises(DataError, match="dpo.jsonl"):
        labelled.export("dpo", target)
    assert target.is_dir() and list(target.iterdir()) == []
    assert os.listdir(tmp_path / "out") == ["dpo.jsonl"]  # no temporary file left behind

    good = tmp_path / "out" / "kto.jsonl"
    labelled.export("kto", good)
    before = good.read_bytes()

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)  # fails after part of the new file is written
    labelled.record(rec("n1", prompt="new", texts=("yes",)))
    labelled.add_feedback("n1", rating=1)
    with pytest.raises(DataError, match="No space left"):
        labelled.export("kto", good)
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["dpo.jsonl", "kto.jsonl"]


def test_corrupt_file_is_a_data_error(tmp_path):
    path = tmp_path / "feedback.db"
    path.write_bytes(random.Random(0).randbytes(8192))
    with pytest.raises(DataError, match="feedback.db"):
        FeedbackStore(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "feedback.db"
    FeedbackStore(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version=3")
    con.close()
    with pytest.raises(DataError, match=r"feedback\.db.*version 3 is newer"):
        FeedbackStore(path)


def test_concurrent_feedback_loses_nothing(store):
    store.record(rec("c1", texts=(" 4", " 5")))
    errors: list[BaseException] = []

    def worker(t: int):
        try:
            for i in range(25):
                store.add_feedback("c1", choice=i % 2, rating=1 if i % 3 else -1, comment=f"t{t}-{i}")
                if i % 5 == 0:
                    store.record(rec(f"t{t}-{i}"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count_feedback() == 200 and store.count_completions() == 1 + 8 * 5
    comments = {r["comment"] for r in store.list_feedback(limit=1000)}
    assert comments == {f"t{t}-{i}" for t in range(8) for i in range(25)}


def test_closed_store_refuses_work(tmp_path):
    with FeedbackStore(tmp_path / "f.db") as s:
        s.record(rec("c1"))
    with pytest.raises(sqlite3.ProgrammingError):
        s.count_completions()

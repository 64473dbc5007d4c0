"""Music as ABC: corpus normalisation (hand-written and real music21 tunes), the header prefix,
the character n-gram baseline, a tiny tune model trained by `genlab music train`, generation
with honest parse-rate accounting, ABC / MIDI files, and the bad-input messages."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from genlab.errors import InvalidParameterError
from genlab.music.baseline import CharNgram
from genlab.music.codec import MusicSpec, check_key, check_meter, conditioning, join_tune, split_tune
from genlab.music.corpus import (
    TuneError, build_corpus, check_tune, header_prefix, in_heldout, music21_abc_files, normalise_tune, split_tunes,
)

MESSY = """% a collection preamble that belongs to no tune
I: abc2mtex

X: 12
T:The First Tune
T:also known as Another Name
R:jig
M: 6/8
C:Trad.
K: E Minor
Q:3/8=120
"Em"EGB "D"dBA|
w: la la la
%% a directive
B>AG "4"F2E|!trill!G3 A3| % a comment
P:B
|:e2e e`d`B|[P:B]dBA GFE!
[M:3/4]E2 F2 G2|]

X:13
T:Second, no L: field and a short meter
M:2/4
K:Ador
AB cd|ef ge|]

X:14
T:Two voices
M:4/4
L:1/4
V:1
K:G
GABc|
"""

BODY = {"6/8": "|:DFA dAF|GBd gdB|AFD EFG|1 FDD D3:|2 FDD D2A||", "3/4": "|:D2 F2 A2|d4 A2|G2 B2 d2|1 A6:|2 D6|]",
        "2/4": "|:DF AF|GB dB|AF ED|1 D2 D2:|2 D4|]", "4/4": "|:DEFG A2 d2|BAGF E4|1 D8:|2 D4 z4|]"}
TOY_KEYS = ["D", "G", "A", "C", "F", "Em", "Am", "Bb"]


def genlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "genlab.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)


def test_messy_file_splits_and_normalises():
    raw = split_tunes(MESSY)
    assert len(raw) == 3 and raw[0].startswith("X: 12") and "preamble" not in "".join(raw)
    first = normalise_tune(raw[0])
    # canonical header order M, L, K; L: from ABC's default (6/8 >= 3/4 -> 1/8); the mode spelled short
    assert first.startswith("M:6/8\nL:1/8\nK:Em\n")
    for dropped in ("T:", "C:", "R:", "Q:", "w:", "words", "%", '"', "P:", "Trad", "`"):
        assert dropped not in first, dropped
    assert "!trill!" in first  # a decoration stays; a lone "!" (old line break) goes
    assert first.split("\n")[3:] == ["EGB dBA|", "B>AG F2E|!trill!G3 A3|", "|:e2e edB|dBA GFE", "[M:3/4]E2 F2 G2|]"]
    second = normalise_tune(raw[1])
    assert second == "M:2/4\nL:1/16\nK:Ador\nAB cd|ef ge|]"  # 2/4 < 3/4 -> L:1/16
    with pytest.raises(TuneError, match="voices"):
        normalise_tune(raw[2])
    for bad, why in [("X:1\nM:6/8\nK:H\nabc", "key"), ("X:1\nM:7/7\nK:D\nabc", "meter"), ("X:1\nM:6/8\nabc|", "before the K"),
                     ("X:1\nM:6/8\nK:D\n|: :|", "no notes")]:
        with pytest.raises(TuneError, match=why):
            normalise_tune(bad)


def test_real_corpus_tunes_normalise_and_parse(tmp_path):
    files = {f.name: f for f in music21_abc_files()}
    assert len(files) > 1000  # music21 ships the ABC corpus: no download
    reel = files["7thRegimentReel.abc"]
    tune = normalise_tune(split_tunes(reel.read_text(encoding="utf-8"))[0])
    assert tune.startswith("M:2/4\nL:1/16\nK:A\nvA2(Ac) eAce |")  # Ryan's fingerings ("4", "0") are gone
    assert '"' not in tune and "Contributed" not in tune
    check = check_tune(tune)
    assert check.ok and check.notes > 50 and check.measures >= 16 and check.error is None
    corpus = build_corpus([reel, files["AWillieWeHaveMissdYouStrathspey.abc"], reel], heldout_fraction=0.4, log=lambda m: None)
    r = corpus.report
    assert (r["tunes_found"], r["tunes_kept"], r["dropped"]) == (3, 2, {"duplicate": 1})
    assert len(corpus.train) + len(corpus.heldout) == 2 and r["collections"] == {"ryansMammoth": 2}
    assert all(in_heldout(t, 0.4) for t in corpus.heldout) and not any(in_heldout(t, 0.4) for t in corpus.train)


def test_music21_leniency_is_not_counted_as_parsing():
    header = header_prefix("D", "6/8", "1/8")
    assert check_tune(header + "dfa afd|gfe dcB:|").ok
    garbage = check_tune(header + "qqq zz )))")  # music21 parses it, guessing pitches, with a warning
    assert not garbage.ok and "warning" in garbage.error
    broken = check_tune(header + "[[[((((")
    assert not broken.ok and "ABCHandlerException" in broken.error
    assert not check_tune(header + "|: :|").ok  # no notes
    overfull = check_tune(header + "dfa afd d|gfe dcB|dfa afd|")
    assert overfull.ok and overfull.rebarred  # parses, but the first bar does not fit 6/8


def test_header_prefix_round_trip_and_conditioning():
    tune = header_prefix("Ador", "C|", "1/8") + "|:eA A2 eAAB|]"
    header, body = split_tune(tune)
    assert header == {"M": "C|", "L": "1/8", "K": "Ador"} and body == "|:eA A2 eAAB|]"
    assert join_tune(header, body) == tune
    spec = MusicSpec.from_tunes([header_prefix("D", "6/8", "1/8") + "d", header_prefix("G", "6/8", "1/8") + "g",
                                 header_prefix("G", "2/4", "1/16") + "g"])
    assert spec.units == {"6/8": "1/8", "2/4": "1/16"} and spec.keys == {"G": 2, "D": 1}
    c = conditioning(spec, "d", "6/8")
    assert c.prompt == "M:6/8\nL:1/8\nK:D\n" and not c.unseen
    assert conditioning(spec, "E minor", "2/4").prompt == "M:2/4\nL:1/16\nK:Em\n"
    assert conditioning(spec, "Bb", "3/4").unseen == ["key Bb", "meter 3/4"]  # allowed, flagged
    assert check_key("F#m") == "F#m" and check_meter("C|") == "C|"
    for bad in ("H", "Dx", "", "D minorish"):
        with pytest.raises(InvalidParameterError, match="--key .* is not an ABC key"):
            check_key(bad)
    for bad in ("7/7", "6/0", "fast", "3/4/4"):
        with pytest.raises(InvalidParameterError, match="--meter .* is not an ABC meter"):
            check_meter(bad)


def test_abc_tokenizer_round_trip_and_alphabet(tmp_path):
    from genlab.codecs.text import load_tokenizer
    from genlab.music.codec import AbcAlphabet, train_abc_tokenizer

    tunes = [header_prefix(k, m, "1/8") + b for k in TOY_KEYS for m, b in BODY.items()]
    train_abc_tokenizer(tunes, vocab_size=320, out_dir=tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    for t in tunes[:5] + ["M:6/8\nL:1/8\nK:D\n^c _B =f \u266f \u6771"]:  # any text round-trips exactly
        ids = loaded(t)["input_ids"]
        assert ids[0] == loaded.bos_token_id and loaded.decode(ids, skip_special_tokens=True) == t
    for t in tunes:  # a header prompt is tokenized exactly as the start of a training tune
        ids, prompt = loaded(t)["input_ids"], loaded(join_tune(split_tune(t)[0], ""))["input_ids"]
        assert ids[:len(prompt)] == prompt and len(prompt) < len(ids)
        assert all("\n" not in loaded.decode([i])[:-1] for i in ids)  # no merge crosses a line end
    # merges across GPT-2's letter / digit / punctuation split: fewer tokens than genlab's text default
    plain = train_abc_tokenizer(tunes, vocab_size=320, split_words=True)
    assert sum(map(len, loaded(tunes)["input_ids"])) < 0.8 * sum(map(len, plain(tunes)["input_ids"]))
    allowed = AbcAlphabet(loaded).allowed
    assert allowed[loaded.eos_token_id] and not allowed[loaded.bos_token_id] and not allowed[loaded.pad_token_id]
    assert allowed[loaded.convert_tokens_to_ids("G")] and not allowed[loaded.convert_tokens_to_ids("\u00c3")]  # byte 0xC3
    anything = AbcAlphabet(loaded, ascii_only=False).allowed
    assert anything[loaded.convert_tokens_to_ids("\u00c3")] and not anything[loaded.convert_tokens_to_ids("<|end|>")]


def test_char_ngram_bits_per_char():
    periodic = CharNgram(3).fit(["abc" * 60] * 5)
    assert periodic.bits_per_char(["abc" * 30]) < 0.15  # a period-3 text is nearly free
    rng = random.Random(0)
    uniform = CharNgram(2).fit(["".join(rng.choice("abcd") for _ in range(20000))])
    assert uniform.bits_per_char(["".join(rng.choice("abcd") for _ in range(4000))]) == pytest.approx(2.0, abs=0.03)
    model = CharNgram(5).fit(["M:6/8\nK:D\ndfa afd|", "M:2/4\nK:G\ngbd|"])
    for context in ("afd|", "\x02\x02\x02\x02", "zzzz", "K:D\n"):  # seen, start, unseen, seen
        total = sum(model.prob(c, context) for c in model.vocab) + model.prob("\u266f", context)  # + unseen char
        assert total == pytest.approx(1.0, abs=1e-9)
    assert model.bits("dfa") > 0 and model.bits("\u266f") < float("inf")
    with pytest.raises(InvalidParameterError):
        CharNgram(0)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny model trained end to end by the CLI on a hand-written ABC file of 32 simple tunes."""
    root = tmp_path_factory.mktemp("music")
    tunes = [f"X:{i}\nT:Toy {i}\n% comment\nM:{m}\nK:{k}\n{b}\n" for i, (k, (m, b)) in
             enumerate(((k, mb) for k in TOY_KEYS for mb in BODY.items()), 1)]
    (root / "toy.abc").write_text("\n".join(tunes), encoding="utf-8")
    (root / "run.yaml").write_text("val_fraction: 0.3\nwarmup_steps: 5\nlog_every: 20\n", encoding="utf-8")
    p = genlab("music", "train", "--data", root / "toy.abc", "--out", root / "run", "--config", root / "run.yaml",
               "--preset", "1m", "--seq-len", "48", "--max-steps", "80", "--batch-size", "8", "--lr", "5e-3",
               "--vocab-size", "300", "--heldout-fraction", "0.15", "--eval-every", "40", "--checkpoint-every", "80")
    assert p.returncode == 0, p.stderr[-2000:]
    return root


def test_train_writes_model_report_and_music_spec(toy_run):
    import json

    report = json.loads((toy_run / "run" / "report.json").read_text())
    assert report["corpus"]["tunes_kept"] == 32 and report["corpus"]["train"] + report["corpus"]["heldout"] == 32
    held = report["heldout"]
    assert held["bits_per_char"] == pytest.approx(held["model"]["bits"] / held["model"]["chars"])
    assert held["bits_per_token"] > held["bits_per_char"] > 0 and held["baseline_bits_per_char"] > 0
    assert report["training"]["val_loss"] < report["training"]["val_loss_before"] - 2  # it learned the toy tunes
    meta = json.loads((toy_run / "run" / "model" / "genlab.json").read_text())
    assert meta["codec"] == {"type": "text"} and meta["music"]["units"]["2/4"] == "1/16"
    assert set(meta["music"]["meters"]) == set(BODY) and meta["music"]["heldout"]["tunes"] == report["heldout"]["tunes"]


def test_generation_accounting_and_files(toy_run, tmp_path):
    from music21 import converter

    from genlab.music.generate import failed_path, generate_tunes, judge, write_abc, write_midi

    good = generate_tunes(toy_run / "run", key="D", meter="6/8", n=3, temperature=0)  # a run folder works too
    assert good.parsed == 3 and good.parse_rate == 1.0 and all(t.finished for t in good.tunes)
    assert all(t.text.startswith("M:6/8\nL:1/8\nK:D\n") for t in good.tunes)
    hot = generate_tunes(toy_run / "run" / "model", key="G", meter="3/4", n=6, temperature=3.0, seed=1)
    s = hot.summary()
    assert s["failed"] >= 1 and s["parsed"] + s["failed"] == 6 and sum(s["failure_reasons"].values()) == s["failed"]
    assert s["parse_rate"] == pytest.approx(s["parsed"] / 6)
    files = write_abc(hot, tmp_path / "hot.abc")
    assert files == [tmp_path / "hot.abc", failed_path(tmp_path / "hot.abc")]
    assert (tmp_path / "hot.failed.abc").read_text().count("% genlab: not counted as parsed: ") == s["failed"]
    write_abc(good, tmp_path / "hot.abc")  # a later run without failures removes the old failure file
    assert not (tmp_path / "hot.failed.abc").exists()
    opus = converter.parse(tmp_path / "hot.abc")
    assert len(opus.scores) == 3 and all(len(sc.flatten().notes) > 0 for sc in opus.scores)
    midi, errors = write_midi(good, tmp_path / "hot.mid")
    assert [p.name for p in midi] == ["hot-01.mid", "hot-02.mid", "hot-03.mid"] and not errors
    assert all(p.read_bytes()[:4] == b"MThd" for p in midi)
    # each failure kind is counted with its reason, never repaired
    header = "M:6/8\nL:1/8\nK:D\n"
    assert judge(header + "dfa afd|", True, 10)[1] is None
    assert judge(header + "dfa afd|", False, 10)[1].startswith("unfinished")
    assert judge(header + "dfa|\n\nafd|", True, 10)[1].startswith("blank line")
    assert judge(header + "dfa|\nX:2\nafd|", True, 10)[1].startswith("new tune")
    assert judge(header + "dfa \ufffd afd|", True, 10)[1].startswith("non-ABC character")
    assert judge(header + "qqq", True, 10)[1].startswith("music21")


def test_cli_generate_end_to_end_and_bad_input(toy_run, tmp_path):
    import json

    p = genlab("music", "generate", toy_run / "run" / "model", "--key", "Em", "--meter", "4/4", "-n", "2",
               "--temperature", "0", "--out", tmp_path / "tune.abc", "--midi", tmp_path / "tune.mid", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout)
    assert summary["tunes"] == 2 and summary["parsed"] == 2 and summary["parse_rate"] == 1.0
    assert (tmp_path / "tune.abc").read_text().startswith("X:1\nM:4/4\nL:1/8\nK:Em\n")
    assert (tmp_path / "tune-01.mid").exists() and (tmp_path / "tune-02.mid").exists()
    for args, message in [(["--key", "H"], "--key 'H' is not an ABC key"), (["--meter", "7/7"], "--meter '7/7' is not an ABC meter"),
                          (["--unit-length", "1/3"], "--unit-length '1/3'")]:
        p = genlab("music", "generate", toy_run / "run" / "model", *args, "--out", tmp_path / "x.abc")
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "x.abc").exists()  # nothing written on bad input

"""`genlab music generate`: tunes in a requested key and meter, checked by music21, written as
ABC (and MIDI).

The prompt is the canonical header (`M:6/8\\nL:1/8\\nK:D\\n`, codec.py); the model writes the body
and ends the tune with `<|eos|>`. Nothing is repaired: the text kept is the prompt plus exactly
what the model wrote (trailing whitespace aside). A tune counts as parsed only if the model ended
it, it stays one tune (no blank line, which ends a tune in ABC, and no new X: line) and music21
reads it cleanly (corpus.check_tune). The others are counted as failures and written, with their
reason, to `<out>.failed.abc` beside the output, never dropped silently.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from genlab.errors import InvalidParameterError
from genlab.fsutil import atomic_file, atomic_write_text
from genlab.generate.sampling import SamplingParams
from genlab.music.codec import AbcAlphabet, Conditioning, check_header, conditioning, music_model_spec
from genlab.music.corpus import TuneCheck, check_tune


NOT_ABC = re.compile(r"[^\x20-\x7e\n]")


@dataclass
class GeneratedTune:
    text: str  # the canonical tune: the prompt's header + the generated body
    key: str
    meter: str
    finished: bool  # the model ended the tune (<|eos|>) within the token budget
    check: TuneCheck
    tokens: int = 0
    reason: str | None = None  # why it does not count as parsed (None: it does)

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class GenerationResult:
    tunes: list[GeneratedTune] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def parsed(self) -> int:
        return sum(t.ok for t in self.tunes)

    @property
    def parse_rate(self) -> float:
        return self.parsed / len(self.tunes) if self.tunes else 0.0

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for t in self.tunes:
            if t.reason:
                kind = t.reason.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
        return {"tunes": len(self.tunes), "parsed": self.parsed, "failed": len(self.tunes) - self.parsed,
                "parse_rate": self.parse_rate, "unfinished": sum(not t.finished for t in self.tunes),
                "failure_reasons": reasons, "seconds": round(self.seconds, 2),
                # parsed, and no bar overfull for its meter (a stricter bar than parsing: see TuneCheck)
                "fits_meter_rate": sum(t.ok and not t.check.rebarred for t in self.tunes) / len(self.tunes)
                if self.tunes else 0.0}


def judge(text: str, finished: bool, max_new_tokens: int) -> tuple[TuneCheck, str | None]:
    """music21's verdict on one generated tune and, if it does not count as parsed, why."""
    if not finished:
        return TuneCheck(False, error="unfinished"), f"unfinished: no end of tune within {max_new_tokens} tokens"
    if NOT_ABC.search(text):
        # ABC's music code is printable ASCII; music21 would skip a stray byte without a word
        return TuneCheck(False, error="character"), f"non-ABC character: {NOT_ABC.search(text).group()!r}"
    if re.search(r"^\s*$", text, re.M):
        return TuneCheck(False, error="blank line"), "blank line: ABC ends a tune at a blank line"
    if re.search(r"^X:", text, re.M):
        return TuneCheck(False, error="X: line"), "new tune: an X: line inside the tune"
    check = check_tune(text)
    return check, None if check.ok else f"music21: {check.error}"


def load_music_model(model, device: str = "cpu"):
    from genlab.lm import LanguageModel, load

    if isinstance(model, LanguageModel):
        return model
    path = Path(model)
    if (path / "model" / "genlab.json").exists() and not (path / "genlab.json").exists():
        path = path / "model"  # a `genlab music train` run folder
    return load(path, device=device)


def generate_tunes(model, key: str = "D", meter: str = "6/8", n: int = 4, unit: str | None = None, seed: int = 0,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   max_new_tokens: int | None = None, log=None, ascii_only: bool = True) -> GenerationResult:
    """`n` tunes in `key` and `meter` (validated: a clear InvalidParameterError for a bad value).
    `model`: a LanguageModel, a music model folder or a `genlab music train` run folder."""
    check_header(key, meter, unit)  # bad input fails before the model loads
    model = load_music_model(model)
    cond = conditioning(music_model_spec(model), key, meter, unit)
    return generate_for(model, [cond], n, seed, temperature, top_p, top_k, max_new_tokens, log, ascii_only)


def generate_for(model, conditions: list[Conditioning], n: int, seed: int = 0, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int | None = None, log=None,
                 ascii_only: bool = True) -> GenerationResult:
    """`n` tunes for each of several conditionings, batched in one call of the engine. Sampling
    is restricted to the codec's alphabet (codec.AbcAlphabet; `ascii_only=False` lets any byte
    through)."""
    if not isinstance(n, int) or n < 1:
        raise InvalidParameterError("n must be an integer >= 1")
    result = GenerationResult()
    for c in conditions:
        if c.unseen:
            result.warnings.append(f"{' and '.join(c.unseen)} never occur in this model's training tunes")
            if log:
                log(f"[yellow]note:[/] {result.warnings[-1]}; generating anyway")
    prompts = [c.prompt for c in conditions]
    longest = max(len(model.encode(p)) for p in prompts)
    budget = max_new_tokens or model.max_seq_len - longest  # a whole tune fits the context
    if budget < 1 or longest + budget > model.max_seq_len:
        raise InvalidParameterError(f"max_new_tokens {budget} does not fit the model's context ({model.max_seq_len} "
                                    f"tokens, prompt {longest})")
    start = time.perf_counter()
    params = SamplingParams(n=n, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=budget)
    alphabet = AbcAlphabet(model.tokenizer, ascii_only)  # one object serves every row: it keeps no state
    with model.using(None):
        outs = model.engine.generate([model.encode(p) for p in prompts], params,
                                     constraints=[alphabet] * (len(prompts) * n))
    for out in outs:
        c = conditions[out.prompt_index]
        text = c.prompt + out.text.rstrip()
        finished = out.finish_reason == "stop"
        check, reason = judge(text, finished, budget)
        result.tunes.append(GeneratedTune(text, c.key, c.meter, finished, check, len(out.token_ids), reason))
    result.seconds = time.perf_counter() - start
    return result


def failed_path(abc_path: Path) -> Path:
    return abc_path.with_name(abc_path.stem + ".failed.abc")


def write_abc(result: GenerationResult, path: str | Path) -> list[Path]:
    """The parsed tunes to `path` (X:1, X:2 ...); failures, each with its reason as a comment, to
    `<stem>.failed.abc` (removed if there are none, so an old one never reads as this run's)."""
    path = Path(path)
    good = [t for t in result.tunes if t.ok]
    bad = [t for t in result.tunes if not t.ok]
    atomic_write_text(path, "".join(f"X:{i}\n{t.text}\n\n" for i, t in enumerate(good, 1)))
    written = [path]
    failed = failed_path(path)
    if bad:
        atomic_write_text(failed, "".join(f"X:{i}\n% genlab: not counted as parsed: {t.reason}\n{t.text}\n\n"
                                          for i, t in enumerate(bad, 1)))
        written.append(failed)
    else:
        failed.unlink(missing_ok=True)
    return written


def midi_paths(path: Path, count: int) -> list[Path]:
    """One MIDI file per tune: `path` itself for one tune, `<stem>-01.mid` ... for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i:02d}{path.suffix}") for i in range(1, count + 1)]


def write_midi(result: GenerationResult, path: str | Path) -> tuple[list[Path], list[str]]:
    """Each parsed tune as a MIDI file rendered by music21: (files written, errors)."""
    import copy

    from music21 import converter

    good = [t for t in result.tunes if t.ok]
    written, errors = [], []
    for i, (tune, p) in enumerate(zip(good, midi_paths(Path(path), len(good))), 1):
        score = converter.parse(tune.text, format="abc")
        for m in score.recurse().getElementsByClass("Measure"):
            # music21's re-barring of an overfull bar puts one TimeSignature object in two
            # measures, and its MIDI writer then refuses the score: give each its own copy
            if m.timeSignature is not None:
                m.timeSignature = copy.deepcopy(m.timeSignature)
        try:
            with atomic_file(p) as tmp:
                score.write("midi", fp=str(tmp))
            written.append(p)
        except Exception as e:  # music21's MIDI writer raises many types
            errors.append(f"tune {i}: {type(e).__name__}: {e}")
    return written, errors

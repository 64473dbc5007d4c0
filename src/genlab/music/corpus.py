"""The ABC tune corpus that music21 ships, as canonical single-tune texts.

music21's corpus holds ~13,000 ABC tunes (Essen folk songs, O'Neill's 1850, Aird's airs, Ryan's
Mammoth Collection, ...), many per file and with headers in every order and spelling. A tune is
normalised to one canonical text:

    M:6/8
    L:1/8
    K:D
    <body lines>

The reference number (X:) is added back only when tunes are written to a file; titles, sources,
notes, lyrics, tempo, parts, comments and quoted annotations are dropped (none of them is music
the model should have to predict, and quoted strings hold Ryan's fingerings and O'Neill's prose,
which music21 would read as chord symbols). Multi-voice tunes (V:) and keys or meters the codec
cannot name are dropped. A tune is kept only if music21 reads it cleanly (`check_tune`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from genlab.errors import InvalidParameterError
from genlab.fsutil import atomic_write_text

NORMALISER_VERSION = 1
HEADER_FIELDS = ("M", "L", "K")  # the canonical header, in ABC's required order (K: last)
# canonical mode spelling <- its abbreviations; MODE_WORDS adds the full names the corpus also uses
MODES = {"": "", "maj": "", "ion": "", "m": "m", "min": "m", "aeo": "m", "mix": "mix", "dor": "dor",
         "phr": "phr", "lyd": "lyd", "loc": "loc"}
MODE_WORDS = set(MODES) | {"major", "minor", "ionian", "aeolian", "mixolydian", "dorian", "phrygian", "lydian",
                            "locrian"}
KEY = re.compile(r"^([A-Ga-g])([#b]?)\s*([A-Za-z]*)$")
METER = re.compile(r"^(\d{1,2})/(\d{1,2})$")
UNIT = re.compile(r"^1/(\d{1,2})$")
FIELD_LINE = re.compile(r"^([A-Za-z]):(.*)$")
INLINE_FIELD = re.compile(r"\[([A-Za-z]):([^\]]*)\]")
QUOTED = re.compile(r'"[^"\n]*"')
DECORATION = re.compile(r"(![^!\s|]{1,20}!)")  # !trill!, !D.C.! ...


class TuneError(ValueError):
    """Why one tune cannot be normalised (counted per reason, never fatal for the corpus)."""


def normalise_key(value: str) -> str:
    """'E Minor' -> 'Em', 'A Mixolydian' -> 'Amix', ' G' -> 'G'; anything else is a TuneError."""
    m = KEY.match(value.strip())
    if not m:
        raise TuneError(f"key {value.strip()!r}")
    tonic, accidental, mode = m.group(1).upper(), m.group(2), m.group(3).lower()
    if mode not in MODE_WORDS:
        raise TuneError(f"key {value.strip()!r}")
    return tonic + accidental + MODES[mode if mode == "m" else mode[:3]]


def normalise_meter(value: str) -> str:
    """'6/8', 'C' (common time), 'C|' (cut time) or 'none' (free meter); else a TuneError."""
    v = re.sub(r"\s+", "", value)
    if v in ("C", "C|"):
        return v
    if v.lower() == "none":
        return "none"
    m = METER.match(v)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) not in (1, 2, 4, 8, 16, 32):
        raise TuneError(f"meter {value.strip()!r}")
    return f"{int(m.group(1))}/{int(m.group(2))}"


def normalise_unit(value: str) -> str:
    m = UNIT.match(re.sub(r"\s+", "", value))
    if not m or int(m.group(1)) not in (1, 2, 4, 8, 16, 32, 64):
        raise TuneError(f"unit length {value.strip()!r}")
    return f"1/{int(m.group(1))}"


def default_unit(meter: str) -> str:
    """ABC 2.1's default L: when a tune gives none: 1/16 below a meter of 3/4, else 1/8."""
    if meter in ("C", "C|", "none"):
        return "1/8"
    return "1/16" if Fraction(meter) < Fraction(3, 4) else "1/8"


def split_tunes(text: str) -> list[str]:
    """One string per tune: from an X: line up to the blank line that ends it (ABC's rule);
    text between tunes (a file's preamble, prose) belongs to none."""
    tunes, current = [], None
    for line in text.splitlines():
        if line.startswith("X:"):
            if current:
                tunes.append("\n".join(current))
            current = [line]
        elif current is not None:
            if not line.strip():
                tunes.append("\n".join(current))
                current = None
            else:
                current.append(line)
    if current:
        tunes.append("\n".join(current))
    return tunes


def _body_line(line: str) -> str:
    line = line.split("%", 1)[0]  # a comment runs to the end of the line
    line = QUOTED.sub("", line)
    # inline fields: key / meter / unit changes are music, the rest (parts, tempo, ...) is not
    line = INLINE_FIELD.sub(lambda m: _inline(m.group(1), m.group(2)), line)
    line = line.replace("`", "")  # ABC 2.1's ignorable alignment spacing (Aird's)
    # A lone "!" is ABC 1.6's line break; music21 would read it as the start of a decoration
    # and silently skip the notes up to the next "!" (found in 38 tunes). Decorations stay.
    line = "".join(p if i % 2 else p.replace("!", "") for i, p in enumerate(DECORATION.split(line)))
    return re.sub(r"[ \t]+", " ", line).strip()


def _inline(name: str, value: str) -> str:
    if name == "V":
        raise TuneError("several voices")
    normalise = {"K": normalise_key, "M": normalise_meter, "L": normalise_unit}.get(name)
    return f"[{name}:{normalise(value)}]" if normalise else ""


def normalise_tune(text: str) -> str:
    """A tune in canonical form (see the module docstring), or a TuneError naming the problem."""
    header: dict[str, str] = {}
    body: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("%"):
            continue  # comments and %% directives
        m = FIELD_LINE.match(stripped)  # in ABC a line "letter:" is a field line, header or body
        if m:
            name, value = m.group(1), m.group(2).split("%", 1)[0]
            if name == "V":
                raise TuneError("several voices")
            if name in ("K", "M", "L"):
                value = {"K": normalise_key, "M": normalise_meter, "L": normalise_unit}[name](value)
                if "K" in header:  # after the header: a key / meter / unit change mid-tune
                    body.append(f"{name}:{value}")
                else:
                    header.setdefault(name, value)  # the first wins, as in abc2midi
            continue  # every other field (T, N, O, R, Z, B, S, Q, I, P, w, W, ...) is dropped
        if "K" not in header:
            if stripped:
                raise TuneError("music before the K: field")
            continue
        line = _body_line(raw)
        if line and line != "\\":
            body.append(line)
    if "K" not in header:
        raise TuneError("no K: field")
    meter = header.get("M", "none")
    header.setdefault("L", default_unit(meter))
    if not any(re.search(r"[A-Ga-g]", line) for line in body):
        raise TuneError("no notes")
    if body[-1].endswith("\\"):
        body[-1] = body[-1][:-1].rstrip()  # a continuation with nothing after it
    return header_prefix(header["K"], meter, header["L"]) + "\n".join(body)


def header_prefix(key: str, meter: str, unit: str) -> str:
    """The canonical header, which is also the generation prompt: 'M:6/8\\nL:1/8\\nK:D\\n'."""
    return f"M:{meter}\nL:{unit}\nK:{key}\n"


def parse_header(tune: str) -> dict:
    """{'M': ..., 'L': ..., 'K': ...} of a canonical tune; a TuneError if it is not canonical."""
    lines = tune.split("\n", 3)
    if len(lines) < 3 or [line[:2] for line in lines[:3]] != ["M:", "L:", "K:"]:
        raise TuneError("the tune does not start with the M:, L:, K: header")
    return {line[0]: line[2:] for line in lines[:3]}


@dataclass
class TuneCheck:
    """What music21 made of a tune. `ok`: it parsed, without a warning, into at least one note.
    `rebarred`: some bar held more than its meter allows, so music21 split it and invented a
    time signature (parsed, but the rhythm does not fit the meter; ~6% of the corpus tunes)."""

    ok: bool
    notes: int = 0
    measures: int = 0
    rebarred: bool = False
    error: str | None = None


def check_tune(tune: str, score: bool = False):
    """Parse one canonical tune with music21 (`converter.parse(text, format='abc')`).

    music21's ABC reader skips characters it does not know and guesses pitches it cannot read
    (printing a warning), so "no exception" alone would accept nearly any string: a warning
    counts as a failure too, and a tune must hold at least one note. With `score`, returns
    (TuneCheck, the music21 Score or None)."""
    from music21 import converter

    captured, parsed = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(captured):  # music21 warns by writing to sys.stderr
            parsed = converter.parse(tune, format="abc")  # no X: line, so a Score, not an Opus
    except Exception as e:  # music21 raises many types (ABCHandlerException, ValueError, ...)
        check = TuneCheck(False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    else:
        if captured.getvalue().strip():
            check = TuneCheck(False, error="warning: " + captured.getvalue().strip().splitlines()[-1][:120])
        else:
            notes = len(parsed.flatten().notes)
            measures = len(parsed.recurse().getElementsByClass("Measure"))
            signatures = len(parsed.recurse().getElementsByClass("TimeSignature"))
            written = len(re.findall(r"^M:|\[M:", tune, re.M)) - tune.startswith("M:none")
            check = TuneCheck(notes > 0, notes, measures, signatures > written, None if notes else "no notes")
    return (check, parsed if check.ok else None) if score else check


def music21_abc_files() -> list[Path]:
    """The .abc files music21 ships (its corpus needs no download for these)."""
    from music21 import corpus

    return sorted(Path(p) for p in corpus.getPaths(fileExtensions=("abc",)))


def read_abc_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # older collections are Latin-1; only dropped fields use it


def in_heldout(tune: str, fraction: float) -> bool:
    """The held-out split by tune hash. Salted, so it is independent of the split that
    `prepare_tokens` makes inside the training tunes (the same unsalted hash there would find
    every low bucket already removed and no validation tunes left)."""
    digest = hashlib.blake2b(tune.encode(), digest_size=8, person=b"genlab-abc").digest()
    return int.from_bytes(digest, "little") % 1_000_000 < fraction * 1_000_000


@dataclass
class AbcCorpus:
    train: list[str]
    heldout: list[str]
    report: dict = field(default_factory=dict)


def build_corpus(files: list[Path] | None = None, heldout_fraction: float = 0.05, max_chars: int = 800,
                 check: bool = True, log=print) -> AbcCorpus:
    """Read, split, normalise, check with music21, de-duplicate and split the tunes of `files`
    (default: music21's ABC corpus). The report counts tunes kept and dropped per reason."""
    if not 0 < heldout_fraction < 0.5:
        raise InvalidParameterError("heldout_fraction must be in (0, 0.5)")
    files = music21_abc_files() if files is None else [Path(f) for f in files]
    dropped: dict[str, int] = {}
    per_collection: dict[str, int] = {}
    seen, kept, found = set(), [], 0

    def drop(reason: str):
        dropped[reason] = dropped.get(reason, 0) + 1

    for path in files:
        for raw in split_tunes(read_abc_file(path)):
            found += 1
            try:
                tune = normalise_tune(raw)
            except TuneError as e:
                drop(re.sub(r" '.*", "", str(e)))  # 'key', 'meter', 'several voices', ...
                continue
            if len(tune) > max_chars:
                drop(f"longer than {max_chars} characters")
                continue
            if tune in seen:
                drop("duplicate")
                continue
            seen.add(tune)
            if check and not check_tune(tune).ok:
                drop("music21 cannot read it cleanly")
                continue
            kept.append(tune)
            per_collection[path.parent.name] = per_collection.get(path.parent.name, 0) + 1
    train = [t for t in kept if not in_heldout(t, heldout_fraction)]
    heldout = [t for t in kept if in_heldout(t, heldout_fraction)]
    report = {"files": len(files), "tunes_found": found, "tunes_kept": len(kept), "train": len(train),
              "heldout": len(heldout), "dropped": dict(sorted(dropped.items())), "collections": per_collection,
              "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, heldout)),
              "normaliser": NORMALISER_VERSION, "heldout_fraction": heldout_fraction, "max_chars": max_chars}
    log(f"ABC corpus: {found:,} tunes in {len(files)} files -> {len(kept):,} kept ({len(train):,} train, "
        f"{len(heldout):,} held out); dropped {sum(dropped.values()):,}: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])))
    return AbcCorpus(train, heldout, report)


def _cache_dir() -> Path:
    root = os.environ.get("GENLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genlab"
    return Path(root) / "music"


def music21_corpus(heldout_fraction: float = 0.05, max_chars: int = 800, log=print) -> AbcCorpus:
    """`build_corpus` of music21's ABC files, cached: checking ~13,000 tunes with music21 takes
    minutes, and the result only changes with music21's files or this normaliser."""
    import music21

    files = music21_abc_files()
    h = hashlib.sha256(json.dumps([music21.__version__, NORMALISER_VERSION, heldout_fraction, max_chars]).encode())
    for f in files:
        h.update(f"{f.name}|{f.stat().st_size}".encode())
    cache = _cache_dir() / f"corpus-{h.hexdigest()[:16]}.json"
    if cache.exists():
        data = json.loads(cache.read_text(encoding="utf-8"))
        log(f"ABC corpus: {len(data['train']):,} train and {len(data['heldout']):,} held-out tunes (cached: {cache})")
        return AbcCorpus(data["train"], data["heldout"], data["report"])
    corpus = build_corpus(files, heldout_fraction, max_chars, log=log)
    atomic_write_text(cache, json.dumps(asdict(corpus)))
    return corpus


def tunes_to_abc(tunes: list[str]) -> str:
    """A multi-tune .abc file: each tune gets its reference number X:1, X:2 ...; blank lines between."""
    return "".join(f"X:{i}\n{t.rstrip()}\n\n" for i, t in enumerate(tunes, 1))

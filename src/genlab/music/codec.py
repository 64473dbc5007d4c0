"""The ABC codec: a tune is text, so genlab's byte-level BPE tokenizer carries it (with merges
learned over whole ABC lines, see `train_abc_tokenizer`); what the codec adds is the shape of a
document, the conditioning and the output alphabet.

A training document is one canonical tune (see corpus.py): the header `M:6/8\\nL:1/8\\nK:D\\n`,
then the body; the tokenizer puts `<|bos|>` in front and pretraining puts `<|eos|>` after it,
which is the end-of-tune marker generation stops at. Because the header always comes first and
always in the order M:, L:, K:, it is a conditioning prefix: prompting with a header asks for a
tune in that key and meter. The unit note length (L:) is part of the prefix too; by default the
one the training tunes use most in that meter.

The music spec (meters and keys seen in training, the default L: per meter) is stored in the
model folder's genlab.json under "music"; the codec type stays "text", so `genlab.load` and plain
`transformers` load a music model as any text model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from genlab.errors import InvalidParameterError
from genlab.music.corpus import (
    TuneError, default_unit, header_prefix, normalise_key, normalise_meter, normalise_unit, parse_header,
)

KEY_HELP = "a tonic A-G, optionally # or b, and an optional mode: m, dor, phr, lyd, mix, loc (e.g. D, Em, F#m, Ador)"
METER_HELP = "a fraction with a power-of-two denominator, C, C| or none (e.g. 6/8, 3/4, C|)"


def check_key(key: str) -> str:
    """The canonical spelling of a key ('E minor' -> 'Em'), or a clear InvalidParameterError."""
    try:
        return normalise_key(str(key))
    except TuneError:
        raise InvalidParameterError(f"--key {key!r} is not an ABC key: use {KEY_HELP}") from None


def check_meter(meter: str) -> str:
    try:
        return normalise_meter(str(meter))
    except TuneError:
        raise InvalidParameterError(f"--meter {meter!r} is not an ABC meter: use {METER_HELP}") from None


def check_unit(unit: str) -> str:
    try:
        return normalise_unit(str(unit))
    except TuneError:
        raise InvalidParameterError(f"--unit-length {unit!r} is not an ABC unit note length: use 1/N with N a "
                                    "power of two up to 64 (e.g. 1/8)") from None


def check_header(key: str, meter: str, unit: str | None = None) -> None:
    """Validate requested header values (no model needed, so bad input fails fast)."""
    check_key(key)
    check_meter(meter)
    if unit is not None:
        check_unit(unit)


@dataclass
class MusicSpec:
    """What a music model knows about its headers (saved in genlab.json under "music")."""

    meters: dict[str, int] = field(default_factory=dict)  # meter -> training tunes
    keys: dict[str, int] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # meter -> its most common L:

    @classmethod
    def from_tunes(cls, tunes: list[str]) -> "MusicSpec":
        headers = [parse_header(t) for t in tunes]
        per_meter: dict[str, Counter] = {}
        for h in headers:
            per_meter.setdefault(h["M"], Counter())[h["L"]] += 1
        return cls(meters=dict(Counter(h["M"] for h in headers).most_common()),
                   keys=dict(Counter(h["K"] for h in headers).most_common()),
                   units={m: c.most_common(1)[0][0] for m, c in per_meter.items()})

    @classmethod
    def from_meta(cls, meta: dict) -> "MusicSpec":
        spec = meta.get("music") or {}
        return cls(dict(spec.get("meters", {})), dict(spec.get("keys", {})), dict(spec.get("units", {})))

    def to_dict(self) -> dict:
        return {"meters": self.meters, "keys": self.keys, "units": self.units}

    def unit_for(self, meter: str) -> str:
        return self.units.get(meter) or default_unit(meter)


@dataclass
class Conditioning:
    key: str
    meter: str
    unit: str
    unseen: list[str] = field(default_factory=list)  # header values no training tune had

    @property
    def prompt(self) -> str:
        return header_prefix(self.key, self.meter, self.unit)


def conditioning(spec: MusicSpec, key: str, meter: str, unit: str | None = None) -> Conditioning:
    """Validate and canonicalise a requested header. A well-formed value the model never saw in
    training is allowed (the model may still manage) but listed in `unseen` for a warning."""
    key, meter = check_key(key), check_meter(meter)
    unit = check_unit(unit) if unit else spec.unit_for(meter)
    unseen = []
    if spec.keys and key not in spec.keys:
        unseen.append(f"key {key}")
    if spec.meters and meter not in spec.meters:
        unseen.append(f"meter {meter}")
    return Conditioning(key, meter, unit, unseen)


def split_tune(tune: str) -> tuple[dict, str]:
    """(header fields, body) of a canonical tune; `join_tune` is its inverse."""
    header = parse_header(tune)
    return header, tune.split("\n", 3)[3] if tune.count("\n") >= 3 else ""


def join_tune(header: dict, body: str) -> str:
    return header_prefix(header["K"], header["M"], header["L"]) + body


def train_abc_tokenizer(tunes: list[str], vocab_size: int = 1024, out_dir=None, split_words: bool = False):
    """A byte-level BPE for ABC, trained on the training tunes only (the held-out tunes must not
    shape the vocabulary they are scored with).

    genlab's trainer (codecs/text.py) gives the tokenizer its special tokens, `<|bos|>` template
    and Hugging Face form. Its GPT-2-style pre-split into letters / digits / punctuation suits
    prose but cuts ABC into single symbols ("A2B2" -> A 2 B 2, "^c" -> ^ c; 1.41 characters per
    held-out token on music21's corpus); so by default the merges are relearned within each line
    (2.70 characters per token), where an accidental and its note, a note and its length, a
    whole header line become tokens. A line's newline ends its last token and no merge crosses
    it, so a header prompt ends at a token boundary exactly as in training (merges across line
    ends made the model start its body with a blank line). bench/music.py, 2m preset, 7.5 CPU
    minutes: 1.41 bits per held-out character, 97% of generated tunes parse with music21.
    `split_words=True` keeps genlab's text tokenizer as it is."""
    from tokenizers import pre_tokenizers

    from genlab.codecs.text import train_tokenizer
    from genlab.fsutil import atomic_dir

    if split_words:
        return train_tokenizer(texts=tunes, vocab_size=vocab_size, out_dir=out_dir)
    base = train_tokenizer(texts=tunes[:200], vocab_size=vocab_size)  # the skeleton; its merges are replaced
    # one pre-token per line, its newline included: merges never cross a line end, so a header
    # prompt ("M:6/8\nL:1/8\nK:D\n") ends at a token boundary exactly as in every training tune
    base.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # same pipeline and special tokens, new merges (min_frequency as genlab's trainer)
    tokenizer = base.train_new_from_iterator(tunes, vocab_size, min_frequency=2, show_progress=False)
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            tokenizer.save_pretrained(tmp)
    return tokenizer


class AbcAlphabet:
    """A decoding constraint (the engine's interface, see generate.constrain): the next token is
    `<|eos|>` (the end of the tune) or ordinary text; with `ascii_only`, text of printable ASCII
    and newlines only, the characters of ABC's music code.

    Why: the byte-level tokenizer keeps 256 byte tokens and genlab's chat tokens that no ABC tune
    contains. Never trained towards, they keep a sliver of probability; a chat token would end a
    tune early or vanish from the decoded text, a lone byte decodes to a replacement character.
    Neither says anything about how well the model learned ABC; the result reports
    `ascii_only=False` too (`bench/music.py`)."""

    complete = False  # only <|eos|> ends a tune

    def __init__(self, tokenizer, ascii_only: bool = True):
        import torch

        specials = set(tokenizer.all_special_ids)
        allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
        for i in range(len(tokenizer)):
            if i in specials:
                continue
            text = tokenizer.decode([i])  # a partial UTF-8 byte decodes to U+FFFD
            allowed[i] = bool(text) and (not ascii_only or all(c == "\n" or " " <= c <= "~" for c in text))
        allowed[tokenizer.eos_token_id] = True
        self.allowed = allowed

    def mask(self, logits):
        return logits.masked_fill(~self.allowed.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        pass


def music_model_spec(model) -> MusicSpec:
    """The MusicSpec of a loaded model; a clear error for a model that is not a music model."""
    if not (getattr(model, "meta", None) or {}).get("music"):
        where = getattr(model, "path", None) or "the model"
        raise InvalidParameterError(f"{where}: not a genlab music model (its genlab.json has no 'music' "
                                    "section); train one with `genlab music train`")
    return MusicSpec.from_meta(model.meta)

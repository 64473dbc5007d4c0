"""Table rows as token sequences, and the grammar that keeps every sampled row valid.

A row is BOS, then for each column in a random order: the column's token, its value, and SEP
(EOS after the last column). Column names and categories are single tokens; numbers and dates
are spelled in characters, so any value in a column's range and precision can be written and
nothing else can. The GReaT text form ("col is value, ...", codecs/table.py) is what a row
*means*; these ids are how the model from scratch writes it.

`RowGrammar` is the constrained decoder's automaton: for each partial row it gives the exact
set of tokens that can continue a valid row (unfinished columns, categories of the current
column, characters for which `ColumnSpec.is_prefix` holds, SEP/EOS once a value is complete), so
100% of sampled rows parse, with no rejection loop. Masks are cached by state, which repeats
a lot across rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from genlab.codecs.table import MISSING, ColumnSpec, TableSchema
from genlab.errors import DataError, InvalidParameterError

PAD, BOS, EOS, SEP, MISSING_ID = 0, 1, 2, 3, 4
SPECIALS = ("<pad>", "<row>", "</row>", ",", MISSING)
SCHEMA_FILE = "table_schema.json"
SPELLED = ("numeric", "integer", "datetime")  # kinds whose values are spelled in characters


class TableTokenizer:
    """The vocabulary of one table schema (see the module docstring)."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def __init__(self, schema: TableSchema):
        self.schema = schema
        self.specs = {s.name: s for s in schema.columns}
        tokens = list(SPECIALS)
        self.column_id = {}
        for spec in schema.columns:
            self.column_id[spec.name] = len(tokens)
            tokens.append(f"<{spec.name}>")
        self.category_id: dict[tuple[str, str], int] = {}
        for spec in schema.columns:
            if spec.kind not in SPELLED:
                for text in spec_texts(spec):
                    self.category_id[spec.name, text] = len(tokens)
                    tokens.append(text)
        chars = sorted({c for spec in schema.columns if spec.kind in SPELLED for c in _alphabet(spec)})
        self.char_id = {}
        for c in chars:
            self.char_id[c] = len(tokens)
            tokens.append(c)
        self.tokens = tokens
        self.column_of = {i: name for name, i in self.column_id.items()}

    def __len__(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {"type": "table"}

    def save_pretrained(self, folder) -> None:
        self.schema.save(Path(folder) / SCHEMA_FILE)

    @classmethod
    def from_folder(cls, folder) -> "TableTokenizer":
        return cls(TableSchema.load(Path(folder) / SCHEMA_FILE))

    # --- rows <-> ids ----------------------------------------------------------------------
    def value_ids(self, spec: ColumnSpec, text: str) -> list[int]:
        if text == MISSING:
            return [MISSING_ID]
        if spec.kind not in SPELLED:
            return [self.category_id[spec.name, text]]
        return [self.char_id[c] for c in text]

    def encode(self, texts: dict[str, str], order: list[str]) -> list[int]:
        """BOS, then column token + value + SEP per column in `order`, EOS instead of the last SEP."""
        ids = [BOS]
        for name in order:
            ids += [self.column_id[name], *self.value_ids(self.specs[name], texts[name]), SEP]
        ids[-1] = EOS
        return ids

    def decode(self, ids) -> dict[str, str]:
        """Column -> value text of a complete row (the inverse of `encode`)."""
        out, name, value = {}, None, []
        for i in list(ids)[1:]:
            if i in (SEP, EOS, PAD):
                if name is not None:
                    out[name] = "".join(value)
                name, value = None, []
                if i != SEP:
                    break
            elif name is None:
                name = self.column_of.get(i)
                if name is None:
                    raise DataError(f"token {i} ({self.tokens[i]!r}) where a column was expected")
            else:
                value.append(self.tokens[i])
        return out


def spec_texts(spec: ColumnSpec) -> list[str]:
    """The value texts of a categorical / boolean column, in the schema's order."""
    return [spec.format(c) for c in spec.categories or []]


def _alphabet(spec: ColumnSpec) -> str:
    return "0123456789-" + ("." if spec.kind == "numeric" else "") + (" :" if spec.kind == "datetime" else "")


@dataclass
class RowState:
    done: int = 0  # bitmask of the columns written
    column: int = -1  # index of the column being written, -1 between columns
    prefix: str = ""  # the value text so far (spelled columns); "\0" once a one-token value is written
    finished: bool = False


class RowGrammar:
    """Allowed next tokens for partial rows. `fixed` forces whole values (column -> value text)
    and `ranges` narrows numeric / integer / datetime columns (column -> (low, high), either may
    be None); conditioned columns are written first."""

    def __init__(self, tokenizer: TableTokenizer, fixed: dict[str, str] | None = None,
                 ranges: dict[str, tuple] | None = None, device: str | torch.device = "cpu"):
        self.tok, self.device = tokenizer, torch.device(device)
        self.names = [s.name for s in tokenizer.schema.columns]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.specs = [tokenizer.specs[n] for n in self.names]
        fixed, ranges = dict(fixed or {}), dict(ranges or {})
        for name in list(fixed) + list(ranges):
            if name not in tokenizer.specs:
                raise InvalidParameterError(f"unknown column {name!r} in the condition; columns: {', '.join(self.names)}")
        for name, text in fixed.items():
            spec = tokenizer.specs[name]
            if not spec.is_complete(text):
                raise InvalidParameterError(f"{name}={text!r} is not a valid value: {spec.describe()}")
        for name, (lo, hi) in ranges.items():
            i = self.names.index(name)
            spec = self.specs[i]
            if spec.kind not in ("numeric", "integer"):
                raise InvalidParameterError(f"{name}: a range needs a numeric or integer column ({spec.describe()})")
            lo = spec.min if lo is None else max(float(lo), spec.min)
            hi = spec.max if hi is None else min(float(hi), spec.max)
            narrowed = replace(spec, min=lo, max=hi, missing=False) if lo <= hi else None
            if narrowed is None or not any(narrowed.is_prefix(c) for c in _alphabet(spec)):
                raise InvalidParameterError(f"{name}: no value of the column lies in {lo}..{hi} ({spec.describe()})")
            self.specs[i] = narrowed
        self.fixed = {self.names.index(n): t for n, t in fixed.items()}
        self.first = sum(1 << self.names.index(n) for n in list(fixed) + list(ranges))  # written before the rest
        self.all_done = (1 << len(self.names)) - 1
        self._masks: dict[tuple, int] = {}
        self._table: list[torch.Tensor] = []
        self._stacked: torch.Tensor | None = None

    # --- states ------------------------------------------------------------------------------
    def prefix_ids(self) -> list[int]:
        """BOS plus every fixed column's token and value (they start every row)."""
        ids = [BOS]
        for i, text in self.fixed.items():
            ids += [self.tok.column_id[self.names[i]], *self.tok.value_ids(self.specs[i], text), SEP]
        return ids

    def start(self) -> RowState:
        return RowState(done=sum(1 << i for i in self.fixed))

    def _value_complete(self, s: RowState) -> bool:
        return s.prefix == "\0" or (s.prefix != "" and self.specs[s.column].is_complete(s.prefix))

    def advance(self, s: RowState, token: int) -> None:
        if s.column < 0:
            if token == EOS:
                s.finished = True
                return
            s.column, s.prefix = self.index[self.tok.column_of[token]], ""
        elif token in (SEP, EOS):
            s.done |= 1 << s.column
            s.column, s.prefix, s.finished = -1, "", token == EOS
        elif token == MISSING_ID or self.specs[s.column].kind not in SPELLED:
            s.prefix = "\0"
        else:
            s.prefix += self.tok.tokens[token]

    # --- masks -------------------------------------------------------------------------------
    def _key(self, s: RowState) -> tuple:
        return (s.done, s.column, s.prefix) if not s.finished else ("end",)

    def _allowed(self, s: RowState) -> list[int]:
        if s.finished:
            return [PAD]
        if s.column < 0:  # between columns: the unwritten ones, conditioned columns first
            todo = [i for i in range(len(self.names)) if not s.done >> i & 1]
            first = [i for i in todo if self.first >> i & 1]
            return [self.tok.column_id[self.names[i]] for i in (first or todo)]
        spec, allowed = self.specs[s.column], []
        if s.prefix == "":
            if spec.missing:
                allowed.append(MISSING_ID)
            if spec.kind not in SPELLED:
                return allowed + [self.tok.category_id[spec.name, t] for t in spec_texts(spec)]
        if s.prefix != "\0":
            allowed += [self.tok.char_id[c] for c in _alphabet(spec) if c in self.tok.char_id
                        and spec.is_prefix(s.prefix + c)]
        if self._value_complete(s):
            allowed.append(EOS if s.done | 1 << s.column == self.all_done else SEP)
        if not allowed:
            raise DataError(f"no valid continuation for column {spec.name!r} after {s.prefix!r}")
        return allowed

    def mask_index(self, s: RowState) -> int:
        key = self._key(s)
        i = self._masks.get(key)
        if i is None:
            mask = torch.zeros(len(self.tok), dtype=torch.bool)
            mask[self._allowed(s)] = True
            i = self._masks[key] = len(self._table)
            self._table.append(mask)
            self._stacked = None
        return i

    def masks(self, states: list[RowState]) -> torch.Tensor:
        """[rows, vocab] allowed-token masks."""
        index = [self.mask_index(s) for s in states]
        if self._stacked is None:
            self._stacked = torch.stack(self._table).to(self.device)
        return self._stacked[torch.tensor(index, device=self.device)]

    def max_length(self) -> int:
        """Tokens in the longest possible row."""
        longest = 1
        for spec in self.specs:
            if spec.kind in SPELLED:
                width = max(len(spec.format(spec.min)), len(spec.format(spec.max))) if spec.kind != "datetime" \
                    else len(spec.max)
            else:
                width = 1
            longest += 2 + width
        return longest

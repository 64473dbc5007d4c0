"""Table rows as token sequences, and the grammar that keeps every sampled row valid.

A row is BOS, then for each column in a random order its token and its value, then EOS (the
next column's token ends a value: no separators, fewer steps to decode). Column names,
categories and the levels of discrete number columns are single tokens; other numbers and dates
are spelled in characters, so any value in a column's range and precision can be written and
nothing else can. The GReaT text form ("col is value, ...", codecs/table.py) is what a row
*means*; these ids are how the model from scratch writes it.

`RowGrammar` is the constrained decoder's automaton: for each partial row it gives the exact
set of tokens that can continue a valid row (categories / levels of the current column,
characters for which `ColumnSpec.is_prefix` holds, and once the value is complete the unwritten
columns or EOS), so 100% of sampled rows parse, with no rejection loop. A row's mask is the OR
of two cached masks: its value's continuations (keyed by column and text so far) and what may
follow a complete value (keyed by the columns written), so a few hundred masks cover a table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from genlab.codecs.table import MISSING, ColumnSpec, TableSchema
from genlab.errors import DataError, InvalidParameterError

PAD, BOS, EOS, MISSING_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<row>", "</row>", MISSING)
SCHEMA_FILE = "table_schema.json"
SPELLED = ("numeric", "integer", "datetime")  # kinds whose values are spelled in characters...


def spelled(spec: ColumnSpec) -> bool:
    """...unless the column has levels (a discrete number column: one token per level)."""
    return spec.kind in SPELLED and spec.levels is None


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
            if not spelled(spec):
                for text in spec_texts(spec):
                    self.category_id[spec.name, text] = len(tokens)
                    tokens.append(text)
        chars = sorted({c for spec in schema.columns if spelled(spec) for c in _alphabet(spec)})
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
        if not spelled(spec):
            return [self.category_id[spec.name, text]]
        return [self.char_id[c] for c in text]

    def encode(self, texts: dict[str, str], order: list[str]) -> list[int]:
        """BOS, then column token + value per column in `order`, then EOS."""
        ids = [BOS]
        for name in order:
            ids += [self.column_id[name], *self.value_ids(self.specs[name], texts[name])]
        return ids + [EOS]

    def decode(self, ids) -> dict[str, str]:
        """Column -> value text of a complete row (the inverse of `encode`)."""
        out, name, value = {}, None, []
        for i in list(ids)[1:]:
            if i in (EOS, PAD) or i in self.column_of:
                if name is not None:
                    out[name] = "".join(value)
                if i in (EOS, PAD):
                    break
                name, value = self.column_of[i], []
            elif name is None:
                raise DataError(f"token {i} ({self.tokens[i]!r}) where a column was expected")
            else:
                value.append(self.tokens[i])
        return out


def spec_texts(spec: ColumnSpec) -> list[str]:
    """The one-token value texts of a column: categories (schema order) or levels in range."""
    if spec.levels is not None:
        return [t for t in spec.levels if spec.is_complete(t)]
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
        self._masks: dict[tuple, int] = {("none",): 0}  # index 0: the empty mask
        self._values: dict[tuple, tuple[int, bool]] = {}  # (column, prefix) -> (mask index, complete)
        self._table = torch.zeros(64, len(tokenizer), dtype=torch.bool, device=self.device)

    # --- states ------------------------------------------------------------------------------
    def prefix_ids(self) -> list[int]:
        """BOS plus every fixed column's token and value (they start every row)."""
        ids = [BOS]
        for i, text in self.fixed.items():
            ids += [self.tok.column_id[self.names[i]], *self.tok.value_ids(self.specs[i], text)]
        return ids

    def start(self) -> RowState:
        return RowState(done=sum(1 << i for i in self.fixed))

    def _value_complete(self, s: RowState) -> bool:
        return s.prefix == "\0" or (s.prefix != "" and self.specs[s.column].is_complete(s.prefix))

    def advance(self, s: RowState, token: int) -> None:
        if token == EOS or token in self.tok.column_of:  # the current value (if any) is complete
            if s.column >= 0:
                s.done |= 1 << s.column
            s.finished = token == EOS
            s.column, s.prefix = (-1, "") if s.finished else (self.index[self.tok.column_of[token]], "")
        elif token == MISSING_ID or not spelled(self.specs[s.column]):
            s.prefix = "\0"
        else:
            s.prefix += self.tok.tokens[token]

    # --- masks -------------------------------------------------------------------------------
    def _value_allowed(self, column: int, prefix: str) -> list[int]:
        """Tokens that continue the value text `prefix` of `column`."""
        spec = self.specs[column]
        if prefix == "\0":
            return []
        if prefix == "" and not spelled(spec):
            return [MISSING_ID] * spec.missing + [self.tok.category_id[spec.name, t] for t in spec_texts(spec)]
        allowed = [MISSING_ID] * (spec.missing and prefix == "")
        return allowed + [self.tok.char_id[c] for c in _alphabet(spec) if c in self.tok.char_id
                          and spec.is_prefix(prefix + c)]

    def _next_allowed(self, done: int) -> list[int]:
        """Tokens after a complete value: the unwritten columns (conditioned ones first), or EOS."""
        if done == self.all_done:
            return [EOS]
        todo = [i for i in range(len(self.names)) if not done >> i & 1]
        first = [i for i in todo if self.first >> i & 1]
        return [self.tok.column_id[self.names[i]] for i in (first or todo)]

    def _mask_index(self, key: tuple) -> int:
        i = self._masks.get(key)
        if i is None:
            i = self._masks[key] = len(self._masks)
            if i == len(self._table):  # grow the table of masks (doubling)
                self._table = torch.cat([self._table, torch.zeros_like(self._table)])
            if key[0] == "value":
                allowed = self._value_allowed(*key[1:])
            else:
                allowed = [PAD] if key[0] == "end" else self._next_allowed(key[1])
            self._table[i, allowed] = True
        return i

    def mask_indices(self, s: RowState) -> tuple[int, int]:
        """Indices of the two masks whose OR is the state's: its value's continuations and what
        may follow once the value is complete (index 0 is the empty mask)."""
        if s.finished:
            return self._mask_index(("end",)), 0
        if s.column < 0:
            return self._mask_index(("next", s.done)), 0
        key = (s.column, s.prefix)
        value = self._values.get(key)
        if value is None:
            allowed = self._mask_index(("value", *key))
            complete = self._value_complete(s)
            if not complete and not self._table[allowed].any():
                raise DataError(f"no valid continuation for column {self.names[s.column]!r} after {s.prefix!r}")
            value = self._values[key] = (allowed, complete)
        return value[0], self._mask_index(("next", s.done | 1 << s.column)) if value[1] else 0

    def masks(self, states: list[RowState]) -> torch.Tensor:
        """[rows, vocab] allowed-token masks."""
        value, after = zip(*(self.mask_indices(s) for s in states))
        return self._table[torch.tensor(value, device=self.device)] | self._table[torch.tensor(after, device=self.device)]

    def max_length(self) -> int:
        """Tokens in the longest possible row."""
        longest = 1
        for spec in self.specs:
            if spelled(spec):
                width = max(len(spec.format(spec.min)), len(spec.format(spec.max))) if spec.kind != "datetime" \
                    else len(spec.max)
            else:
                width = 1
            longest += 1 + width
        return longest + 1

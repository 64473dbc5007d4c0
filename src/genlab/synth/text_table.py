"""Synthetic tables from any foundation model, fine-tuned on the GReaT text form of a table
("col is value, col2 is value2, ..." in random column orders; codecs/table.py).

A pretrained model already knows what "age is 42" or "city is Lyon" means, which the
from-scratch table model (synth/model.py) must learn from the table alone. Fitting is
`genlab.finetune` (continued pretraining; LoRA or full) on the row texts, each followed by EOS.
Sampling runs genlab's engine with a `TableRowConstraint` per row: a byte-level automaton over
the row grammar masks every token that would leave the valid rows, so every row parses with no
rejection loop, whatever the tokenizer (a token may span a separator or half a UTF-8 character).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from genlab.codecs.table import (DATETIME_FORMATS, MISSING, ColumnSpec, TableSchema, decode_rows, encode_table,
                                 infer_schema)
from genlab.data.tokens import in_heldout_split
from genlab.errors import GenlabError, InvalidParameterError, ModelLoadError
from genlab.fsutil import atomic_dir, write_json
from genlab.generate.constrain import accepted_tokens, token_bytes
from genlab.generate.sampling import SamplingParams
from genlab.model import io
from genlab.synth.grammar import SCHEMA_FILE, RowGrammar, TableTokenizer
from genlab.synth.model import parse_where

LEAD, NAME, VALUE, SEP = range(4)  # automaton phases: a tokenizer's leading space, a column name, its value, ", "
_SPELLING = b".0123456789-: misng"  # every byte of a number, a time or "missing"; tried in this order


class _Values:
    """One column's value texts as bytes. Finite columns (categories, booleans, levels) keep their
    texts (`ColumnSpec.format`, so escapes included) sorted, which also answers prefixes that end
    inside a UTF-8 character; spelled ones (numbers, times: ASCII) ask the ColumnSpec."""

    def __init__(self, spec: ColumnSpec):
        if spec.kind in ("numeric", "integer") and (spec.min is None or spec.max is None):
            big = 10**15  # a user-written schema without bounds: at most 15 digits, so rows stay finite
            spec = replace(spec, min=-big if spec.min is None else spec.min, max=big if spec.max is None else spec.max)
        self.spec = spec
        texts = ([t for t in spec.levels if spec.is_complete(t)] if spec.levels is not None else
                 [spec.format(c) for c in spec.categories] if spec.kind in ("categorical", "boolean") else None)
        self.words = None if texts is None else sorted(t.encode() for t in texts + [MISSING] * spec.missing)
        if self.words is not None:
            self.longest = max(map(len, self.words))
        elif spec.kind == "datetime":
            self.longest = max(len(DATETIME_FORMATS[spec.fmt][0]), len(MISSING) * spec.missing)
        else:  # sign + the widest whole part + "." + decimals
            whole = len(str(int(max(abs(spec.min), abs(spec.max)))))
            self.longest = max(1 + whole + (1 + spec.decimals if spec.decimals else 0), len(MISSING) * spec.missing)

    def _word(self, b: bytes, after: bool = False) -> bytes | None:
        """The first word >= b (> b with `after`): if any word starts with b, this one does."""
        i = (bisect_right if after else bisect_left)(self.words, b)
        return self.words[i] if i < len(self.words) else None

    def prefix(self, b: bytes) -> bool:
        if self.words is None:
            return b.isascii() and self.spec.is_prefix(b.decode())
        return (w := self._word(b)) is not None and w.startswith(b)

    def complete(self, b: bytes) -> bool:
        if self.words is None:
            return b.isascii() and self.spec.is_complete(b.decode())
        return self._word(b) == b

    def extendable(self, b: bytes) -> bool:
        if self.words is None:
            return any(self.prefix(b + bytes([c])) for c in _SPELLING)
        return (w := self._word(b, after=True)) is not None and w.startswith(b)

    def shortest(self, b: bytes) -> bytes:
        """A short valid value text starting with the valid prefix `b` (the shortest for finite
        columns; spelled ones grow greedily, which always ends: every valid prefix has a completion
        and value texts are bounded)."""
        if self.words is not None:
            i = bisect_left(self.words, b)
            return min((w for w in self.words[i:] if w.startswith(b)), key=len, default=b)
        while not self.complete(b):
            b += next(bytes([c]) for c in _SPELLING if self.prefix(b + bytes([c])))
        return b


class RowLanguage:
    """The valid rows of a schema under `where` conditions as a byte automaton over one tokenizer's
    tokens, shared by a sampling call's constraints (masks are cached by state). A state is
    (phase, columns written as a bitmask, current column, bytes of its name or value so far).
    Conditions mean what they mean to the from-scratch sampler (`RowGrammar` checks and narrows
    them): fixed columns come first, in the prompt (`prefix_text`), then columns with a range."""

    def __init__(self, schema: TableSchema, tokenizer, eos_token_ids: list[int], where=None, max_cache: int = 100_000):
        grammar = RowGrammar(TableTokenizer(schema), *parse_where(where))
        self.names, self.first = grammar.names, grammar.first
        self.values = [_Values(spec) for spec in grammar.specs]
        self.keys = [f"{name} is ".encode() for name in self.names]
        self.key_column = {key: i for i, key in enumerate(self.keys)}
        self.key_prefixes: dict[bytes, int] = {}  # name prefix -> columns (bitmask) whose "name is " starts so
        for i, key in enumerate(self.keys):
            for k in range(1, len(key) + 1):
                self.key_prefixes[key[:k]] = self.key_prefixes.get(key[:k], 0) | 1 << i
        self.all = (1 << len(self.names)) - 1
        done = sum(1 << i for i in grammar.fixed)
        self.prefix_text = "".join(f"{self.names[i]} is {text}, " for i, text in grammar.fixed.items())[:-1]
        self.tokenizer, self.eos = tokenizer, sorted(set(eos_token_ids))
        self.token_data = token_bytes(tokenizer)
        self.lead = not self.prefix_text and _adds_leading_space(tokenizer, self.keys[0].decode())
        self.start = (SEP if self.prefix_text else LEAD if self.lead else NAME, done, -1, b"")
        rest = [i for i in range(len(self.names)) if not done >> i & 1]
        # every token has >= 1 byte, so a row has at most as many tokens as bytes (+ EOS)
        self.max_tokens = self.lead + sum(len(self.keys[i]) + self.values[i].longest + 2 for i in rest) + 1
        self.max_cache, self._masks = max_cache, {}

    def constraint(self) -> "TableRowConstraint":
        return TableRowConstraint(self)

    def prompt_ids(self) -> list[int]:
        """BOS (if the tokenizer writes one, else EOS: training rows follow one) + the fixed columns."""
        tok = self.tokenizer
        ids = tok(self.prefix_text)["input_ids"] if self.prefix_text else tok("")["input_ids"]
        return ids if ids and ids[0] == tok.bos_token_id else self.eos[:1] + ids

    def _open(self, done: int) -> int:
        todo = self.all & ~done
        return todo & self.first or todo

    def step(self, state: tuple, byte: int) -> tuple | None:
        """The state after one more byte; None if no valid row continues so."""
        phase, done, col, buf = state
        if phase in (LEAD, SEP):
            return (NAME, done, -1, b"") if byte == 0x20 else None
        buf += bytes([byte])
        if phase == NAME:
            if not self.key_prefixes.get(buf, 0) & self._open(done):
                return None
            full = self.key_column.get(buf)  # "name is " strings are prefix-free (no name holds " is ")
            return (VALUE, done, full, b"") if full is not None else (NAME, done, -1, buf)
        values = self.values[col]
        if byte == 0x2C and done | 1 << col != self.all and values.complete(buf[:-1]):
            return (SEP, done | 1 << col, -1, b"")  # "," ends a value (inside a category it is escaped)
        return (VALUE, done, col, buf) if values.prefix(buf) else None

    def run(self, state: tuple, data: bytes) -> tuple | None:
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state

    def row_complete(self, state: tuple) -> bool:
        phase, done, col, buf = state
        return phase == VALUE and done | 1 << col == self.all and self.values[col].complete(buf)

    def finished(self, state: tuple) -> bool:
        """Complete, and no byte can extend the last value: only EOS may follow."""
        return self.row_complete(state) and not self.values[state[2]].extendable(state[3])

    def allowed_ids(self, state: tuple, device) -> torch.Tensor:
        """Every token that keeps the row valid (EOS once it is complete), sorted."""
        ids = self._masks.get(state)
        if ids is None:
            found = accepted_tokens(self.tokenizer, self.step, state) + (self.eos if self.row_complete(state) else [])
            if not found:
                raise GenlabError(f"no token of this tokenizer can continue the row after {state[3]!r}")
            if len(self._masks) >= self.max_cache:
                self._masks.clear()
            ids = self._masks[state] = torch.tensor(sorted(found))
        return ids.to(device)

    def closing(self, state: tuple) -> bytes:
        """Bytes that complete the row from `state` (used when a row runs out of tokens)."""
        phase, done, col, buf = state
        out = b" " if phase in (LEAD, SEP) else b""
        if phase != VALUE:
            open_ = self._open(done) & self.key_prefixes.get(buf, self.all) if buf else self._open(done)
            col = (open_ & -open_).bit_length() - 1
            out, buf = out + self.keys[col][len(buf):], b""
        out += self.values[col].shortest(buf)[len(buf):]
        done |= 1 << col
        while done != self.all:
            i = (self._open(done) & -self._open(done)).bit_length() - 1
            out += b", " + self.keys[i] + self.values[i].shortest(b"")
            done |= 1 << i
        return out


def _adds_leading_space(tokenizer, text: str) -> bool:
    """Whether the tokenizer writes a space before a text (sentencepiece's dummy prefix; rows start so)."""
    data = b"".join(token_bytes(tokenizer)[i] for i in tokenizer(text, add_special_tokens=False)["input_ids"])
    return data == b" " + text.encode()


class TableRowConstraint:
    """Per-row decoding state with JsonObjectConstraint's interface (`complete`, `allowed`,
    `mask`, `advance`, `closing`): the text stays a prefix of a valid row, each schema column
    exactly once in any order, and EOS comes only once the row is complete."""

    def __init__(self, language: RowLanguage):
        self.lang, self.state, self.data = language, language.start, bytearray()

    @property
    def complete(self) -> bool:
        return self.lang.finished(self.state)

    @property
    def row_complete(self) -> bool:
        """The text is a whole row (EOS allowed), though the last value may still grow."""
        return self.lang.row_complete(self.state)

    def _next(self, token_id: int) -> tuple | None:
        data = self.lang.token_data[token_id] if 0 <= token_id < len(self.lang.token_data) else b""
        return self.lang.run(self.state, data) if data else None

    def allowed(self, token_id: int) -> bool:
        return self.row_complete if token_id in self.lang.eos else self._next(token_id) is not None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row of logits [V] with every disallowed token at -inf (exact: the whole
        vocabulary is checked, through the state's cached list)."""
        ids = self.lang.allowed_ids(self.state, logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[ids] = logits[ids]
        return out

    def advance(self, token_id: int) -> None:
        """Feed the chosen token (EOS is ignored)."""
        if token_id in self.lang.eos:
            return
        state = self._next(token_id)
        if state is None:
            raise ValueError(f"token {token_id} cannot continue the row here")
        self.state = state
        self.data += self.lang.token_data[token_id]

    def closing(self) -> str:  # like JsonObjectConstraint's: what makes a cut row complete
        return "" if self.row_complete else self.lang.closing(self.state).decode("utf-8", "replace")

    def text(self) -> str:
        """The whole row: the fixed columns, what was generated and, if cut short, its completion."""
        data = bytes(self.data) + (b"" if self.row_complete else self.lang.closing(self.state))
        return self.lang.prefix_text + data[self.lang.lead:].decode()


@dataclass
class TextTableFit:
    out: Path  # the fine-tuning run folder (report.json, metrics.jsonl, loss.png, checkpoints/)
    model_dir: Path  # adapter/ (LoRA) or model/ (full): what TextTableModel.load takes
    schema: TableSchema
    rows: int
    finetune: object  # the FinetuneResult (perplexities before / after)


def text_tokenizer(base) -> tuple[Path, object]:
    """The folder and tokenizer of a text model; a ModelLoadError naming why anything else is not."""
    folder = io.resolve(base)
    meta = io.read_json(folder / "genlab.json") if (folder / "genlab.json").exists() else {}
    kind = (meta.get("codec") or {}).get("type", "text")
    problems = [((folder / "adapter_config.json").exists(), "a LoRA adapter folder; give its base (or merge it first)"),
                (not (folder / "config.json").exists(), "not a model folder (no config.json)"),
                (kind != "text", f"a {kind} model, not a text model; fine-tune a text (causal LM) folder")]
    why = next((message for bad, message in problems if bad), None)
    if why:
        raise ModelLoadError(f"{folder}: {why}")
    tokenizer = io.load_codec(folder, meta)
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{folder}: the tokenizer has no EOS token, which must end each row")
    return folder, tokenizer


def row_documents(texts: list[str], tokenizer, group: int) -> list[str]:
    """Row texts joined `group` to a document by the EOS token's text. finetune's cleaning drops
    exact duplicate documents, which would drop repeated rows and skew the frequencies to learn;
    groups of shuffled rows almost never repeat. Used only if the tokenizer turns each group into
    exactly its rows' own tokens joined by EOS; otherwise every row is its own document."""
    starts = range(0, len(texts), group)
    single = tokenizer(texts, add_special_tokens=False)["input_ids"]
    expected = [[t for ids in single[i:i + group] for t in ids + [tokenizer.eos_token_id]][:-1] for i in starts]
    for joiner in (tokenizer.eos_token, tokenizer.eos_token + " "):  # + " ": where the tokenizer adds a dummy space
        docs = [joiner.join(texts[i:i + group]) for i in starts]
        if group > 1 and tokenizer(docs, add_special_tokens=False)["input_ids"] == expected:
            return docs
    return texts


def _seq_len(docs: list[str], tokenizer, requested: int, val_fraction: float) -> int:
    """The longest window that leaves the held-out split (finetune's hash of each cleaned document,
    or its tail when the hash picks none) at least two windows."""
    cleaned = list(dict.fromkeys(unicodedata.normalize("NFC", d).strip() for d in docs))
    counts = [len(ids) + 1 for ids in tokenizer(cleaned)["input_ids"]]
    total = sum(counts)
    val = sum(c for d, c in zip(cleaned, counts) if in_heldout_split(d, val_fraction))
    if val in (0, total):
        val = int(total * max(val_fraction, 0.05))
    return max(8, min(requested, val // 2 - 1, (total - val) // 2 - 1))


def fit_text_table(data: pd.DataFrame | str | Path, base: str | Path, out: str | Path, *, permutations: int = 3,
                   max_categories: int = 50, max_levels: int = 0, rows_per_document: int = 16, seq_len: int = 256,
                   val_fraction: float = 0.1, seed: int = 0, console: Console | None = None,
                   **finetune_options) -> TextTableFit:
    """Fine-tune the text model `base` on a table (a DataFrame or a CSV / Parquet file): each row as
    GReaT text in `permutations` random column orders (numbers spelled: `max_levels=0`), trained
    by `genlab.finetune` (`finetune_options`: its fields, e.g. max_steps, lr, full, lora_r). The
    adapter (or model) folder also holds table_schema.json; its genlab.json records the table's
    provenance. The tokenized rows are deleted after training (the run keeps no copy). One process."""
    from genlab.data.tables import read_table
    from genlab.train.finetune import finetune

    if permutations < 1 or rows_per_document < 1:
        raise InvalidParameterError("permutations and rows_per_document must be >= 1")
    console = console or Console(stderr=True)
    folder, tokenizer = text_tokenizer(base)
    df = data if isinstance(data, pd.DataFrame) else read_table(data)
    schema = infer_schema(df, max_categories=max_categories, max_levels=max_levels,
                          warn=lambda m: console.print(f"[yellow]warning:[/] {m}"))
    rng = np.random.default_rng(seed)
    texts = [t for _ in range(permutations) for t in encode_table(df, schema, rng)]
    texts = [texts[i] for i in rng.permutation(len(texts))]
    docs = row_documents(texts, tokenizer, rows_per_document)
    if len(docs) == len(texts) > len(set(texts)):
        console.print(f"[yellow]warning:[/] finetune will drop {len(texts) - len(set(texts))} repeated row texts")
    window = _seq_len(docs, tokenizer, seq_len, val_fraction)
    console.print(f"{len(df):,} rows x {len(schema.columns)} columns -> {len(texts):,} row texts in "
                  f"{len(docs):,} documents; windows of {window} tokens")
    options = dict(general_eval=False, samples=0) | finetune_options
    with tempfile.TemporaryDirectory(prefix="genlab-rows-") as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), "utf-8")
        result = finetune(model=str(folder), data=[str(rows_file)], out=str(out), mode="cpt", seq_len=window,
                          val_fraction=val_fraction, seed=seed, console=console, **options)
    shutil.rmtree(result.out / "data", ignore_errors=True)
    table = {"base": str(folder.resolve()), "rows": len(df), "permutations": permutations, "columns": schema.names(),
             "excluded": schema.excluded, "rows_per_document": len(texts) // len(docs), "seed": seed,
             "source": "DataFrame" if isinstance(data, pd.DataFrame) else str(data)}
    with atomic_dir(result.output_dir) as tmp:  # the folder gains its schema whole, or not at all
        shutil.copytree(result.output_dir, tmp, copy_function=os.link, dirs_exist_ok=True)
        schema.save(tmp / SCHEMA_FILE)
        meta = io.read_json(tmp / "genlab.json")
        meta["provenance"] = {**meta.get("provenance", {}), "created_by": "genlab synth fit (text)", "table": table}
        write_json(tmp / "genlab.json", meta)
    console.print(f"text table model -> {result.output_dir}")
    return TextTableFit(result.out, result.output_dir, schema, len(df), result)


class TextTableModel:
    """A text model fine-tuned on a table: sample rows (conditionally) as a DataFrame."""

    def __init__(self, model, schema: TableSchema, adapter: str | None = None):
        self.model, self.schema, self.adapter = model, schema, adapter

    @classmethod
    def load(cls, path: str | Path, base: str | Path | None = None, device: str = "cpu",
             dtype: torch.dtype | str | None = None) -> "TextTableModel":
        """The adapter / model folder of fit_text_table (or its run folder); `base`: another copy of the base."""
        from genlab.lm import load

        folder = next((f for f in (Path(path), Path(path) / "adapter", Path(path) / "model")
                       if (f / SCHEMA_FILE).exists()), Path(path))
        meta = io.read_json(folder / "genlab.json") if (folder / "genlab.json").exists() else {}
        if not (folder / SCHEMA_FILE).exists() or (meta.get("codec") or {}).get("type", "text") != "text":
            raise ModelLoadError(f"{path}: not a text table model (no {SCHEMA_FILE} beside a text model); fit one "
                                 "with fit_text_table (a from-scratch table model loads with TableModel.load)")
        schema = TableSchema.load(folder / SCHEMA_FILE)
        if (folder / "adapter_config.json").exists():
            base = base or io.read_json(folder / "adapter_config.json").get("base_model_name_or_path")
            return cls(load(base, dtype=dtype, device=device, adapters={"table": folder}), schema, "table")
        return cls(load(folder, dtype=dtype, device=device), schema)

    def sample(self, n: int, where: list[str] | dict | None = None, seed: int = 0, batch_size: int = 64,
               temperature: float = 1.0) -> pd.DataFrame:
        """`n` new rows, all valid for the schema and `where` (["sex=F", "age=40..60"] or {"sex": "F"})."""
        if n < 1 or batch_size < 1 or not temperature > 0:
            raise InvalidParameterError("n and batch_size must be >= 1 and temperature > 0")
        tok = self.model.tokenizer
        lang = RowLanguage(self.schema, tok, [tok.eos_token_id] if tok.eos_token_id is not None
                           else self.model.eos_token_ids, where)
        if lang.start[1] == lang.all:  # every column fixed: nothing left to sample
            return decode_rows([lang.prefix_text[:-1]] * n, self.schema)
        prompt, texts = lang.prompt_ids(), []
        with self.model.using(self.adapter):
            for start in range(0, n, batch_size):
                rows = [lang.constraint() for _ in range(min(batch_size, n - start))]
                params = SamplingParams(max_new_tokens=lang.max_tokens, temperature=temperature, seed=seed + start,
                                        n=len(rows))
                self.model.engine.generate([prompt], params, constraints=rows)
                texts += [row.text() for row in rows]
        return decode_rows(texts, self.schema)


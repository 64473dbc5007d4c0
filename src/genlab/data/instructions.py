"""Instruction data for supervised fine-tuning, in TRL's JSONL conventions.

A record is either
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: a chat,
  rendered with the model's chat template; every assistant message carries loss; or
- `{"prompt": "...", "completion": "..."}`: loss on the completion (and the eos after it) only.
  `prompt` and `completion` may also be message lists (TRL's conversational prompt/completion).

Each loss-carrying span is tokenized on its own, exactly as generation will see it: the
prompt as `render(messages so far, add_generation_prompt=True)`, the answer as what the
template adds after it. Errors name the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from genlab.codecs.text import render_chat
from genlab.data.readers import iter_jsonl, list_files
from genlab.data.tokens import in_heldout_split
from genlab.errors import DataError, InvalidParameterError


@dataclass
class Example:
    ids: np.ndarray  # token ids (int64)
    labels: np.ndarray  # bool: True where the token is an answer token (predicted with loss)
    where: str  # "file:line"

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens before the first answer token (what generation is prompted with)."""
        first = int(np.argmax(self.labels)) if self.labels.any() else len(self.ids)
        return self.ids[:first].tolist()


@dataclass
class ExampleStats:
    records: int = 0
    duplicates: int = 0
    empty_answers: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    train: int = 0
    val: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    longest: int = 0

    def rows(self) -> list[tuple[str, str]]:
        names = {"records": "records read", "duplicates": "duplicates dropped", "empty_answers": "empty answers dropped",
                 "truncated": "truncated (too long)", "dropped_too_long": "dropped (too long)", "train": "train examples",
                 "val": "held-out examples", "tokens": "tokens (kept)", "answer_tokens": "answer tokens (with loss)",
                 "longest": "longest example (tokens)"}
        return [(names[k], f"{v:,}") for k, v in asdict(self).items()]


@dataclass
class ExampleSet:
    train: list[Example]
    val: list[Example]
    stats: ExampleStats = field(default_factory=ExampleStats)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e in self.train + self.val:
            h.update(e.ids.tobytes())
            h.update(e.labels.tobytes())
        return h.hexdigest()


def iter_records(sources: str | Path | Iterable, glob: str = "**/*") -> Iterator[tuple[str, dict]]:
    """("file:line", record) for every non-empty line of the JSONL files among `sources`."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    for source in sources:
        for f in list_files(source, glob):
            if f.suffix.lower() != ".jsonl":
                raise DataError(f"{f}: instruction data must be JSONL (messages or prompt/completion records)")
            try:
                for n, record in iter_jsonl(f):
                    yield f"{f}:{n}", record
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start})") from None


def is_instruction_record(record: dict) -> bool:
    return "messages" in record or ("prompt" in record and "completion" in record)


def detect_mode(sources, glob: str = "**/*") -> str:
    """"sft" when the first JSONL record is a chat or prompt/completion, else "cpt" (raw text)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files = [f for s in sources for f in list_files(s, glob)]
    if files and all(f.suffix.lower() == ".jsonl" for f in files):
        for _, record in iter_records(files[:1]):
            return "sft" if is_instruction_record(record) else "cpt"
    return "cpt"


def _messages(value, where: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'")
    return value


def _render(tokenizer, messages, add_generation_prompt: bool, where: str) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except InvalidParameterError as e:
        raise DataError(f"{where}: chat template error: {e}") from None


def _chat_segments(tokenizer, messages: list[dict], trained, where: str) -> list[tuple[str, bool]]:
    """The rendered chat as (text, carries loss) pieces; `trained(i)` says which messages do."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if not trained(i):
            continue
        prompt = _render(tokenizer, messages[:i], True, where) if i else ""
        full = _render(tokenizer, messages[: i + 1], False, where)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render message {i} as a continuation of the "
                            "conversation before it, so its tokens cannot be located")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def encode_record(tokenizer, record: dict, where: str) -> Example | None:
    """Token ids and label mask of one record; None when its answer is empty."""
    eos = tokenizer.eos_token_id
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message (nothing to learn from)")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            return None
        pieces = _chat_segments(tokenizer, messages, lambda i: messages[i]["role"] == "assistant", where)
        special = False  # the template writes bos itself
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                return None
            pieces, special = [(prompt, False), (completion, True)], True
        elif isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
            if not any(m["content"].strip() for m in completion):
                return None
            pieces = _chat_segments(tokenizer, messages, lambda i: i >= len(prompt), where)
            special = False
        else:
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
    else:
        raise DataError(f"{where}: expected 'messages' or 'prompt' + 'completion' (TRL's conventions); "
                        f"found fields {', '.join(sorted(record)) or 'none'}")
    ids: list[int] = []
    labels: list[bool] = []
    for k, (text, trained) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=special and k == 0)["input_ids"] if text else []
        ids += piece
        labels += [trained] * len(piece)
    if special and eos is not None:  # plain-text completions end with eos, so generation learns to stop
        ids.append(eos)
        labels.append(True)
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=bool), where)


def prepare_examples(sources, tokenizer, max_tokens: int, val_fraction: float = 0.1, overlong: str = "truncate",
                     glob: str = "**/*", records: Iterable[tuple[str, dict]] | None = None) -> ExampleSet:
    """Read, validate, tokenize, de-duplicate and split instruction records.

    `max_tokens`: the longest example kept; longer ones are cut to it (`overlong="truncate"`,
    dropped if no answer token survives) or dropped (`"drop"`). The held-out split is by a
    stable hash of each record, with the last examples held out when the hash picks none.
    """
    if overlong not in ("truncate", "drop"):
        raise InvalidParameterError(f"overlong must be 'truncate' or 'drop', not {overlong!r}")
    stats, seen = ExampleStats(), set()
    train, val = [], []
    for where, record in records if records is not None else iter_records(sources, glob):
        stats.records += 1
        key = json.dumps({k: record.get(k) for k in ("messages", "prompt", "completion")}, sort_keys=True)
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        example = encode_record(tokenizer, record, where)
        if example is None:
            stats.empty_answers += 1
            continue
        if len(example.ids) > max_tokens:
            if overlong == "drop" or not example.labels[1:max_tokens].any():
                stats.dropped_too_long += 1
                continue
            example = Example(example.ids[:max_tokens], example.labels[:max_tokens], where)
            stats.truncated += 1
        (val if in_heldout_split(key, val_fraction) else train).append(example)
    if not train and not val:
        raise DataError("no usable instruction examples (every record was a duplicate, empty or too long)")
    if not val or not train:
        everything = train + val
        cut = len(everything) - max(1, round(len(everything) * val_fraction))
        if cut < 1:
            raise DataError(f"{len(everything)} usable example(s): at least 2 are needed (one is held out)")
        train, val = everything[:cut], everything[cut:]
    stats.train, stats.val = len(train), len(val)
    stats.tokens = sum(len(e.ids) for e in train + val)
    stats.answer_tokens = sum(int(e.labels.sum()) for e in train + val)
    stats.longest = max(len(e.ids) for e in train + val)
    return ExampleSet(train, val, stats)

"""Readers: documents from text files, folders, JSONL, CSV and Parquet.

Every error names the file (and line, for JSONL) at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from genlab.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".html", ".htm", ".tex"}
TABLE_SUFFIXES = {".jsonl", ".csv", ".parquet"}


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line of a JSONL file; errors name file:line."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            yield n, record


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for n, record in iter_jsonl(path):
        if isinstance(record.get(field), str):
            yield record[field]
        elif isinstance(record.get("messages"), list):
            yield "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            yield record["prompt"] + record["completion"]
        else:
            raise DataError(f"{path}:{n}: no text field (expected '{field}', 'messages' or 'prompt'+'completion')")


def _table_texts(path: Path, column: str) -> Iterator[str]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path, columns=None) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # parser errors of either format: one line naming the file
        raise DataError(f"{path}: unreadable {path.suffix[1:]} file ({type(e).__name__}: {e})") from None
    if column not in frame.columns:
        raise DataError(f"{path}: no column '{column}' (columns: {', '.join(map(str, frame.columns[:10]))})")
    for value in frame[column]:
        if isinstance(value, str):
            yield value


def list_files(source: str | Path, glob: str = "**/*") -> list[Path]:
    """The readable files of a source: itself, or a folder's matches (sorted) for `glob`."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = TEXT_SUFFIXES | TABLE_SUFFIXES
        return sorted(p for p in path.glob(glob) if p.is_file() and p.suffix.lower() in suffixes)
    raise DataError(f"{path}: no such file or folder")


def iter_texts(sources: str | Path | Iterable[str | Path], field: str = "text", glob: str = "**/*") -> Iterator[str]:
    """Non-empty documents from files and folders (recursive by default).

    Plain-text files are one document each; JSONL records give `field` (or chat `messages`, or
    `prompt` + `completion`); CSV and Parquet files give column `field`.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    for source in sources:
        for f in list_files(source, glob):
            suffix = f.suffix.lower()
            try:
                if suffix == ".jsonl":
                    texts = _jsonl_texts(f, field)
                elif suffix in (".csv", ".parquet"):
                    texts = _table_texts(f, field)
                else:
                    texts = iter([f.read_text(encoding="utf-8")])
                yield from (t for t in texts if t)
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start})") from None
            except OSError as e:
                raise DataError(f"{f}: unreadable ({e.strerror})") from None

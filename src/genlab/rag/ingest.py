"""Document loaders for retrieval: files -> text sections with title and page.

.txt .md .rst .py as text; .html/.htm with tags stripped (title from <title> or the first
heading); .pdf page by page (pypdf); .csv / .jsonl rows, the chosen text columns joined. A file
that cannot be used (binary, encrypted or broken PDF, empty, not UTF-8) raises Skip with the
reason, which the indexer reports and moves past.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

TEXT = {".txt", ".md", ".rst", ".py"}
HTML = {".html", ".htm"}
SUFFIXES = TEXT | HTML | {".pdf", ".csv", ".jsonl"}


class Skip(Exception):
    """This file is left out of the index, for the stated reason."""


@dataclass
class Section:
    text: str
    page: int | None = None  # 1-based PDF page, or row number for tables


@dataclass
class Document:
    path: str
    kind: str  # the suffix without the dot
    title: str
    sections: list[Section] = field(default_factory=list)


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript"}
    BLOCK = {"p", "div", "br", "li", "tr", "pre", "section", "article", "table", "ul", "ol"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self._stack.append(tag)
        if re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")  # headings become Markdown headings
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass
        if re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self._stack and self._stack[-1] in self.SKIP:
            return
        if self._stack and self._stack[-1] == "title":
            self.title += data.strip()
            return
        self.parts.append(data)


def _read_text(path: Path, raw: bytes) -> str:
    if b"\x00" in raw[:8192]:
        raise Skip("binary file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip(f"not UTF-8 text (byte {e.start})") from None


def _first_heading(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line.lstrip("#").strip()[:120]
    return ""


def _pdf(raw: bytes) -> tuple[str, list[Section]]:
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings would repeat our one-line reason
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted:
            raise Skip("encrypted PDF")
        pages = [Section(page.extract_text() or "", i + 1) for i, page in enumerate(reader.pages)]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except Skip:
        raise
    except (PdfReadError, ValueError, KeyError, OSError, TypeError) as e:
        raise Skip(f"unreadable PDF ({type(e).__name__})") from None
    return title, pages


def _rows(path: Path, raw: bytes, columns: list[str]) -> list[Section]:
    text = _read_text(path, raw)
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise Skip(f"line {n}: invalid JSON ({e.msg})") from None
    else:
        import csv
        import io

        rows = [(n + 1, r) for n, r in enumerate(csv.DictReader(io.StringIO(text)), 1)]
    missing = [c for c in columns if rows and isinstance(rows[0][1], dict) and c not in rows[0][1]]
    if missing:
        raise Skip(f"no column(s) {', '.join(missing)}")
    return [Section("\n".join(str(r.get(c, "")) for c in columns if r.get(c)), n) for n, r in rows if isinstance(r, dict)]


def load_document(path: Path, raw: bytes, columns: list[str] = ("text",)) -> Document:
    """Parse a file's bytes into a Document; raise Skip when it can't be indexed."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise Skip(f"unsupported file type {suffix or '(none)'}")
    title = ""
    if suffix == ".pdf":
        title, sections = _pdf(raw)
    elif suffix in (".csv", ".jsonl"):
        sections = _rows(path, raw, list(columns))
    elif suffix in HTML:
        parser = _HTMLText()
        parser.feed(_read_text(path, raw))
        text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", "".join(parser.parts))).strip()
        title, sections = parser.title, [Section(text)]
    else:
        sections = [Section(_read_text(path, raw))]
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        raise Skip("empty document (no text)")
    return Document(str(path), suffix[1:], title or _first_heading(sections[0].text) or path.stem, sections)

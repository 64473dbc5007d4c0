"""Structure-aware chunking to a token budget, with overlap.

A text is read as blocks: Markdown and reStructuredText headings, fenced code blocks and
paragraphs. Headings set the heading path of what follows and always start a new chunk; code
blocks and paragraphs are packed into chunks of at most `max_tokens` tokens, and a block that
is larger on its own is cut at sentence, then line, then character boundaries. A chunk that
follows another of the same section repeats the last pieces of it, up to `overlap` tokens.
Every chunk is an exact slice text[start:end] of its section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

HEADING_MD = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
RST_UNDERLINE = re.compile(r"^([=\-~^*#+`'\".:_])\1{2,}\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass
class Chunk:
    text: str
    heading: str  # heading path, " > "-joined ("" before the first heading)
    start: int  # character span in the section's text
    end: int


@dataclass
class _Piece:
    start: int
    end: int
    heading: tuple[str, ...]
    tokens: int = 0


def _blocks(text: str) -> list[tuple[int, int, str, int, str]]:
    """(start, end, kind, level, title) for headings ("h"), code ("code") and paragraphs ("p")."""
    lines = text.splitlines(keepends=True)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    out, i, para = [], 0, None
    rst_levels: list[str] = []

    def close(end_line: int):
        nonlocal para
        if para is not None:
            out.append((offsets[para], offsets[end_line - 1] + len(lines[end_line - 1].rstrip("\r\n")), "p", 0, ""))
            para = None

    while i < len(lines):
        line = lines[i].rstrip("\r\n")
        nxt = lines[i + 1].rstrip("\r\n") if i + 1 < len(lines) else ""
        md = HEADING_MD.match(line)
        if FENCE.match(line):
            close(i)
            j = i + 1
            while j < len(lines) and not FENCE.match(lines[j]):
                j += 1
            j = min(j, len(lines) - 1)
            out.append((offsets[i], offsets[j] + len(lines[j].rstrip("\r\n")), "code", 0, ""))
            i = j + 1
        elif md:
            close(i)
            out.append((offsets[i], offsets[i] + len(line), "h", len(md.group(1)), md.group(2)))
            i += 1
        elif line.strip() and RST_UNDERLINE.match(nxt) and len(nxt.strip()) >= len(line.strip()) and para is None:
            char = nxt.strip()[0]
            if char not in rst_levels:
                rst_levels.append(char)
            out.append((offsets[i], offsets[i + 1] + len(nxt), "h", rst_levels.index(char) + 1, line.strip()))
            i += 2
        elif not line.strip():
            close(i)
            i += 1
        else:
            para = i if para is None else para
            i += 1
    close(len(lines))
    return out


def _split(text: str, start: int, end: int, count: Callable[[str], int], max_tokens: int) -> list[tuple[int, int]]:
    """Cut [start, end) into spans of at most max_tokens: at sentences, then lines, then characters."""
    if count(text[start:end]) <= max_tokens:
        return [(start, end)]
    for pattern in (SENTENCE_END, re.compile(r"\n")):
        cuts = [start] + [start + m.end() for m in pattern.finditer(text[start:end])] + [end]
        spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]
        if len(spans) > 1:
            return [s for a, b in spans for s in _split(text, a, b, count, max_tokens)]
    width = max(1, (end - start) * max_tokens // max(count(text[start:end]), 1))
    return [(a, min(a + width, end)) for a in range(start, end, width)]


def chunk_text(text: str, count: Callable[[str], int], max_tokens: int = 200, overlap: int = 32) -> list[Chunk]:
    """Chunks of `text` (see the module docstring). `count(s)` = number of tokens in s."""
    if max_tokens < 8 or not 0 <= overlap < max_tokens:
        raise ValueError("max_tokens must be >= 8 and 0 <= overlap < max_tokens")
    pieces: list[_Piece] = []
    path: list[tuple[int, str]] = []
    for start, end, kind, level, title in _blocks(text):
        if kind == "h":
            path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
            continue
        heading = tuple(t for _, t in path)
        for a, b in _split(text, start, end, count, max_tokens):
            pieces.append(_Piece(a, b, heading, count(text[a:b])))
    chunks: list[Chunk] = []
    current: list[_Piece] = []

    def emit():
        if current:
            s, e = current[0].start, current[-1].end
            chunks.append(Chunk(text[s:e], " > ".join(current[0].heading), s, e))

    for piece in pieces:
        # tokens of the joined span: the pieces plus the (few) separator tokens between them
        size = sum(p.tokens for p in current) + piece.tokens + len(current)
        if current and (piece.heading != current[0].heading or size > max_tokens):
            emit()
            same_section = piece.heading == current[0].heading
            carry: list[_Piece] = []
            if same_section and overlap:
                for p in reversed(current):
                    if sum(c.tokens for c in carry) + p.tokens + piece.tokens + len(carry) + 1 > max_tokens:
                        break
                    if sum(c.tokens for c in carry) + p.tokens > overlap:
                        break
                    carry.insert(0, p)
            current = carry
        current.append(piece)
    emit()
    return chunks

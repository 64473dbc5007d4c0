"""The bundled offline corpus: documentation that every CPython install ships.

No download: `pydoc_data.topics` (the language reference behind `help()`, ~80 long topics) plus
the docstrings of the standard library's source files, read with `ast` (nothing is imported).
Deterministic order; exact duplicates and one-liners removed. On CPython 3.11: about 6,300
documents, 2 M characters, ~4 s to read.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@functools.cache  # ~4 s of parsing; the standard library does not change within a process
def stdlib_docstrings() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    docs = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a stray non-Python or badly encoded file: not corpus material
        docs += [ast.get_docstring(node) or "" for node in ast.walk(tree) if isinstance(node, DOC_NODES)]
    return tuple(docs)


def python_docs_corpus(max_docs: int | None = None) -> list[str]:
    """Documents from CPython's bundled documentation, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)] + list(stdlib_docstrings())
    seen, out = set(), []
    for d in docs:
        d = d.strip()
        if len(d) >= 40 and d not in seen:  # one-liners like "Return self." carry no signal
            seen.add(d)
            out.append(d)
    return out[:max_docs] if max_docs else out

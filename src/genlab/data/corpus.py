"""The bundled offline corpora: text that installed packages ship, no download.

- General (pretraining): CPython's documentation, `pydoc_data.topics` (the language reference
  behind `help()`, ~80 long topics) plus the docstrings of the standard library's source files,
  read with `ast` (nothing is imported). On CPython 3.11: ~6,300 documents, 2 M characters, ~4 s.
- Domain (adaptation demo): statistics reference text, the docstrings of `scipy.stats` plus the
  dataset descriptions shipped by scikit-learn and statsmodels: ~350 documents, 1.6 M characters.
  `statistics_instructions()` turns the scipy.stats docstrings into question/answer pairs.

Deterministic order; exact duplicates and one-liners removed.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
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


def _unique(docs, max_docs: int | None = None) -> list[str]:
    seen, out = set(), []
    for d in docs:
        d = d.strip()
        if len(d) >= 40 and d not in seen:  # one-liners like "Return self." carry no signal
            seen.add(d)
            out.append(d)
    return out[:max_docs] if max_docs else out


def python_docs_corpus(max_docs: int | None = None) -> list[str]:
    """Documents from CPython's bundled documentation, in a fixed order."""
    from pydoc_data.topics import topics

    return _unique([topics[k] for k in sorted(topics)] + list(stdlib_docstrings()), max_docs)


@functools.cache
def _scipy_stats_docs() -> tuple[tuple[str, str], ...]:
    import scipy.stats

    pairs = []
    for name in sorted(scipy.stats.__all__):
        doc = inspect.getdoc(getattr(scipy.stats, name, None))
        if doc and len(doc) >= 200:  # skip aliases and stubs
            # Some docstrings embed example output drawn at import time ("# may vary"): drop it,
            # so that the corpus (and the data cache key) is the same in every process.
            pairs.append((name, "\n".join(line for line in doc.splitlines() if not line.endswith("# may vary"))))
    return tuple(pairs)


def _dataset_descriptions() -> list[str]:
    from importlib import resources

    import statsmodels.datasets

    docs = [f.read_text(encoding="utf-8") for f in sorted(resources.files("sklearn.datasets.descr").iterdir(),
                                                            key=lambda f: f.name) if f.name.endswith(".rst")]
    for mod in sorted(m.name for m in pkgutil.iter_modules(statsmodels.datasets.__path__)):
        if mod.startswith("_") or mod in ("utils", "tests"):
            continue
        m = importlib.import_module(f"statsmodels.datasets.{mod}")
        parts = [str(getattr(m, a, "")).strip() for a in ("TITLE", "SOURCE", "DESCRSHORT", "DESCRLONG", "NOTE")]
        docs.append("\n\n".join(p for p in parts if p))
    return docs


def statistics_corpus(max_docs: int | None = None) -> list[str]:
    """The domain demo corpus: scipy.stats docstrings and dataset descriptions, fixed order."""
    return _unique([doc for _, doc in _scipy_stats_docs()] + _dataset_descriptions(), max_docs)


def statistics_instructions() -> list[dict]:
    """Question/answer pairs (TRL's prompt/completion convention) from scipy.stats docstrings:
    "What does scipy.stats.NAME do?" -> the docstring's first paragraph."""
    out = []
    for name, doc in _scipy_stats_docs():
        summary = doc.split("\n\n")[0].replace("\n", " ").strip()
        if len(summary) >= 20:
            out.append({"prompt": f"What does scipy.stats.{name} do?", "completion": " " + summary})
    return out

"""`genlab index`: documents -> chunks -> embeddings -> store, incrementally by content hash.

Unchanged files (same SHA-256) are left untouched, changed ones re-chunked and re-embedded,
files that vanished from the indexed folders removed; all in one transaction. Files that
cannot be used are skipped with the reason in the report.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genlab.errors import DataError
from genlab.rag.chunk import chunk_text
from genlab.rag.embed import Embedder
from genlab.rag.ingest import SUFFIXES, Skip, load_document
from genlab.rag.store import Store


@dataclass
class IndexReport:
    store: Path
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks_embedded: int = 0
    chunks_total: int = 0
    seconds: float = 0.0


def list_sources(sources, glob: str = "**/*") -> tuple[list[Path], list[Path]]:
    """(files to index, folder roots). Folders are searched recursively for known file types;
    a file named explicitly is always tried (and skipped with a reason if unusable)."""
    files, roots = [], []
    for source in [sources] if isinstance(sources, (str, Path)) else sources:
        path = Path(source).resolve()
        if path.is_dir():
            roots.append(path)
            files += sorted(p for p in path.glob(glob) if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{source}: no such file or folder")
    return list(dict.fromkeys(files)), roots


def index(sources, store: str | Path, embedder: Embedder | str | None = None, glob: str = "**/*",
          columns: tuple[str, ...] = ("text",), max_tokens: int = 200, overlap: int = 32,
          console: Console | None = None) -> IndexReport:
    console = console or Console(stderr=True)
    start = time.perf_counter()
    embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
    budget = min(max_tokens, embedder.max_tokens - 16)  # room for the title/heading prefix
    files, roots = list_sources(sources, glob)
    db = Store(store, embedder.id, embedder.dim, create=True)
    report = IndexReport(Path(store))
    known = db.files()
    pending = []  # (path, hash, doc, chunks)
    for f in files:
        path = str(f)
        try:
            raw = f.read_bytes()
        except OSError as e:
            report.skipped.append((path, f"unreadable ({e.strerror})"))
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if known.get(path) == digest:
            report.unchanged.append(path)
            continue
        try:
            doc = load_document(f, raw, columns)
        except Skip as why:
            report.skipped.append((path, str(why)))
            continue
        chunks = [{"heading": c.heading, "page": s.page, "start": c.start, "end": c.end, "text": c.text}
                  for s in doc.sections for c in chunk_text(s.text, embedder.count_tokens, budget, overlap)]
        pending.append((path, digest, doc, chunks))
    present = {str(f) for f in files}
    # removed: files deleted from disk, and files of an indexed folder that are no longer in it
    gone = [p for p in known if p not in present
            and (not Path(p).exists() or any(Path(p).is_relative_to(r) for r in roots))]
    texts = [f"{doc.title} > {c['heading']}: {c['text']}" if c["heading"] else f"{doc.title}: {c['text']}"
             for _, _, doc, chunks in pending for c in chunks]
    with Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                  TimeRemainingColumn(), console=console, disable=not texts) as progress:
        task = progress.add_task("embed", total=len(texts))
        vectors = embedder.encode(texts, progress=lambda n: progress.advance(task, n))
    with db.transaction():
        i = 0
        for path, digest, doc, chunks in pending:
            db.put_file(path, digest, doc.kind, doc.title, chunks, vectors[i : i + len(chunks)])
            i += len(chunks)
            (report.updated if path in known else report.added).append(path)
        for path in gone:
            db.remove_file(path)
            report.removed.append(path)
    db.vector_index()  # rebuild the FAISS file for the new generation now, not at the first query
    report.chunks_embedded, report.chunks_total = len(texts), db.count()
    report.seconds = time.perf_counter() - start
    db.close()
    return report

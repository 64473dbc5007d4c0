"""Captions and images as one token stream (the DALL-E 1 layout) for a text-to-image model.

    BOS  caption words  SEP  64 image codes (raster order)  EOS

Ids: 0 pad, 1 BOS, 2 SEP ("begin image"), 3 EOS; then the caption words (offset 4); then the
image tokenizer's codes (offset 4 + caption vocabulary). An empty
caption (BOS SEP ...) is the unconditional prompt that caption dropout trains and
classifier-free guidance uses.

Captions use a word vocabulary (lowercased words and punctuation marks of the training captions,
most frequent first, capped) rather than a BPE: a word is the unit a caption composes ("red" +
"square"), and a word the training captions never show is left out of the prompt (`unknown`
lists them) instead of being split into pieces whose embeddings were never trained (a BPE
trained on the scene captions turns the unseen "and" into "an" + "d": a stray article and an
untrained byte).

A model folder holds the vocabulary in `caption_tokenizer/caption_vocab.json` and the image
tokenizer in `image_tokenizer/`; its genlab.json names the codec {"type": "text-image", ...},
which `genlab.model.io.load` reads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from genlab.errors import InvalidParameterError, ModelLoadError

PAD, BOS, SEP, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<image>", "<eos>")
CAPTION_DIR, IMAGE_DIR, VOCAB_FILE = "caption_tokenizer", "image_tokenizer", "caption_vocab.json"
CODEC_TYPE = "text-image"
WORD = re.compile(r"[\w']+|[^\w\s]")  # words (with apostrophes) and single punctuation marks


def split_words(text: str, lowercase: bool = True) -> list[str]:
    return WORD.findall(text.lower() if lowercase else text)


class CaptionVocab:
    """Words <-> ids (0 ... len - 1); words outside the vocabulary are dropped when encoding."""

    def __init__(self, words: list[str], lowercase: bool = True):
        self.words, self.lowercase = list(dict.fromkeys(words)), lowercase
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def train(cls, captions: list[str], lowercase: bool = True, max_words: int = 8192, min_count: int = 1) -> "CaptionVocab":
        """The `max_words` most frequent words seen at least `min_count` times (ties by first use)."""
        counts = Counter(w for c in captions if c for w in split_words(c, lowercase))
        ranked = [w for w, n in counts.most_common() if n >= min_count][:max_words]
        if not ranked:
            raise InvalidParameterError("no words in the captions to build a vocabulary from")
        return cls(ranked, lowercase)

    def encode(self, text: str) -> list[int]:
        return [self.index[w] for w in split_words(text, self.lowercase) if w in self.index]

    def unknown(self, text: str) -> list[str]:
        """The words of `text` that the vocabulary lacks (encode leaves them out)."""
        return [w for w in split_words(text, self.lowercase) if w not in self.index]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)

    def save_pretrained(self, folder) -> None:
        from genlab.fsutil import write_json

        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / VOCAB_FILE, {"words": self.words, "lowercase": self.lowercase})

    @classmethod
    def from_folder(cls, folder) -> "CaptionVocab":
        path = Path(folder) / VOCAB_FILE
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            return cls(list(spec["words"]), bool(spec.get("lowercase", True)))
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: not a caption vocabulary ({e})") from None


class TextImageCodec:
    """caption (str) + image codes [h*w] <-> one id sequence (see the module docstring)."""

    bos_token_id, eos_token_id, pad_token_id, sep_token_id = BOS, EOS, PAD, SEP

    def __init__(self, vocab: CaptionVocab, image_tokenizer, max_caption_tokens: int = 64):
        if max_caption_tokens < 1:
            raise InvalidParameterError("max_caption_tokens must be >= 1")
        self.vocab, self.image, self.max_caption_tokens = vocab, image_tokenizer, int(max_caption_tokens)
        self.text_offset = len(SPECIALS)
        self.text_vocab = len(vocab)
        self.image_offset = self.text_offset + self.text_vocab
        self.codebook_size = image_tokenizer.codebook_size
        self.tokens_per_image = image_tokenizer.tokens_per_image

    def __len__(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def max_length(self) -> int:
        """Tokens in the longest sequence: BOS + caption + SEP + image + EOS."""
        return self.max_caption_tokens + self.tokens_per_image + 3

    # --- encode / decode --------------------------------------------------------------------
    def caption_ids(self, caption: str | None) -> list[int]:
        """Caption word ids (offset into the shared vocabulary), cut to max_caption_tokens."""
        if not caption:
            return []
        return [self.text_offset + i for i in self.vocab.encode(caption)[: self.max_caption_tokens]]

    def prompt(self, caption: str | None) -> list[int]:
        """What generation starts from: BOS caption SEP (BOS SEP for the empty caption)."""
        return [BOS, *self.caption_ids(caption), SEP]

    def encode(self, caption: str | None, codes) -> list[int]:
        """BOS caption SEP codes EOS; `codes` are image-tokenizer codes [h, w] or [h*w]."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size != self.tokens_per_image:
            raise InvalidParameterError(f"an image is {self.tokens_per_image} codes, got {codes.size}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise InvalidParameterError(f"image codes must be in [0, {self.codebook_size})")
        return [*self.prompt(caption), *(codes + self.image_offset).tolist(), EOS]

    def decode(self, ids) -> tuple[str, np.ndarray]:
        """(caption words, image codes [h*w]) of a sequence that `encode` wrote."""
        ids = list(ids)
        if not ids or ids[0] != BOS or SEP not in ids:
            raise InvalidParameterError("not a caption+image sequence (expected BOS ... SEP ...)")
        sep = ids.index(SEP)
        caption = self.vocab.decode([i - self.text_offset for i in ids[1:sep]])
        image = [i for i in ids[sep + 1:] if i != EOS and i != PAD]
        return caption, self.codes_of(image)

    def codes_of(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < self.image_offset or ids.max() >= len(self)):
            raise InvalidParameterError("ids outside the image-code range")
        return ids - self.image_offset

    def attention_mask(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, T, T] (True = may attend): causal, padding (False in `valid` [B, T])
        never attended to; a padding query attends to itself, so no softmax row is empty."""
        t = ids.shape[1]
        eye = torch.eye(t, dtype=torch.bool, device=ids.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        return ((causal & valid[:, None, :]) | eye)[:, None]

    # --- folders -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": CODEC_TYPE, "layout": list(SPECIALS) + ["caption words", "image codes"],
                "text_offset": self.text_offset, "text_vocab": self.text_vocab, "image_offset": self.image_offset,
                "codebook_size": self.codebook_size, "tokens_per_image": self.tokens_per_image,
                "grid": list(self.image.grid), "image_size": self.image.config.size, "lowercase": self.vocab.lowercase,
                "max_caption_tokens": self.max_caption_tokens, "caption_tokenizer": CAPTION_DIR,
                "image_tokenizer": IMAGE_DIR}

    def save_pretrained(self, folder) -> None:
        self.vocab.save_pretrained(Path(folder) / CAPTION_DIR)
        self.image.save_pretrained(Path(folder) / IMAGE_DIR)

    @classmethod
    def from_folder(cls, folder, spec: dict | None = None, device: str = "cpu") -> "TextImageCodec":
        from genlab.codecs.image import ImageTokenizer

        folder = Path(folder)
        spec = spec or {}
        vocab = CaptionVocab.from_folder(folder / spec.get("caption_tokenizer", CAPTION_DIR))
        image = ImageTokenizer.from_folder(folder / spec.get("image_tokenizer", IMAGE_DIR), device=device)
        try:
            codec = cls(vocab, image, spec.get("max_caption_tokens", 64))
        except InvalidParameterError as e:
            raise ModelLoadError(f"{folder / 'genlab.json'}: {e}") from None
        for key in ("text_vocab", "codebook_size", "image_offset"):
            if key in spec and spec[key] != getattr(codec, key):
                raise ModelLoadError(f"{folder}: genlab.json says {key} = {spec[key]} but the tokenizers give "
                                     f"{getattr(codec, key)}")
        return codec

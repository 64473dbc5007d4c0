"""Captions and images as one token stream (the DALL-E 1 layout) for a text-to-image model.

    BOS  caption words  SEP  64 image codes (raster order)  EOS

Ids: 0 pad, 1 BOS, 2 SEP ("begin image"), 3 EOS; then the caption vocabulary (offset 4, its
first entry <unk>); then the image tokenizer's codes (offset 4 + caption vocabulary). An empty
caption (BOS SEP ...) is the unconditional prompt that caption dropout trains and
classifier-free guidance uses.

Captions use a word vocabulary (lowercased words and punctuation marks seen in the training
captions, most frequent first, capped) rather than a BPE: a word is the unit a caption composes
("red" + "square"), and a word the training captions never show becomes <unk>, whose meaning
("some word, ignore it") word dropout teaches during training. A BPE would instead split an
unseen word into pieces whose embeddings were never trained (on the scene captions, "and" would
become "an" + "d": a stray article and an untrained byte).

`caption_attention` = "words" (the default) lets each caption word attend only to BOS and to
itself, while SEP and the image codes attend to everything before them: the image positions
then read each word's own representation, in-distribution even when the *combination* of words
is new (a contextual encoding of "red square" is out of distribution when the training captions
never pair them); word order still reaches them through the rotary positions. "causal" is the
plain causal mask. Either way the weights are a plain Llama model; the mask is part of the codec.

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
UNK = "<unk>"
CAPTION_DIR, IMAGE_DIR, VOCAB_FILE = "caption_tokenizer", "image_tokenizer", "caption_vocab.json"
CODEC_TYPE = "text-image"
ATTENTION_MODES = ("words", "causal")
WORD = re.compile(r"[\w']+|[^\w\s]")  # words (with apostrophes) and single punctuation marks


def split_words(text: str, lowercase: bool = True) -> list[str]:
    return WORD.findall(text.lower() if lowercase else text)


class CaptionVocab:
    """Words <-> ids; id 0 is <unk>."""

    def __init__(self, words: list[str], lowercase: bool = True):
        self.words = [UNK] + [w for w in words if w != UNK]
        self.lowercase = lowercase
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def train(cls, captions: list[str], lowercase: bool = True, max_words: int = 8192, min_count: int = 1) -> "CaptionVocab":
        """The `max_words` most frequent words seen at least `min_count` times (ties by first use)."""
        counts = Counter(w for c in captions if c for w in split_words(c, lowercase))
        if not counts:
            raise InvalidParameterError("no words in the captions to build a vocabulary from")
        ranked = [w for w, n in counts.most_common() if n >= min_count][: max(1, max_words - 1)]
        return cls(ranked, lowercase)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 0) for w in split_words(text, self.lowercase)]

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

    def __init__(self, vocab: CaptionVocab, image_tokenizer, max_caption_tokens: int = 64,
                 caption_attention: str = "words"):
        if max_caption_tokens < 1:
            raise InvalidParameterError("max_caption_tokens must be >= 1")
        if caption_attention not in ATTENTION_MODES:
            raise InvalidParameterError(f"caption_attention must be one of {', '.join(ATTENTION_MODES)}, "
                                        f"not {caption_attention!r}")
        self.vocab, self.image = vocab, image_tokenizer
        self.max_caption_tokens, self.caption_attention = int(max_caption_tokens), caption_attention
        self.text_offset = len(SPECIALS)
        self.unk_id = self.text_offset  # the vocabulary's entry 0
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

    def attention_mask(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean [B, 1, T, T] (True = may attend) for token ids [B, T] whose padding is
        marked False in `valid` (None: no padding, or only after EOS). None when plain causal
        attention is exactly it."""
        if self.caption_attention == "causal" and valid is None:
            return None
        t = ids.shape[1]
        eye = torch.eye(t, dtype=torch.bool, device=ids.device)
        mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril().expand(len(ids), t, t)
        if valid is not None:
            mask = mask & valid[:, None, :]
        if self.caption_attention == "words":
            word = (ids >= self.text_offset) & (ids < self.image_offset)
            mask = mask & (~word[:, :, None] | (ids == BOS)[:, None, :] | eye)
        return (mask | eye)[:, None]  # a padding query attends to itself: no empty softmax row

    # --- folders -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": CODEC_TYPE, "layout": list(SPECIALS) + ["caption words (<unk> first)", "image codes"],
                "text_offset": self.text_offset, "text_vocab": self.text_vocab, "image_offset": self.image_offset,
                "codebook_size": self.codebook_size, "tokens_per_image": self.tokens_per_image,
                "grid": list(self.image.grid), "image_size": self.image.config.size, "lowercase": self.vocab.lowercase,
                "max_caption_tokens": self.max_caption_tokens, "caption_attention": self.caption_attention,
                "caption_tokenizer": CAPTION_DIR, "image_tokenizer": IMAGE_DIR}

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
            codec = cls(vocab, image, spec.get("max_caption_tokens", 64), spec.get("caption_attention", "words"))
        except InvalidParameterError as e:
            raise ModelLoadError(f"{folder / 'genlab.json'}: {e}") from None
        for key in ("text_vocab", "codebook_size", "image_offset"):
            if key in spec and spec[key] != getattr(codec, key):
                raise ModelLoadError(f"{folder}: genlab.json says {key} = {spec[key]} but the tokenizers give "
                                     f"{getattr(codec, key)}")
        return codec

"""Read a folder of images (and their captions) into one uint8 array for the image codec.

Every image becomes RGB of one square size: grayscale and palette images are converted, alpha
is composited on white, 16-bit images are scaled to 8 bits, the EXIF orientation is applied, and
anything not square is centre-cropped to a square, then resized. Each such repair is counted
and reported as a note; nothing is skipped silently.

Captions come from a sidecar `name.txt` beside `name.png`, or from a `captions.csv` (columns
`file`, `caption`; paths relative to the CSV's folder). Bad input fails with one DataError that
names the file (and CSV line) at fault.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from genlab.errors import DataError, InvalidParameterError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_CSV = "captions.csv"
CAPTION_MODES = ("auto", "required", "none")
log = logging.getLogger("genlab.images")


class ImageFolder(NamedTuple):
    images: np.ndarray  # uint8 [N, S, S, 3]
    captions: list[str | None]  # None where an image has no caption (captions="auto" / "none")
    paths: list[Path]


def normalise_image(img, size: int, counts: Counter | None = None) -> np.ndarray:
    """A PIL image -> uint8 [size, size, 3] RGB; `counts` tallies what had to be repaired."""
    from PIL import Image, ImageOps

    counts = Counter() if counts is None else counts
    img = ImageOps.exif_transpose(img)  # phone photos store "rotate 90" in EXIF, not in the pixels
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's own I -> L conversion clips at 255 instead of scaling, which turns 16-bit scans white
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        counts["16-bit"] += 1
    if img.mode == "P":
        # palette images may carry a transparent index; RGBA keeps it so it is composited below
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        counts["palette"] += 1
    elif img.mode in ("L", "LA", "1"):
        counts["grayscale"] += 1
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
        counts["alpha"] += 1
    img = img.convert("RGB")  # CMYK, YCbCr, L, 1 ... -> RGB
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        counts["cropped"] += 1
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
        counts["resized"] += 1
    return np.asarray(img, dtype=np.uint8)


def read_image(path: Path, size: int, counts: Counter | None = None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file only fails when its pixels are read
            return normalise_image(img, size, counts)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _caption_text(text: str, where: str) -> str:
    caption = " ".join(text.split())  # one line: captions become one token sequence
    if not caption:
        raise DataError(f"{where}: empty caption")
    return caption


def _read_sidecar(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: caption is not UTF-8 text") from None
    return _caption_text(text, str(path))


def _read_captions_csv(path: Path, images: set[Path]) -> dict[Path, tuple[str, str]]:
    """{image path: (caption, "file:line")} from one captions.csv."""
    found: dict[Path, tuple[str, str]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in reader.fieldnames or []]
            if "file" not in fields or "caption" not in fields:
                raise DataError(f"{path}: needs the columns 'file' and 'caption' (found {', '.join(fields) or 'none'})")
            reader.fieldnames = fields
            for row in reader:
                where = f"{path}:{reader.line_num}"
                name = (row.get("file") or "").strip()
                if not name:
                    raise DataError(f"{where}: empty 'file' cell")
                target = Path(os.path.normpath(path.parent / name))  # no resolve(): symlinks stay as listed
                if target not in images:
                    why = "not an image file" if target.is_file() else "no such file"
                    raise DataError(f"{where}: {name!r} names no image in the folder ({why})")
                if target in found:
                    raise DataError(f"{where}: {name!r} is captioned again (first at {found[target][1]})")
                found[target] = (_caption_text(row.get("caption") or "", where), where)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV ({e})") from None
    return found


def _visible(path: Path, root: Path) -> bool:
    # hidden files and folders (.DS_Store, .git, atomic-write temporaries) are not data
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_image_folder(folder, size: int = 32, captions: str = "auto",
                      warn: Callable[[str], None] | None = None) -> ImageFolder:
    """All images under `folder` (recursive, sorted by path) as uint8 [N, size, size, 3].

    captions: "auto" (sidecar / CSV captions where present, None elsewhere), "required" (every
    image needs one) or "none" (ignore caption files). `warn` receives the notes about repaired
    images (default: logged).
    """
    warn = warn or log.warning
    if captions not in CAPTION_MODES:
        raise InvalidParameterError(f"captions must be one of {', '.join(CAPTION_MODES)}; got {captions!r}")
    if size < 4:
        raise InvalidParameterError(f"image size must be at least 4 pixels, got {size}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder of images")
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and _visible(p, root))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"{root}: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in the folder or below")

    caption_of: dict[Path, str] = {}
    if captions != "none":
        caption_of = _collect_captions(root, files, images)
        if captions == "required":
            missing = [p for p in images if p not in caption_of]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise DataError(f"{missing[0]}: image without a caption{more}; add {missing[0].with_suffix('.txt').name} "
                                f"beside it or a row in {CAPTIONS_CSV}")

    counts: Counter = Counter()
    array = np.stack([read_image(p, size, counts) for p in images])
    _report(counts, len(images), size, warn)
    if captions == "auto" and caption_of and len(caption_of) < len(images):
        warn(f"{len(images) - len(caption_of)} of {len(images)} images have no caption")
    return ImageFolder(array, [caption_of.get(p) for p in images], images)


def _collect_captions(root: Path, files: list[Path], images: list[Path]) -> dict[Path, str]:
    image_set = set(images)
    by_stem: dict[Path, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.with_suffix(""), []).append(p)
    caption_of: dict[Path, str] = {}
    where_of: dict[Path, str] = {}
    for txt in (p for p in files if p.suffix.lower() == ".txt"):
        owners = by_stem.get(txt.with_suffix(""), [])
        if not owners:
            raise DataError(f"{txt}: caption file without an image (expected {txt.stem}.png/.jpg/... beside it)")
        if len(owners) > 1:
            names = ", ".join(o.name for o in owners)
            raise DataError(f"{txt}: ambiguous caption: several images share its name ({names})")
        caption_of[owners[0]], where_of[owners[0]] = _read_sidecar(txt), str(txt)
    for sheet in (p for p in files if p.name.lower() == CAPTIONS_CSV):
        for image, (caption, where) in _read_captions_csv(sheet, image_set).items():
            if image in caption_of and caption_of[image] != caption:
                raise DataError(f"{where}: caption for {image.name} differs from {where_of[image]}")
            caption_of[image], where_of[image] = caption, where
    return caption_of


def _report(counts: Counter, n: int, size: int, warn: Callable[[str], None]) -> None:
    notes = {
        "grayscale": "grayscale images converted to RGB",
        "palette": "palette images converted to RGB",
        "16-bit": "16-bit / float images scaled to 8 bits",
        "alpha": "images with transparency composited on white",
        "cropped": "non-square images centre-cropped to a square",
        "resized": f"images resized to {size}x{size}",
    }
    for key, text in notes.items():
        if counts[key]:
            warn(f"{counts[key]} of {n} {text}")

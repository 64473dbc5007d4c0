"""A PNG sheet of images (enlarged, nearest neighbour), optionally one caption per row, written
atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def grid_array(images: np.ndarray, columns: int, labels: list[str] | None = None, scale: int = 4,
               gap: int = 4, label_height: int = 14) -> np.ndarray:
    """uint8 [N, S, S, 3] -> one uint8 sheet; with `labels`, row r gets labels[r] above it."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    n, s = len(images), images.shape[1]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    cell = s * scale
    head = label_height if labels else 0
    width = columns * (cell + gap) + gap
    sheet = np.full((rows * (cell + gap + head) + gap, width, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = gap + r * (cell + gap + head) + head, gap + c * (cell + gap)
        sheet[y:y + cell, x:x + cell] = images[i].repeat(scale, 0).repeat(scale, 1)
    if labels:
        img = Image.fromarray(sheet)
        draw = ImageDraw.Draw(img)
        for r, text in enumerate(labels[:rows]):
            draw.text((gap, gap + r * (cell + gap + head)), text, fill=(20, 20, 20))
        sheet = np.asarray(img)
    return sheet


def save_grid(images: np.ndarray, png, columns: int = 4, labels: list[str] | None = None, scale: int = 4) -> Path:
    """Write the sheet to `png` via a temporary name and a rename."""
    from PIL import Image

    from genlab.fsutil import atomic_file

    png = Path(png)
    with atomic_file(png) as tmp:
        Image.fromarray(grid_array(images, columns, labels, scale)).save(tmp, format="PNG")
    return png

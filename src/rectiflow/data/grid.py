"""Image grids with text labels: the validation sample grid and quickstart's sample sheet.

    labelled_grid(images, rows=["a red heart", ...], cols=["seed 0", "seed 1"])   # PIL image

`images` is row-major (row r, column c at r * len(cols) + c). Each row gets its label (word-wrapped) in a
column to the left, each column its label on top. Uses Pillow's built-in font (no font file needed).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["labelled_grid"]

LABEL_WIDTH = 160  # pixels of the row-label column
FONT_SIZE = 11
PAD = 4


def _font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # FreeType build of Pillow >= 10.1
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: Sequence[Image.Image], rows: Sequence[str], cols: Sequence[str] = (),
                  scale: int = 1) -> Image.Image:
    """A grid of `len(rows)` x max(1, len(cols)) equally sized images with row and column labels; each image
    is enlarged `scale` times (nearest neighbour: small images stay crisp)."""
    n_cols = max(1, len(cols))
    if len(images) != len(rows) * n_cols:
        raise ValueError(f"{len(images)} images for {len(rows)} rows x {n_cols} columns")
    w, h = images[0].size
    w, h = w * scale, h * scale
    font = _font()
    line_h = FONT_SIZE + 3
    top = line_h + PAD if cols else 0
    sheet = Image.new("RGB", (LABEL_WIDTH + n_cols * (w + PAD), top + len(rows) * (h + PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, (LABEL_WIDTH - 2 * PAD) // 6)  # ~6 px a character at this size
    for r, label in enumerate(rows):
        lines = textwrap.wrap(label, chars)[: max(1, h // line_h)]
        y = top + r * (h + PAD) + max(0, (h - line_h * len(lines)) // 2)
        for k, line in enumerate(lines):
            draw.text((PAD, y + k * line_h), line, fill="black", font=font)
        for c in range(n_cols):
            img = images[r * n_cols + c].convert("RGB")
            if scale != 1:
                img = img.resize((w, h), Image.NEAREST)
            sheet.paste(img, (LABEL_WIDTH + c * (w + PAD), top + r * (h + PAD)))
    for c, label in enumerate(cols):
        draw.text((LABEL_WIDTH + c * (w + PAD), PAD // 2), label, fill="black", font=font)
    return sheet

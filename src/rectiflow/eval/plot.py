"""Small line plots as PNG with Pillow only (matplotlib is not a dependency): loss curves, loss by timestep.

    line_plot({"train": [(step, loss), ...], "val": [...]}, "loss.png", title="loss", xlabel="step")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["line_plot"]

# Tableau-10 colours (matplotlib's default cycle), so the plots read like the usual ones.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *, title: str = "",
              xlabel: str = "", ylabel: str = "", logy: bool = False, size: tuple[int, int] = (720, 440),
              markers: bool = False) -> Path:
    """Draw each named series of (x, y) points as a line; axes with ticks, a legend; save as PNG."""
    from PIL import Image, ImageDraw

    pts = {k: [(float(x), float(y)) for x, y in v if math.isfinite(y) and (not logy or y > 0)]
           for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        raise ValueError("line_plot: no finite points to draw")
    ty = (lambda y: math.log10(y)) if logy else (lambda y: y)
    xs = [x for v in pts.values() for x, _ in v]
    ys = [ty(y) for v in pts.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    w, h = size
    left, right, top, bottom = 70, 20, 34, 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (ty(y) - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for xt in _ticks(x0, x1):
        x = px(xt, 10 ** y0 if logy else y0)[0]
        d.line([x, h - bottom, x, h - bottom + 4], fill=(0, 0, 0))
        d.text((x - 12, h - bottom + 6), _fmt(xt), fill=(0, 0, 0))
    for yt in _ticks(y0, y1):
        y = h - bottom - (yt - y0) / (y1 - y0) * (h - top - bottom)
        d.line([left - 4, y, w - right, y], fill=(230, 230, 230))
        d.text((4, y - 6), _fmt(10 ** yt if logy else yt), fill=(0, 0, 0))
    for i, (name, v) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        line = [px(x, y) for x, y in sorted(v)]
        if len(line) > 1:
            d.line(line, fill=color, width=2)
        if markers or len(line) == 1:
            for x, y in line:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([w - right - 150, top + 10 + 14 * i, w - right - 130, top + 10 + 14 * i], fill=color, width=3)
        d.text((w - right - 125, top + 4 + 14 * i), name, fill=(0, 0, 0))
    d.text((left, 10), title, fill=(0, 0, 0))
    d.text(((w - len(xlabel) * 6) / 2, h - 18), xlabel, fill=(0, 0, 0))
    d.text((4, top - 16), ylabel + (" (log)" if logy else ""), fill=(0, 0, 0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out

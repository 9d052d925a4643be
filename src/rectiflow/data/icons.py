"""A small procedural dataset that is not the shapes world: flat single-colour icons with one-line captions.

    write_icons("data/icons", n=400, size=64)      # PNGs + metadata.jsonl ("text": "a red heart on a cream
                                                  # background"), readable by open_source(dir)

Sixteen objects (heart, house, tree, sun, moon, cloud, key, cup, fish, umbrella, flower, arrow, bell, drop,
bolt, mushroom) drawn as silhouettes in one of nine colours on one of five light backgrounds, at a random
scale, offset and (for most) a small rotation. Colour variants of one object are distinct samples with
distinct captions, which is what `data check --dedup` must not merge. It is meant for trying the
own-data path (`rectiflow quickstart`) in minutes on a CPU; nothing is downloaded. Item i depends only on
(seed, i). Drawn at 4x the size and downsampled with a box filter (antialiasing).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rectiflow.errors import ConfigError, RectiflowError

log = logging.getLogger(__name__)

__all__ = ["OBJECTS", "COLOURS", "BACKGROUNDS", "render_icon", "icon_item", "write_icons"]

COLOURS = {"red": (214, 39, 40), "orange": (247, 129, 20), "yellow": (240, 200, 20), "green": (44, 160, 44),
           "blue": (31, 100, 210), "purple": (130, 60, 180), "pink": (240, 110, 180), "brown": (130, 80, 40),
           "black": (25, 25, 25)}
BACKGROUNDS = {"white": (255, 255, 255), "cream": (250, 240, 210), "light blue": (205, 225, 250),
               "light green": (210, 240, 210), "light grey": (215, 215, 215)}
SUPERSAMPLE = 4

# Each object: a list of primitives in a unit box [-1, 1]^2 (y down). ("poly", [(x, y), ...]),
# ("ellipse", cx, cy, rx, ry), ("cut", primitive): drawn in the background colour (holes), ("line", pts, w).
_O = dict[str, list]
OBJECTS: _O = {
    "heart": [("ellipse", -0.38, -0.3, 0.42, 0.42), ("ellipse", 0.38, -0.3, 0.42, 0.42),
              ("poly", [(-0.78, -0.18), (0.78, -0.18), (0.0, 0.85)])],
    "house": [("poly", [(-0.65, -0.05), (0.65, -0.05), (0.65, 0.8), (-0.65, 0.8)]),
              ("poly", [(-0.85, 0.0), (0.0, -0.8), (0.85, 0.0)]),
              ("cut", ("poly", [(-0.15, 0.35), (0.15, 0.35), (0.15, 0.8), (-0.15, 0.8)]))],
    "tree": [("ellipse", 0.0, -0.3, 0.6, 0.55), ("poly", [(-0.12, 0.1), (0.12, 0.1), (0.12, 0.85),
                                                           (-0.12, 0.85)])],
    "sun": [("ellipse", 0.0, 0.0, 0.45, 0.45)]
    + [("line", [(0.6 * math.cos(a), 0.6 * math.sin(a)), (0.88 * math.cos(a), 0.88 * math.sin(a))], 0.12)
       for a in np.linspace(0, 2 * math.pi, 8, endpoint=False)],
    "moon": [("ellipse", 0.0, 0.0, 0.75, 0.75), ("cut", ("ellipse", 0.38, -0.2, 0.62, 0.62))],
    "cloud": [("ellipse", -0.4, 0.1, 0.4, 0.33), ("ellipse", 0.1, -0.15, 0.5, 0.45),
              ("ellipse", 0.5, 0.15, 0.35, 0.3),
              ("poly", [(-0.4, 0.1), (0.5, 0.1), (0.5, 0.45), (-0.4, 0.43)])],
    "key": [("ellipse", -0.5, 0.0, 0.35, 0.35), ("cut", ("ellipse", -0.5, 0.0, 0.15, 0.15)),
            ("poly", [(-0.2, -0.08), (0.85, -0.08), (0.85, 0.08), (-0.2, 0.08)]),
            ("poly", [(0.55, 0.08), (0.67, 0.08), (0.67, 0.35), (0.55, 0.35)]),
            ("poly", [(0.73, 0.08), (0.85, 0.08), (0.85, 0.28), (0.73, 0.28)])],
    "cup": [("poly", [(-0.6, -0.5), (0.4, -0.5), (0.3, 0.7), (-0.5, 0.7)]),
            ("ellipse", 0.45, 0.05, 0.3, 0.3), ("cut", ("ellipse", 0.45, 0.05, 0.15, 0.15))],
    "fish": [("ellipse", -0.1, 0.0, 0.6, 0.35), ("poly", [(0.4, 0.0), (0.85, -0.4), (0.85, 0.4)]),
             ("cut", ("ellipse", -0.4, -0.08, 0.07, 0.07))],
    "umbrella": [("pie", 0.0, -0.05, 0.85, 0.75), ("line", [(0.0, -0.05), (0.0, 0.7)], 0.1),
                 ("line", [(0.0, 0.7), (-0.25, 0.7)], 0.1)],
    "flower": [("ellipse", 0.45 * math.cos(a), 0.45 * math.sin(a), 0.3, 0.3)
               for a in np.linspace(0, 2 * math.pi, 5, endpoint=False)]
    + [("cut", ("ellipse", 0.0, 0.0, 0.2, 0.2))],
    "arrow": [("poly", [(-0.8, -0.15), (0.2, -0.15), (0.2, -0.45), (0.85, 0.0), (0.2, 0.45), (0.2, 0.15),
                        (-0.8, 0.15)])],
    "bell": [("ellipse", 0.0, -0.2, 0.45, 0.5), ("poly", [(-0.45, -0.2), (0.45, -0.2), (0.7, 0.55),
                                                           (-0.7, 0.55)]),
             ("ellipse", 0.0, 0.65, 0.15, 0.15)],
    "drop": [("ellipse", 0.0, 0.25, 0.5, 0.5), ("poly", [(-0.47, 0.1), (0.0, -0.85), (0.47, 0.1)])],
    "bolt": [("poly", [(0.15, -0.85), (-0.5, 0.1), (-0.05, 0.1), (-0.2, 0.85), (0.5, -0.15), (0.05, -0.15),
                       (0.3, -0.85)])],
    "mushroom": [("pie", 0.0, 0.0, 0.8, 0.65), ("poly", [(-0.2, 0.0), (0.2, 0.0), (0.25, 0.75),
                                                          (-0.25, 0.75)])],
}
# upright objects get a small tilt only
UPRIGHT = {"heart", "tree", "house", "cup", "bell", "drop", "mushroom", "umbrella"}


def _draw(draw: ImageDraw.ImageDraw, prim, fill, to_px, scale_px: float) -> None:
    kind = prim[0]
    if kind == "cut":
        return
    if kind == "poly":
        draw.polygon([to_px(x, y) for x, y in prim[1]], fill=fill)
    elif kind in ("ellipse", "pie"):
        _, cx, cy, rx, ry = prim
        # an ellipse under rotation: approximated by a 64-gon, rotated like everything else
        a = np.linspace(0, math.pi if kind == "pie" else 2 * math.pi, 64, endpoint=kind != "pie")
        pts = [(cx + rx * math.cos(t), cy - ry * math.sin(t)) for t in a]
        draw.polygon([to_px(x, y) for x, y in pts], fill=fill)
    elif kind == "line":
        _, pts, width = prim
        draw.line([to_px(x, y) for x, y in pts], fill=fill, width=max(1, round(width * scale_px)))


def render_icon(obj: str, colour: str, background: str, size: int = 64, *, scale: float = 0.8,
                offset: tuple[float, float] = (0.0, 0.0), angle: float = 0.0) -> Image.Image:
    """One icon: `obj` in `colour` on `background`, `scale` (fraction of the half-side), `offset` (fraction
    of the half-side), `angle` (radians)."""
    if obj not in OBJECTS or colour not in COLOURS or background not in BACKGROUNDS:
        raise ConfigError(f"unknown icon {obj!r} / colour {colour!r} / background {background!r}")
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    half = big / 2
    c, s = math.cos(angle), math.sin(angle)

    def to_px(x: float, y: float) -> tuple[float, float]:
        xr, yr = c * x - s * y, s * x + c * y
        return (half + (xr * scale + offset[0]) * half, half + (yr * scale + offset[1]) * half)

    for prim in OBJECTS[obj]:
        _draw(draw, prim, COLOURS[colour], to_px, scale * half)
    for prim in OBJECTS[obj]:
        if prim[0] == "cut":
            _draw(draw, prim[1], BACKGROUNDS[background], to_px, scale * half)
    return img.resize((size, size), Image.BOX)


def icon_item(i: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, str]:
    """(image, caption) of item i: object, colour, background, scale, offset and tilt drawn from (seed, i)."""
    rng = np.random.default_rng([seed, i])
    obj = list(OBJECTS)[int(rng.integers(len(OBJECTS)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    scale = float(rng.uniform(0.6, 0.9))
    room = 0.95 - scale
    offset = (float(rng.uniform(-room, room)), float(rng.uniform(-room, room)))
    angle = float(rng.uniform(-0.25, 0.25)) if obj in UPRIGHT else float(rng.uniform(-0.6, 0.6))
    img = render_icon(obj, colour, background, size, scale=scale, offset=offset, angle=angle)
    return img, f"a {colour} {obj} on a {background} background"


def write_icons(out_dir: str | os.PathLike, n: int, size: int = 64, seed: int = 0, *,
                overwrite: bool = False) -> Path:
    """Write items 0..n-1 as icon-NNNNN.png plus metadata.jsonl (file_name, text). Returns the directory."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"number of images must be a positive integer (got {n!r})")
    if size < 16:
        raise ConfigError(f"icon size {size}; use 16 or more pixels")
    out = Path(out_dir)
    meta = out / "metadata.jsonl"
    if meta.exists() and not overwrite:
        raise RectiflowError(f"{out} already holds a metadata.jsonl; choose a new directory or overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metadata.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            img, caption = icon_item(i, seed, size)
            name = f"icon-{i:05d}.png"
            img.save(out / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    os.replace(tmp, meta)
    log.info("wrote %d icons (%dpx, seed %d) to %s", n, size, seed, out)
    return out

"""Geometry of the shapes world: exact inside-tests of the six shapes, anti-aliased coverage, ideal masks.

Normative source: docs/shapes-world.md ("Shapes" table). Every shape lives in its square
bounding box of side s centred at (cx, cy); y grows downwards. Inside-tests work in *box coordinates*
u = (x - cx) / s, v = (y - cy) / s, so the box is [-1/2, 1/2]^2 and every shape is scale-free.

Pixel convention: pixel (row i, column j) covers the continuous square [j, j+1] x [i, i+1]; its centre is
(j + 1/2, i + 1/2). Anti-aliasing: each pixel is sampled on an A x A grid of sub-pixel centres (A = 4, the
spec's "draw at 4x") and its coverage is the fraction of samples inside the shape, which is exactly a 4x
drawing box-downsampled. Points on a shape's boundary count as inside (a measure-zero choice).
"""

from __future__ import annotations

import math

import numpy as np

# spec "Shapes": star inner radius is 0.4 x the outer radius (outer radius s/2).
STAR_INNER_RATIO = 0.4
# spec "Shapes": each bar of the cross has width s/3.
CROSS_BAR_WIDTH = 1.0 / 3.0
# spec "Canvas": "draw at 4x and downsample with a box filter".
SUPERSAMPLE = 4

SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Shapes outside the world's vocabulary: drawn in its style for fine-tuning experiments (recipes/lora-heart)
# and told apart by the detector only when asked (rectiflow.eval.shapes_detect.detect(..., shapes=...)).
EXTRA_SHAPES = ("heart",)
# The heart is the classic implicit curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 (y up). Its extent, measured on a
# 6001^2 grid: |x| <= 1.139, -1 <= y <= 1.236; it is scaled so that its width fills the box and centred
# vertically (height 2.236 / 2.278 = 0.98 of the box).
HEART_HALF_WIDTH = 1.139
HEART_Y_CENTRE = (1.236 - 1.0) / 2.0
# Its area as a fraction of the box: 3.662 (the curve's area on that grid) / (2 * 1.139)^2.
HEART_AREA = 3.66197 / (2 * HEART_HALF_WIDTH) ** 2


def star_vertices() -> np.ndarray:
    """The star's 10 vertices in box coordinates, [10, 2] (u, v); vertex 0 is the point straight up."""
    k = np.arange(10)
    # angles from the +u axis, y down: -90 deg is straight up; points every 72 deg, valleys between them.
    ang = np.deg2rad(-90.0 + 36.0 * k)
    rad = np.where(k % 2 == 0, 0.5, 0.5 * STAR_INNER_RATIO)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=-1)


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against a closed polygon [n, 2]."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    n = len(poly)
    for a in range(n):
        (ua, va), (ub, vb) = poly[a], poly[(a + 1) % n]
        if va == vb:
            continue  # a horizontal edge never crosses a horizontal ray
        straddles = (va > v) != (vb > v)
        u_cross = ua + (v - va) * (ub - ua) / (vb - va)
        inside ^= straddles & (u < u_cross)
    return inside


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask: is box-coordinate point (u, v) inside `shape`? u, v broadcast together."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":  # disc of diameter s
        return u * u + v * v <= 0.25
    if shape == "square":  # the full box
        return (au <= 0.5) & (av <= 0.5)
    if shape == "triangle":  # apex (0, -1/2), base along v = +1/2: half-width grows from 0 to 1/2
        return (v <= 0.5) & (au <= (v + 0.5) / 2.0)
    if shape == "diamond":  # rhombus through the four edge midpoints
        return au + av <= 0.5
    if shape == "cross":  # a vertical and a horizontal bar of width s/3 spanning the box
        h = CROSS_BAR_WIDTH / 2.0
        return ((au <= h) & (av <= 0.5)) | ((av <= h) & (au <= 0.5))
    if shape == "star":
        return _inside_polygon(u, v, star_vertices())
    if shape == "heart":
        x = u * (2 * HEART_HALF_WIDTH)
        y = HEART_Y_CENTRE - v * (2 * HEART_HALF_WIDTH)  # box v grows downwards, the curve's y upwards
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def ideal_area(shape: str) -> float:
    """Closed-form area of each shape as a fraction of its box (for tests of `inside`)."""
    r, big = 0.5 * STAR_INNER_RATIO, 0.5
    return {
        "circle": math.pi / 4.0,
        "square": 1.0,
        "triangle": 0.5,
        "diamond": 0.5,
        # plus sign: two bars of area 1 * 1/3 minus their 1/3 x 1/3 overlap
        "cross": 2.0 * CROSS_BAR_WIDTH - CROSS_BAR_WIDTH**2,
        # ten triangles (centre, outer vertex, inner vertex) with angle 36 deg between their sides
        "star": 10 * 0.5 * big * r * math.sin(math.radians(36.0)),
        "heart": HEART_AREA,
    }[shape]


def coverage(shape: str, cx: float, cy: float, s: float, size: int, supersample: int = SUPERSAMPLE):
    """Anti-aliased coverage of one shape on a size x size canvas.

    Returns (row0, col0, alpha) where alpha [h, w] float64 in [0, 1] is the coverage of the pixels
    rows row0..row0+h-1, columns col0..col0+w-1 (the shape's box clipped to the canvas).
    """
    half = s / 2.0
    c0, c1 = max(0, math.floor(cx - half)), min(size, math.ceil(cx + half))
    r0, r1 = max(0, math.floor(cy - half)), min(size, math.ceil(cy + half))
    a = supersample
    sub = (np.arange(a) + 0.5) / a  # sub-pixel centre offsets inside a pixel
    xs = (np.arange(c0, c1)[:, None] + sub[None, :]).reshape(-1)  # [w*a] sample x positions
    ys = (np.arange(r0, r1)[:, None] + sub[None, :]).reshape(-1)  # [h*a] sample y positions
    mask = inside(shape, ((xs - cx) / s)[None, :], ((ys - cy) / s)[:, None])  # [h*a, w*a]
    h, w = r1 - r0, c1 - c0
    alpha = mask.reshape(h, a, w, a).mean(axis=(1, 3))  # [h*a, w*a] -> [h, a, w, a] -> [h, w]
    return r0, c0, alpha


def ideal_mask(shape: str, n: int = 256) -> np.ndarray:
    """The shape drawn large: bool [n, n] sampled at pixel centres of an n x n box (no cropping)."""
    t = (np.arange(n) + 0.5) / n - 0.5
    return inside(shape, t[None, :], t[:, None])


def crop_to_content(mask: np.ndarray) -> np.ndarray:
    """Crop a 2-D mask to its tight bounding box (the spec's "cropped to its own tight bounding box")."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]

"""The shapes-world detector: pixel classes, 8-connected components, shape classification by IoU.

Normative spec: docs/shapes-world.md, "Scoring" steps 1-3. numpy only (no scipy):
components are found from horizontal runs of equal class joined across adjacent rows with a union-find.

Choices where the spec leaves room:
- Nearest palette colour ties (impossible at integer RGB for this palette within distance 60) go to the
  first colour in COLORS order. "Within distance 60" is inclusive (d^2 <= 3600).
- Ideal masks are drawn at 512 x 512 (pixel-centre sampling of the exact shape), cropped to their tight
  box, then resized to the component's box (w, h) by exact area averaging and kept where the average is
  >= 0.5. IoU ties go to the first shape in SHAPES order.
- Components are dropped when their pixel count is < 0.01 S^2 (S = the image side).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from rectiflow.data.shapes import COLORS, SHAPES
from rectiflow.data.shapes_geometry import crop_to_content, ideal_mask
from rectiflow.errors import FormatError

COLOR_RADIUS = 60.0  # spec "Scoring" 1: Euclidean RGB distance to a palette colour
MIN_AREA = 0.01  # spec "Scoring" 2: components smaller than 0.01 S^2 pixels are dropped
IDEAL_RES = 512  # ours: the resolution the ideal masks are "drawn large" at


@dataclass(frozen=True)
class Detection:
    """A detected object. bbox = (x0, y0, x1, y1) in pixels, x1/y1 exclusive; (cx, cy) its centre; side the
    larger of its width and height; area the component's pixel count; iou the winning shape's IoU."""

    shape: str
    color: str
    cx: float
    cy: float
    side: float
    bbox: tuple[int, int, int, int]
    area: int
    iou: float = 1.0


def as_image(image) -> np.ndarray:
    """A square RGB uint8 array [S, S, 3] from an array or a PIL image (FormatError otherwise)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise FormatError(f"expected an RGB image [S, S, 3], got an array of shape {arr.shape}; "
                          "convert it to RGB")
    if arr.dtype != np.uint8:
        raise FormatError(f"expected a uint8 image (0..255), got dtype {arr.dtype}; "
                          "convert it with .astype(uint8)")
    if arr.shape[0] != arr.shape[1]:
        raise FormatError(f"shapes-world images are square, got {arr.shape[1]}x{arr.shape[0]}; "
                          "crop or resize it")
    return arr


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """int [H, W]: index into COLORS of the nearest palette colour within distance 60, else -1."""
    palette = np.array(list(COLORS.values()), dtype=np.int64)  # [8, 3]
    rgb = image.astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # [H, W]: one int per colour
    uniq, inverse = np.unique(packed.reshape(-1), return_inverse=True)  # classify each distinct colour once
    colors = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=-1)  # [U, 3]
    d2 = ((colors[:, None, :] - palette[None]) ** 2).sum(-1)  # [U, 8]
    nearest = d2.argmin(-1)  # [U]; ties go to the first colour in COLORS order
    within = d2[np.arange(len(uniq)), nearest] <= COLOR_RADIUS**2
    return np.where(within, nearest, -1)[inverse].reshape(packed.shape)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_components(classes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """8-connected components of equal non-negative class. Returns (labels [H, W] with -1 for background,
    class of each label)."""
    h, w = classes.shape
    # horizontal runs of equal class: a run starts at column 0 or where the class changes along the row
    change = np.ones((h, w), dtype=bool)
    change[:, 1:] = classes[:, 1:] != classes[:, :-1]
    rr, cc = np.nonzero(change)  # row-major: runs sorted by (row, start)
    ends = np.append(cc[1:], w)
    ends[np.flatnonzero(np.diff(rr))] = w  # a row's last run ends at the right edge
    keep = classes[rr, cc] >= 0
    runs = list(zip(rr[keep].tolist(), cc[keep].tolist(), ends[keep].tolist(),
                    classes[rr[keep], cc[keep]].tolist()))  # (row, start, end exclusive, class)
    row_runs: list[list[int]] = [[] for _ in range(h)]
    for i, run in enumerate(runs):
        row_runs[run[0]].append(i)
    parent = list(range(len(runs)))
    for r in range(1, h):
        prev, cur, j = row_runs[r - 1], row_runs[r], 0
        for i in cur:
            _, a, b, c = runs[i]
            while j < len(prev) and runs[prev[j]][2] < a:  # prev run ends (exclusive) before a: not adjacent
                j += 1
            k = j
            while k < len(prev) and runs[prev[k]][1] <= b:  # 8-adjacent: prev start <= this end (exclusive)
                if runs[prev[k]][3] == c:
                    ra, rb = _find(parent, i), _find(parent, prev[k])
                    parent[max(ra, rb)] = min(ra, rb)
                k += 1
    roots: dict[int, int] = {}
    label_class: list[int] = []
    run_label = np.full(len(rr), -1, dtype=np.int64)  # label of every run, background runs included
    kept = np.flatnonzero(keep)
    for i, (_, _, _, c) in enumerate(runs):
        root = _find(parent, i)
        if root not in roots:
            roots[root] = len(label_class)
            label_class.append(c)
        run_label[kept[i]] = roots[root]
    labels = run_label[np.cumsum(change.reshape(-1)) - 1].reshape(h, w)  # each pixel's run -> its label
    return labels, label_class


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] exact area-averaging weights (output cell k covers [k, k+1] * n_in / n_out)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]  # [n_out, 1]
    i = np.arange(n_in)[None, :]  # [1, n_in]
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0.0, None)
    return overlap / (n_in / n_out)


@functools.cache
def _ideal_cropped(shape: str) -> np.ndarray:
    return crop_to_content(ideal_mask(shape, IDEAL_RES)).astype(np.float64)


@functools.cache
def template(shape: str, w: int, h: int) -> np.ndarray:
    """bool [h, w]: the ideal mask cropped to its tight box, area-resized to w x h, thresholded at half."""
    m = _ideal_cropped(shape)
    resized = _area_weights(m.shape[0], h) @ m @ _area_weights(m.shape[1], w).T  # [h, H] @ [H, W] @ [W, w]
    return resized >= 0.5


def classify_shape(mask: np.ndarray, shapes: Iterable[str] = SHAPES) -> tuple[str, float]:
    """(shape, IoU) of the best ideal template among `shapes` for a component mask cropped to its bounding
    box."""
    h, w = mask.shape
    best, best_iou = "", -1.0
    for shape in shapes:
        t = template(shape, w, h)
        union = np.count_nonzero(t | mask)
        iou = np.count_nonzero(t & mask) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def detect(image, shapes: Iterable[str] = SHAPES) -> list[Detection]:
    """All objects in a shapes-world image (uint8 [S, S, 3] array or PIL image), in label order. `shapes`:
    the candidate shapes (the world's six; add rectiflow.data.shapes_geometry.EXTRA_SHAPES to recognise
    shapes taught by fine-tuning, such as the heart)."""
    img = as_image(image)
    size = img.shape[0]
    labels, label_class = label_components(classify_pixels(img))
    colors = list(COLORS)
    counts = np.bincount(labels[labels >= 0], minlength=len(label_class))
    found = []
    for k, c in enumerate(label_class):
        if counts[k] * 100 < size * size:  # MIN_AREA = 0.01, compared exactly in integers
            continue
        rows, cols = np.nonzero(labels == k)
        y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        shape, iou = classify_shape(labels[y0:y1, x0:x1] == k, shapes)
        found.append(Detection(shape, colors[c], (x0 + x1) / 2, (y0 + y1) / 2, float(max(x1 - x0, y1 - y0)),
                               (x0, y0, x1, y1), int(counts[k]), float(iou)))
    return found

"""The shapes world: a procedural text-to-image world (scenes, held-out rules, rendering, datasets).

Normative spec: docs/shapes-world.md. Constants below carry the spec's numbers. The vocabulary
and caption grammar (re-exported here) are in rectiflow.data.shapes_grammar; the scorer (detector + clause
rules) in rectiflow.eval.shapes; the geometry of the six shapes in rectiflow.data.shapes_geometry.

Choices where the spec leaves room (all deterministic):
- Randomness: every function takes a numpy Generator; dataset item i uses default_rng([seed, i]), so any
  position of a dataset can be regenerated alone (exact resume).
- Captions for training are drawn uniformly among the template prompts of the task that contain no held-out
  combination (`prompts_for(task, "seen")`), or in proportion to the product of their shapes' weights with
  `shape_weights`; the task itself from `task_weights` (uniform by default).
- Sizes are drawn first (i.i.d. uniform in [0.22 S, 0.34 S]), then colours (uniform among those allowed),
  then centres: uniform over the canvas range that keeps the 0.03 S margin, by rejection in batches of
  candidate layouts (the first valid one is taken), i.e. uniform conditional on all constraints.
- "Bounding boxes at least 0.04 S apart" is read as: the gap along x or the gap along y is >= 0.04 S (the
  boxes grown by 0.02 S on every side do not intersect). This implies the Euclidean reading too.
- Position images (and position captions of any two-object scene) satisfy their relation with the dominant
  component of d >= 0.15 S (spec) and, in addition, |d_dominant| - |d_other| >= 0.06 S so that the relation
  survives the detector's pixel-level centre estimates (a star's tight box is not its layout box).
- Held-out spatial configurations are avoided in training images with the same 0.06 S slack: a circle may
  not be above a square even "almost" (|d.y| >= |d.x| - 0.06 S with the circle higher), likewise a triangle
  left of a star. Held-out colour-shape pairs are simply never drawn in training images.
- `caption_order = "reading"` (an option; "any", the default, is the spec's world): a two-object image's
  two_object and color_attr captions name its objects in reading order only (the one left of the other
  first when |d.x| >= |d.y|, else the one above), where "any" gives both orders. The images are the same;
  only which captions they carry changes, so "a circle and a square" says which object comes first.
- `parse_prompt` accepts either article ("a"/"an"), any case, extra spaces and a final period; `.text` is
  the canonical form with correct articles.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from rectiflow.data.shapes_geometry import coverage
from rectiflow.data.shapes_grammar import (  # noqa: F401  (re-exported: the world's public names)
    COLORS,
    COUNT_WORDS,
    HELD_OUT_COLOR_SHAPES,
    HELD_OUT_POSITIONS,
    POSITION_M,
    RELATIONS,
    SHAPES,
    TASKS,
    Prompt,
    article,
    check_shape_weights,
    check_weights,
    parse_prompt,
    prompts_for,
    relation_holds,
    relation_score,
    sample_prompt,
)
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.io.atomic import atomic_write

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # spec "Canvas": pure white
SIZE_RANGE = (0.22, 0.34)  # spec "Objects and placement": s ~ U[0.22 S, 0.34 S]
MARGIN = 0.03  # spec: at least 0.03 S from every canvas edge
SPACING = 0.04  # spec: bounding boxes at least 0.04 S apart
POSITION_MIN = 0.15  # spec: rendered position images have |d| >= 0.15 S along the dominant axis
POSITION_SLACK = 0.06  # ours (module docstring): dominance margin of rendered relations, x S
HALO_CLEARANCE = 75.0  # ours: soft edges stay > 75 (the scorer's radius 60 + 15) from every palette colour
MIN_SIZE = 16  # ours: smallest canvas we render (the detector is validated at 64 and 128)

_BATCH = 256  # candidate layouts per rejection round
_ROUNDS = 400


def _relation_clear(relation: str, a: Obj, b: Obj, size: int) -> bool:
    """Holds with the margins of rendered position images (spec 0.15 S; our 0.06 S dominance slack)."""
    along, across = relation_score(relation, a.cx - b.cx, a.cy - b.cy)
    ok = along >= POSITION_MIN * size and along - across >= POSITION_SLACK * size
    return ok and relation_holds(relation, (a.cx, a.cy), a.s, (b.cx, b.cy), b.s)


# ------------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Obj:
    """One object: its square layout box of side s centred at (cx, cy), in pixels of the scene canvas."""

    shape: str
    color: str
    cx: float
    cy: float
    s: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    size: int
    prompt: Prompt

    @property
    def caption(self) -> str:
        return self.prompt.text

    @property
    def task(self) -> str:
        return self.prompt.task


def held_out_present(objects, size: int | None = None, slack: float = 0.0) -> list[str]:
    """Held-out combinations present among objects (anything with shape, color, cx, cy and s or side).

    slack (x size) widens the spatial rule to near misses: a pair counts when d points the held-out way
    and |d_along| >= |d_other| - slack * size. slack=0 is the spec's exact rule."""
    found = []
    for o in objects:
        if (o.color, o.shape) in HELD_OUT_COLOR_SHAPES:
            found.append(f"{o.color} {o.shape}")
    for a, b in itertools.permutations(objects, 2):
        for s1, rel, s2 in HELD_OUT_POSITIONS:
            if (a.shape, b.shape) != (s1, s2):
                continue
            sa, sb = getattr(a, "s", None) or a.side, getattr(b, "s", None) or b.side
            if slack > 0:
                along, across = relation_score(rel, a.cx - b.cx, a.cy - b.cy)
                hit = along > 0 and along - across >= -slack * size
            else:
                hit = relation_holds(rel, (a.cx, a.cy), sa, (b.cx, b.cy), sb)
            if hit:
                found.append(f"{s1} {rel} {s2}")
    return found


def _spaced(cx: np.ndarray, cy: np.ndarray, s: np.ndarray, size: int) -> np.ndarray:
    """[B] bool: every pair of boxes (centres [B, n], sides [n]) has an x- or y-gap >= 0.04 S."""
    ok = np.ones(cx.shape[0], dtype=bool)
    for i, j in itertools.combinations(range(cx.shape[1]), 2):
        gx = np.abs(cx[:, i] - cx[:, j]) - (s[i] + s[j]) / 2
        gy = np.abs(cy[:, i] - cy[:, j]) - (s[i] + s[j]) / 2
        ok &= np.maximum(gx, gy) >= SPACING * size
    return ok


def _layout(rng, shapes, colors, size: int, accept) -> tuple[Obj, ...]:
    """Draw sizes, then centres by batched rejection; accept(objs) -> bool is checked on spaced layouts."""
    n = len(shapes)
    s = rng.uniform(SIZE_RANGE[0] * size, SIZE_RANGE[1] * size, n)
    lo, hi = MARGIN * size + s / 2, size - MARGIN * size - s / 2  # [n] centre ranges keeping the margin
    for _ in range(_ROUNDS):
        cx = rng.uniform(lo, hi, (_BATCH, n))  # [B, n]
        cy = rng.uniform(lo, hi, (_BATCH, n))
        for k in np.flatnonzero(_spaced(cx, cy, s, size)):
            objs = tuple(Obj(shapes[i], colors[i], float(cx[k, i]), float(cy[k, i]), float(s[i]))
                         for i in range(n))
            if accept(objs):
                return objs
    raise RuntimeError(f"no valid layout found for {shapes} on a {size}px canvas")  # not reachable


def _color_for(shape: str, rng: np.random.Generator, train: bool) -> str:
    allowed = [c for c in COLORS if not (train and (c, shape) in HELD_OUT_COLOR_SHAPES)]
    return allowed[int(rng.integers(len(allowed)))]


def scene_for_prompt(prompt: Prompt | str, rng: np.random.Generator, size: int = 64, *,
                     train: bool = False) -> Scene:
    """A ground-truth scene realising the prompt; attributes it leaves open are random. With train=True
    the scene contains no held-out combination anywhere (the prompt itself must then be seen)."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    _check_size(size)
    if train and p.held_out:
        raise ConfigError(f"{p.text!r} uses a held-out combination; it cannot be a training scene")
    if p.task == "counting":
        shapes = [p.shape1] * p.count
    else:
        shapes = [p.shape1] + ([p.shape2] if p.shape2 else [])
    given = [p.color1, p.color2] if p.task in ("colors", "color_attr") else [None, None]
    given = (given + [None] * len(shapes))[: len(shapes)]
    colors = [c if c is not None else _color_for(sh, rng, train) for sh, c in zip(shapes, given)]

    def accept(objs: tuple[Obj, ...]) -> bool:
        if p.task == "position" and not _relation_clear(p.relation, objs[0], objs[1], size):
            return False
        return not (train and held_out_present(objs, size, slack=POSITION_SLACK))

    return Scene(_layout(rng, shapes, colors, size, accept), size, p)


def sample_scene(task: str, rng: np.random.Generator, size: int = 64, *, train: bool = True,
                 shape_weights: Mapping[str, float] | None = None) -> Scene:
    """A random scene of the task with its caption (train=True: no held-out combination anywhere);
    shape_weights: see sample_prompt."""
    prompt = sample_prompt(task, rng, train=train, shape_weights=shape_weights)
    return scene_for_prompt(prompt, rng, size, train=train)


def counterfactual_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with shapes changed so that no caption of it (`true_captions`, either order) is true: a hard
    negative for contrastive training (rectiflow.flow.contrastive). Layout boxes and colours stay.

    Two objects of two shapes: both drawn as one of them, the model's commonest failure ("one shape
    missing"; which one at random), or if that would draw a held-out combination, one as a third shape.
    Objects of one shape (single_object, colors, counting): all of them as another shape. Every caption of
    the scene names a shape the counterfactual lacks. Like training scenes, it holds no held-out
    combination (with the same near-miss slack), so no held-out pair is ever rendered."""
    objs = scene.objects
    named = list(dict.fromkeys(o.shape for o in objs))
    if len(named) == 2:
        a, b = objs
        collapse = [(a, dataclasses.replace(b, shape=a.shape)), (dataclasses.replace(a, shape=b.shape), b)]
        third = [(a, dataclasses.replace(b, shape=s)) for s in SHAPES if s not in named]
        candidates = [collapse[k] for k in rng.permutation(2)]
        candidates += [third[k] for k in rng.permutation(len(third))]
    else:
        others = [s for s in SHAPES if s != named[0]]
        candidates = [tuple(dataclasses.replace(o, shape=others[k]) for o in objs)
                      for k in rng.permutation(len(others))]
    for cand in candidates:
        if not held_out_present(cand, scene.size, slack=POSITION_SLACK):
            return Scene(tuple(cand), scene.size, scene.prompt)
    raise RuntimeError(f"no counterfactual without held-out pairs for {scene.caption!r}")  # unreachable


CAPTION_ORDERS = ("any", "reading")
COUNTERFACTUALS = ("all", "two-shape")  # which scenes get a counterfactual image (ShapesWorld.counterfactual)


def _check_counterfactual(which: str) -> None:
    if which not in COUNTERFACTUALS:
        raise ConfigError(f"unknown counterfactual kind {which!r}; use one of {', '.join(COUNTERFACTUALS)}")


def _check_caption_order(order: str) -> None:
    if order not in CAPTION_ORDERS:
        raise ConfigError(f"unknown caption order {order!r}; use one of {', '.join(CAPTION_ORDERS)}")


def _reading_order(a: Obj, b: Obj) -> tuple[Obj, Obj]:
    """(a, b) or (b, a): the object left of the other first when |d.x| >= |d.y|, else the one above."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    first_is_a = dx > 0 if abs(dx) >= abs(dy) else dy > 0
    return (a, b) if first_is_a else (b, a)


def _in_order(prompt: Prompt, first: Obj, second: Obj) -> Prompt:
    """A two_object / color_attr prompt naming `first` before `second` (the objects it describes)."""
    if prompt.task == "two_object":
        return Prompt("two_object", first.shape, second.shape)
    return Prompt("color_attr", first.shape, second.shape, color1=first.color, color2=second.color)


def true_captions(scene: Scene, order: str = "any") -> list[str]:
    """Every template caption true of the scene that names exactly its objects; the scene's caption first
    (under order="reading", in reading order: module docstring).

    Position captions are included only when the relation holds with the margins of rendered position
    images (see module docstring), so that no caption is a near-tie."""
    _check_caption_order(order)
    objs = scene.objects
    caps: list[Prompt] = [scene.prompt]
    if len(objs) == 1:
        o = objs[0]
        caps += [Prompt("single_object", o.shape), Prompt("colors", o.shape, color1=o.color)]
    elif len({o.shape for o in objs}) == 1 and len(objs) in COUNT_WORDS:
        caps.append(Prompt("counting", objs[0].shape, count=len(objs)))
    elif len(objs) == 2:
        first, second = _reading_order(*objs)
        if order == "reading" and scene.task in ("two_object", "color_attr"):
            caps[0] = _in_order(scene.prompt, first, second)
        for a, b in (objs, objs[::-1]):
            if order == "any" or (a, b) == (first, second):
                caps.append(Prompt("two_object", a.shape, b.shape))
                if a.color != b.color:
                    caps.append(Prompt("color_attr", a.shape, b.shape, color1=a.color, color2=b.color))
            caps += [Prompt("position", a.shape, b.shape, relation=r) for r in RELATIONS
                     if _relation_clear(r, a, b, scene.size)]
    return list(dict.fromkeys(c.text for c in caps))


# ---------------------------------------------------------------------------------------------- rendering
def _check_size(size) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ConfigError(f"shapes-world canvas size must be an integer >= {MIN_SIZE} (got {size!r})")


@functools.cache
def halo_limit(color: str) -> float:
    """Largest alpha (on a 1/64 grid) up to which every blend of `color` over white, rounded to uint8, is
    farther than HALO_CLEARANCE from every palette colour (its own included): it reads as background."""
    fill, palette = np.asarray(COLORS[color], np.float64), np.array(list(COLORS.values()), np.float64)
    limit = 0.0
    for a in np.arange(65) / 64:
        blend = np.rint(255.0 + a * (fill - 255.0))
        if np.sqrt(((palette - blend) ** 2).sum(-1)).min() <= HALO_CLEARANCE:
            break
        limit = float(a)
    return limit


def render(scene: Scene, size: int | None = None) -> np.ndarray:
    """Render the scene: uint8 [S, S, 3]; size rescales the scene's geometry to another canvas side.

    Anti-aliasing that the detector cannot misread: coverage is measured by 4x4 supersampling (a 4x
    drawing box-downsampled); a pixel covered at least half takes the pure fill colour (so the detected mask
    is exactly the half-coverage mask, which is how the scorer's ideal masks are thresholded), and a pixel
    covered less gets a soft edge of alpha min(coverage, halo_limit(colour)), a blend never within 60 of
    any palette colour (a half-covered red edge over white would otherwise be read as pink)."""
    return render_objects(scene.objects, scene.size, size)


def render_objects(objects: Sequence[Obj], scene_size: int, size: int | None = None) -> np.ndarray:
    """`render` of any objects laid out on a scene_size canvas, including shapes outside the world's
    vocabulary (rectiflow.data.shapes_geometry.EXTRA_SHAPES), which no Prompt can name."""
    size = scene_size if size is None else size
    _check_size(size)
    k = size / scene_size
    img = np.full((size, size, 3), BACKGROUND, dtype=np.float64)  # [S, S, 3]
    for o in objects:
        r0, c0, cov = coverage(o.shape, o.cx * k, o.cy * k, o.s * k, size)  # cov [h, w]
        alpha = np.where(cov >= 0.5, 1.0, np.minimum(cov, halo_limit(o.color)))
        h, w = alpha.shape
        a = alpha[..., None]  # [h, w, 1]
        patch = img[r0: r0 + h, c0: c0 + w]
        img[r0: r0 + h, c0: c0 + w] = patch * (1 - a) + np.asarray(COLORS[o.color], np.float64) * a
    return np.rint(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ datasets
class ShapesItem(NamedTuple):
    image: np.ndarray  # uint8 [S, S, 3]
    captions: list[str]  # all true captions, primary first
    caption: str  # the primary caption (the one the scene was drawn for)
    task: str


class ShapesWorld:
    """Deterministic, index-addressable source of training images: item i depends only on (seed, i)."""

    def __init__(self, size: int = 64, seed: int = 0, task_weights: Mapping[str, float] | None = None,
                 caption_order: str = "any", shape_weights: Mapping[str, float] | None = None):
        _check_size(size)
        _check_caption_order(caption_order)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"shapes-world seed must be a non-negative integer (got {seed!r})")
        # a task not named in task_weights is not drawn (the CLI names all six)
        weights = dict.fromkeys(TASKS, 1.0) if task_weights is None else \
            check_weights(task_weights, TASKS, "task", missing=0.0)
        w = np.array([weights[t] for t in TASKS])
        self.size, self.seed, self.probs = int(size), int(seed), w / w.sum()
        self.caption_order = caption_order
        self.shape_weights = check_shape_weights(shape_weights)

    def scene(self, i: int) -> Scene:
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise IndexError(f"shapes-world index must be a non-negative integer (got {i!r})")
        rng = np.random.default_rng([self.seed, int(i)])
        task = TASKS[int(rng.choice(len(TASKS), p=self.probs))]
        return sample_scene(task, rng, self.size, train=True, shape_weights=self.shape_weights)

    def __getitem__(self, i: int) -> ShapesItem:
        scene = self.scene(i)
        captions = true_captions(scene, self.caption_order)
        return ShapesItem(render(scene), captions, captions[0], scene.task)

    def counterfactual(self, i: int, which: str = "all") -> ShapesItem:
        """Item i with the image of `counterfactual_scene` (its own generator, so item i is unchanged): the
        same captions, every one of them false of this image. which="two-shape": only scenes of two shapes
        get one; other items come back unchanged (no negative: see write_imagefolder)."""
        _check_counterfactual(which)
        item, scene = self[i], self.scene(i)
        if which == "two-shape" and len({o.shape for o in scene.objects}) != 2:
            return item
        rng = np.random.default_rng([self.seed, int(i), 1])
        return item._replace(image=render(counterfactual_scene(scene, rng)))

    def iter_from(self, start: int = 0) -> Iterator[ShapesItem]:
        """Endless iteration from item `start` (resume a data position exactly)."""
        return (self[i] for i in itertools.count(start))

    def __iter__(self) -> Iterator[ShapesItem]:
        return self.iter_from(0)


def _write_item(job: tuple[str, int, int, Mapping[str, float] | None, str, str | None,
                           Mapping[str, float] | None, int]) -> dict:
    """Render and save item i of a world; returns its metadata row (a process-pool worker)."""
    from PIL import Image

    out, size, seed, weights, order, counterfactual, shapes, i = job
    world = ShapesWorld(size, seed, weights, order, shapes)
    item = world.counterfactual(i, counterfactual) if counterfactual else world[i]
    name = f"{i:06d}.png"
    Image.fromarray(item.image).save(Path(out) / name)
    row = {"file_name": name, "text": item.caption, "captions": item.captions, "task": item.task}
    if not counterfactual:
        return row
    changed = counterfactual == "all" or len({o.shape for o in world.scene(i).objects}) == 2
    return {**row, "counterfactual": changed}  # (ShapesWorld.counterfactual's rule, not a second render)


def write_imagefolder(out_dir: str | os.PathLike, n: int, size: int = 64, seed: int = 0, *,
                      task_weights: Mapping[str, float] | None = None, caption_order: str = "any",
                      counterfactual: str | None = None, overwrite: bool = False, progress: bool = True,
                      workers: int = 1, shape_weights: Mapping[str, float] | None = None) -> Path:
    """Write items 0..n-1 of ShapesWorld(size, seed, task_weights, caption_order, shape_weights) as PNGs
    plus metadata.jsonl (file_name, text = primary caption, captions = all true captions, task). Returns the
    directory.

    Read it back with `open_source(dir)` (caption column "text") or `caption_columns=["captions"]` (all
    true captions of each image, primary first). workers > 1 renders in that many processes; the files
    are the same whatever the number of workers (item i depends only on (seed, i)).

    counterfactual="all" writes, under the same names and with the same captions, each item's counterfactual
    image instead (`ShapesWorld.counterfactual`): a folder that pairs row for row with the plain one, for
    data.negative_cache (rectiflow.flow.contrastive). "two-shape": only scenes of two shapes get one, the
    others keep their own image, which the trainer takes as no negative (rectiflow.flow.contrastive.differs).
    Rows carry "counterfactual": whether the image is one."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"number of images must be a positive integer (got {n!r})")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError(f"workers must be a positive integer (got {workers!r})")
    # validate the arguments before touching the disk
    shapes = ShapesWorld(size, seed, task_weights, caption_order, shape_weights).shape_weights
    if counterfactual is not None:
        _check_counterfactual(counterfactual)
    out = Path(out_dir)
    meta = out / "metadata.jsonl"
    if meta.exists() and not overwrite:
        raise RectiflowError(f"{out} already holds a metadata.jsonl; choose a new directory or overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    weights = None if task_weights is None else dict(task_weights)
    jobs = ((str(out), int(size), int(seed), weights, caption_order, counterfactual, shapes, i)
            for i in range(n))
    # metadata.jsonl is the commit point: written atomically after every image exists
    with atomic_write(meta) as tmp, open(tmp, "w", encoding="utf-8") as f, \
            tqdm(total=n, desc="shapes world", unit="img", disable=not progress) as bar:
        if workers == 1:
            rows = map(_write_item, jobs)
        else:
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(int(workers))
            rows = pool.map(_write_item, jobs, chunksize=max(1, min(64, n // (4 * workers))))
        try:
            for rec in rows:
                f.write(json.dumps(rec) + "\n")
                bar.update(1)
        finally:
            if workers > 1:
                pool.shutdown(cancel_futures=True)
    logger.info("wrote %d shapes-world images (%dpx, seed %d) to %s", n, size, seed, out)
    return out

"""`rectiflow data check`: find unusable samples before training, and write a manifest of the good ones.

Problems reported (each with the file it concerns):
- unreadable: the image cannot be decoded (corrupt, truncated, not an image);
- missing_image / missing_caption / empty_caption / bad_metadata: found while listing the source;
- too_small: the shorter side is below the training size (it would be upscaled, i.e. blurred);
- caption_too_long: more tokens than the text encoder reads (the rest would be cut off). Counted with the
  encoder's tokenizer when one is given, else approximated as ceil(4/3 x whitespace words) (a token is about
  3/4 of an English word for BPE/WordPiece vocabularies, OpenAI's rule of thumb);
- duplicate: a near-duplicate of another image. The SD3 paper (Esser et al. 2024) deduplicates by
  clustering image embeddings (SSCD); the cheap stand-in here is a 64-bit DCT perceptual hash (pHash, grey:
  structure) within a Hamming threshold AND a 4x4 colour thumbnail within a colour threshold (pHash alone is
  blind to colour: the red and the blue version of an icon hash alike, yet they are distinct samples). It
  finds resized / recompressed copies, not semantically similar images. Each group keeps its largest image
  (then the first listed) and every removed image is within both thresholds OF THAT KEPT IMAGE (no chains).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rectiflow.data.sources import Problem, Source
from rectiflow.data.transforms import IMAGE_ERRORS
from rectiflow.errors import ConfigError
from rectiflow.io.atomic import atomic_write, write_text

log = logging.getLogger(__name__)

KINDS = ("unreadable", "missing_image", "missing_caption", "empty_caption", "bad_metadata", "too_small",
         "caption_too_long", "duplicate")
WORDS_TO_TOKENS = 4 / 3  # "a token is ~3/4 of a word" (OpenAI tokenizer help page) -> tokens ~ 4/3 words

# pHash (Zauner 2010, as in the `imagehash` package): grey image at 32x32, 2-D DCT-II, the 8x8
# lowest-frequency coefficients compared with their median -> 64 bits.
PHASH_IMAGE = 32
PHASH_BITS_SIDE = 8
# Default Hamming threshold (of 64 bits), measured here on 100 smooth random images (an 8x8 random colour grid
# upsampled to 64 px): a 0.5x or 0.75x resize + JPEG q=75 moves the hash by at most 4 bits (mean 0.4), while
# distinct images differ by 18 bits at least (mean 31.5). Limits: flatter images (a 4x4 grid) move by up to
# 10 bits; sparse synthetic images (the shapes world: a few flat shapes on a plain background, hashed in grey)
# collide: 9 of the 19,900 pairs of 200 distinct shapes-world images are within 4 bits. Don't --dedup those.
DEFAULT_HAMMING = 4
# Colour: the mean RGB of each cell of a 4x4 grid, compared as the largest Euclidean distance (0..255 units)
# between corresponding cells. Measured here (rectiflow.data.icons, 64 px): a 0.5x / 0.75x / 1x resize + JPEG
# q=75 moves it by 13.6 at most over 450 copies (12.7 for the smooth random images above), while the 576
# colour variants of the 16 icons (same drawing, another of 9 colours) are 19.1 apart at least (1st
# percentile 29.3; the closest: a thin key, orange vs yellow). An 8x8 grid separates worse (copies up to 47,
# variants from 42): resizing blurs colour across small cells.
COLOUR_GRID = 4
DEFAULT_COLOUR = 16.0
# A dedup that would remove more than this fraction of a dataset is announced loudly before anything is
# written: real datasets rarely hold that many copies, a threshold that is too loose often does.
LARGE_DEDUP_FRACTION = 0.05


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II matrix C[k, m] = cos(pi (2m + 1) k / (2n)) (scipy's dct up to a factor 2, which
    does not change which coefficients exceed the median)."""
    k, m = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * m + 1) * k / (2 * n))


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash of an image."""
    grey = np.asarray(img.convert("L").resize((PHASH_IMAGE, PHASH_IMAGE), Image.LANCZOS), dtype=np.float64)
    c = _dct_matrix(PHASH_IMAGE)
    dct = c @ grey @ c.T  # [32, 32]: rows = vertical frequency, columns = horizontal frequency
    low = dct[:PHASH_BITS_SIDE, :PHASH_BITS_SIDE].reshape(-1)  # [8, 8] -> [64]
    bits = low > np.median(low)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class Fingerprint:
    """What near-duplicate detection compares: the grey pHash (structure) and a 4x4 colour thumbnail."""

    phash: int
    colour: np.ndarray  # [4, 4, 3] float64, cell means in RGB 0..255
    pixels: int  # width x height: the largest image of a group is kept


def colour_thumbnail(img: Image.Image) -> np.ndarray:
    """Mean RGB of each cell of a COLOUR_GRID x COLOUR_GRID grid: [n, n, 3]."""
    small = img.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.BOX)
    return np.asarray(small, dtype=np.float64)


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest RGB Euclidean distance between corresponding cells of two colour thumbnails."""
    return float(np.sqrt(((a - b) ** 2).sum(-1)).max())


def fingerprint(img: Image.Image) -> Fingerprint:
    return Fingerprint(phash(img), colour_thumbnail(img), img.size[0] * img.size[1])


@dataclass
class DuplicateGroup:
    """One kept image and the images removed as its near-duplicates, each with (index, pHash bits, colour)."""

    kept: int
    reason: str
    removed: list[tuple[int, int, float]]


def duplicate_groups(prints: dict[int, Fingerprint], threshold: int = DEFAULT_HAMMING,
                     colour_threshold: float = DEFAULT_COLOUR) -> list[DuplicateGroup]:
    """Groups of near-duplicates: every removed image is within `threshold` pHash bits AND
    `colour_threshold` colour distance of the group's kept image (never only of another removed one: no
    chains, unlike single-linkage clustering, which let the red, green and yellow versions of an icon
    join through one another).

    Greedy leader clustering: images are visited largest first (then in listing order); each joins the
    nearest kept image within both thresholds or becomes a kept image itself. Candidate kept images come
    from splitting the 64 bits into threshold + 1 bands: two hashes within the threshold agree exactly on
    at least one band (pigeonhole), so only images sharing a band are compared."""
    if not 0 <= threshold < 64:
        raise ConfigError(f"Hamming threshold {threshold} must be in [0, 63]")
    if not colour_threshold >= 0:
        raise ConfigError(f"colour threshold {colour_threshold} must be >= 0")
    edges = np.linspace(0, 64, threshold + 2).astype(int)
    masks = [(1 << int(hi)) - (1 << int(lo)) for lo, hi in zip(edges[:-1], edges[1:])]
    bands: list[dict[int, list[int]]] = [{} for _ in masks]  # band value -> kept images
    groups: dict[int, DuplicateGroup] = {}
    for i in sorted(prints, key=lambda k: (-prints[k].pixels, k)):
        fp = prints[i]
        best = None
        for mask, band in zip(masks, bands):
            for k in band.get(fp.phash & mask, ()):
                d = hamming(fp.phash, prints[k].phash)
                if d > threshold:
                    continue
                c = colour_distance(fp.colour, prints[k].colour)
                if c <= colour_threshold and (best is None or (d, c) < best[1:]):
                    best = (k, d, c)
        if best is None:
            for mask, band in zip(masks, bands):
                band.setdefault(fp.phash & mask, []).append(i)
            continue
        k = best[0]
        if k not in groups:
            groups[k] = DuplicateGroup(k, "", [])
        groups[k].removed.append((i, best[1], best[2]))
    for g in groups.values():
        px = prints[g.kept].pixels
        g.reason = ("the largest image of the group" if any(prints[j].pixels < px for j, _, _ in g.removed)
                    else "listed first among images of the same size")
    return sorted(groups.values(), key=lambda g: g.kept)


def count_words(caption: str) -> int:
    """Approximate token count from whitespace words (see WORDS_TO_TOKENS)."""
    return math.ceil(len(caption.split()) * WORDS_TO_TOKENS)


@dataclass
class CheckReport:
    """What `check_dataset` found: `kept` are indices into `source.samples`."""

    source: Source
    kept: list[int]
    problems: list[Problem] = field(default_factory=list)
    token_counter: str = "words"
    duplicate_groups: list[DuplicateGroup] = field(default_factory=list)
    longest_caption: int = 0  # tokens of the longest caption over the limit (0: none over it)

    def counts(self) -> dict[str, int]:
        c = Counter(p.kind for p in self.problems)
        return {k: c[k] for k in KINDS if c[k]}

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        listed = len(self.source) + sum(p.kind in ("missing_caption", "empty_caption", "missing_image")
                                        for p in self.problems)
        rows = [("samples found", str(listed), ""), ("kept", str(len(self.kept)), "")]
        for kind, n in self.counts().items():
            example = next(p for p in self.problems if p.kind == kind)
            rows.append((kind, str(n), f"e.g. {example.location}: {example.detail}"))
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)

    @property
    def duplicates_removed(self) -> int:
        return sum(len(g.removed) for g in self.duplicate_groups)

    def large_dedup_warning(self, limit: float = LARGE_DEDUP_FRACTION) -> str | None:
        """A loud message when dedup removes more than `limit` of the samples, else None."""
        n, total = self.duplicates_removed, len(self.source)
        if not total or n <= limit * total:
            return None
        return (f"WARNING: --dedup removes {n} of {total} samples ({100 * n / total:.1f}%, more than "
                f"{100 * limit:g}%) as near-duplicates of {len(self.duplicate_groups)} kept images. Look at "
                "the groups (--report FILE) before training on the manifest: if they are distinct images, "
                "lower --hamming / --colour or leave out --dedup.")

    def duplicates_text(self, limit: int | None = None) -> str:
        """The duplicate groups, one line per group: kept image, why, removed images with distances."""
        lines = []
        for g in self.duplicate_groups[:limit]:
            removed = ", ".join(f"{self.source[j].location} (pHash {d}, colour {c:.1f})"
                                for j, d, c in g.removed)
            lines.append(f"keep {self.source[g.kept].location} ({g.reason}); remove {removed}")
        if limit is not None and len(self.duplicate_groups) > limit:
            lines.append(f"... {len(self.duplicate_groups) - limit} more groups (--report FILE lists all)")
        return "\n".join(lines)

    def write_report(self, path) -> Path:
        """The table, every problem (one a line) and every duplicate group, as text."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = [self.table(), "", "problems:"] + [str(p) for p in self.problems]
        if self.duplicate_groups:
            parts += ["", "duplicate groups:", self.duplicates_text()]
        return write_text(path, "\n".join(parts) + "\n")

    def write_manifest(self, path) -> Path:
        """jsonl of the kept samples (paths relative to the manifest), readable by `open_source(path)`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i in self.kept:
                f.write(json.dumps(self.source[i].to_json(path.parent.resolve())) + "\n")
        return path


def check_dataset(source: Source, *, size: int | None = None, max_tokens: int | None = None,
                  count_tokens: Callable[[str], int] | None = None, dedup: bool = False,
                  hamming_threshold: int = DEFAULT_HAMMING, colour_threshold: float = DEFAULT_COLOUR,
                  progress: bool = True) -> CheckReport:
    """Decode every image of `source` and report the problems listed in the module docstring."""
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}; use a positive number of tokens")
    counter = count_tokens or count_words
    problems = list(source.problems)
    bad: set[int] = set()
    prints: dict[int, Fingerprint] = {}
    longest = 0
    for i in tqdm(range(len(source)), desc="checking", unit="img", disable=not progress):
        sample = source[i]
        try:
            img = source.load_image(i)
        except IMAGE_ERRORS as e:
            problems.append(Problem("unreadable", sample.location, f"cannot decode image ({e})"))
            bad.add(i)
            continue
        if size is not None and min(img.size) < size:
            problems.append(Problem("too_small", sample.location, f"{img.size[0]}x{img.size[1]} < {size}"))
            bad.add(i)
        if max_tokens is not None:
            for fld, caps in sample.captions.items():
                for cap in caps:
                    n = counter(cap)
                    if n > max_tokens:
                        longest = max(longest, n)
                        problems.append(Problem("caption_too_long", sample.location,
                                                f"{fld}: {n} tokens > {max_tokens}: {cap[:40]!r}..."))
                        bad.add(i)
        if dedup and i not in bad:
            prints[i] = fingerprint(img)
    groups = duplicate_groups(prints, hamming_threshold, colour_threshold) if dedup else []
    for g in groups:
        for j, d, c in g.removed:
            problems.append(Problem("duplicate", source[j].location,
                                    f"near-duplicate of {source[g.kept].location}, which is kept "
                                    f"({g.reason}); pHash distance {d}/64, colour distance {c:.1f}"))
            bad.add(j)
    for p in problems[len(source.problems):]:
        log.warning("%s", p)
    kept = [i for i in range(len(source)) if i not in bad]
    return CheckReport(source, kept, problems, "tokenizer" if count_tokens else "words", groups,
                       longest)


def long_caption_hint(report: CheckReport, text_encoder: str | None) -> str | None:
    """How to fix over-long captions, when there are any: a longer MiniLM, or shorter captions."""
    from rectiflow.models.text import MINILM_POSITIONS
    if not report.longest_caption:
        return None
    n = report.longest_caption
    if text_encoder and text_encoder.split(":")[0] == "minilm":
        if n <= MINILM_POSITIONS:
            return (f"fix: cache (and quickstart) with --text-encoder minilm:{n} so that the longest caption "
                    f"({n} tokens) is read whole, or shorten the captions")
        return f"fix: shorten the captions: the longest needs {n} tokens, MiniLM reads {MINILM_POSITIONS}"
    if text_encoder:
        return f"fix: shorten the captions to the text encoder's limit (the longest needs {n} tokens)"
    return (f"fix: the longest caption needs about {n} tokens; with MiniLM cache with --text-encoder "
            f"minilm:N for N of at least that (check the real count with --text-encoder minilm:N here), "
            "or shorten the captions")

"""`rectiflow data check`: find unusable samples before training, and write a manifest of the good ones.

Problems reported (each with the file it concerns):
- unreadable: the image cannot be decoded (corrupt, truncated, not an image);
- missing_image / missing_caption / empty_caption / bad_metadata: found while listing the source;
- too_small: the shorter side is below the training size (it would be upscaled, i.e. blurred);
- caption_too_long: more tokens than the text encoder reads (the rest would be cut off). Counted with the
  encoder's tokenizer when one is given, else approximated as ceil(4/3 x whitespace words) (a token is about
  3/4 of an English word for BPE/WordPiece vocabularies, OpenAI's rule of thumb);
- duplicate: a near-duplicate of an earlier image. The SD3 paper (Esser et al. 2024) deduplicates by
  clustering image embeddings (SSCD); a 64-bit DCT perceptual hash (pHash) with a Hamming threshold is the
  cheap stand-in here: it finds resized / recompressed copies, not semantically similar images. Pairs within
  the threshold are clustered with union-find; the first sample of each cluster is kept.
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
from rectiflow.io.atomic import atomic_write

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


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the smallest index is the root: "keep the first"


def duplicate_clusters(hashes: dict[int, int], threshold: int = DEFAULT_HAMMING) -> list[list[int]]:
    """Clusters (sorted lists of keys, size >= 2) of hashes linked by Hamming distance <= threshold.

    Candidate pairs come from splitting the 64 bits into threshold + 1 bands: two hashes within the threshold
    agree exactly on at least one band (pigeonhole), so bucketing by band finds every such pair without
    comparing all pairs; candidates are then checked exactly."""
    if not 0 <= threshold < 64:
        raise ConfigError(f"Hamming threshold {threshold} must be in [0, 63]")
    keys = sorted(hashes)
    uf = UnionFind(len(keys))
    bands = threshold + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (1 << int(hi)) - (1 << int(lo))
        groups: dict[int, list[int]] = {}
        for pos, k in enumerate(keys):
            groups.setdefault(hashes[k] & mask, []).append(pos)
        for members in groups.values():
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    i, j = members[a], members[b]
                    if uf.find(i) != uf.find(j) and hamming(hashes[keys[i]], hashes[keys[j]]) <= threshold:
                        uf.union(i, j)
    clusters: dict[int, list[int]] = {}
    for pos, k in enumerate(keys):
        clusters.setdefault(uf.find(pos), []).append(k)
    return [sorted(c) for c in clusters.values() if len(c) > 1]


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
                  hamming_threshold: int = DEFAULT_HAMMING, progress: bool = True) -> CheckReport:
    """Decode every image of `source` and report the problems listed in the module docstring."""
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}; use a positive number of tokens")
    counter = count_tokens or count_words
    problems = list(source.problems)
    bad: set[int] = set()
    hashes: dict[int, int] = {}
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
                        problems.append(Problem("caption_too_long", sample.location,
                                                f"{fld}: {n} tokens > {max_tokens}: {cap[:40]!r}..."))
                        bad.add(i)
        if dedup and i not in bad:
            hashes[i] = phash(img)
    if dedup:
        for cluster in duplicate_clusters(hashes, hamming_threshold):
            first = cluster[0]
            for j in cluster[1:]:
                d = hamming(hashes[first], hashes[j])
                problems.append(Problem("duplicate", source[j].location,
                                        f"near-duplicate of {source[first].location} (pHash distance {d})"))
                bad.add(j)
    for p in problems[len(source.problems):]:
        log.warning("%s", p)
    kept = [i for i in range(len(source)) if i not in bad]
    return CheckReport(source, kept, problems, "tokenizer" if count_tokens else "words")

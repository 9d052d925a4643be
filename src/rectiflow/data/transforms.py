"""Image preprocessing: decode, resize + centre crop, aspect-ratio buckets, conversion to tensors.

Sizes are multiples of 16 because the autoencoder downsamples 8x and the transformer packs latents 2x2 into
tokens (FLUX's `prepare()`), so an image side of 16k gives a whole number of tokens.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from rectiflow.errors import ConfigError

MULTIPLE = 16  # 8x autoencoder downsampling * 2x2 token packing (docs/design.md sec. 1)

# Errors PIL raises on broken or hostile files (truncated data, bad headers, decompression bombs).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB image, honouring EXIF orientation and putting transparency on white."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only, after EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag; 5-8 swap the axes
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers (width, height), then crop the centre. Bicubic with antialiasing."""
    w, h = img.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image):
    """PIL RGB -> float32 tensor [3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    return x.to(torch.float32) / 127.5 - 1.0


def check_side(n: int, what: str = "size") -> int:
    if n <= 0 or n % MULTIPLE:
        hint = max(MULTIPLE, n // MULTIPLE * MULTIPLE)
        raise ConfigError(f"{what} {n} is not a positive multiple of {MULTIPLE}; use e.g. {hint}")
    return n


@dataclass(frozen=True)
class CenterCrop:
    """Resize the shorter side to `size` and crop the centre square."""

    size: int

    def __post_init__(self):
        check_side(self.size)

    def target(self, width: int, height: int) -> tuple[int, int]:
        return self.size, self.size

    def describe(self) -> dict:
        return {"mode": "center_crop", "size": self.size}


def make_buckets(size: int, max_ratio: float = 2.0, step: int | None = None) -> tuple[tuple[int, int], ...]:
    """Aspect-ratio buckets of about size*size pixels: widths on a grid of `step`, each with the largest
    height (a multiple of 16) keeping w*h <= size^2, aspect ratios within [1/max_ratio, max_ratio].

    The scheme is NovelAI's aspect-ratio bucketing (2022) as used by SDXL training; the default step (16 px
    per 256 px of size, so 64 at 1024) gives a few dozen buckets at 1024 as SDXL's list does."""
    check_side(size)
    if max_ratio < 1:
        raise ConfigError(f"bucket max_ratio {max_ratio} must be >= 1")
    step = step or MULTIPLE * max(1, size // 256)
    check_side(step, "bucket step")
    area = size * size
    buckets = set()
    for w in range(step, int(size * math.sqrt(max_ratio)) + 1, step):
        h = area // w // MULTIPLE * MULTIPLE
        if h > 0 and 1 / max_ratio <= w / h <= max_ratio:
            buckets.add((w, h))
            buckets.add((h, w))
    return tuple(sorted(buckets, key=lambda b: b[0] / b[1]))


@dataclass(frozen=True)
class Buckets:
    """Aspect-ratio buckets: each image goes to the bucket nearest in log aspect ratio, is scaled to cover it
    and centre-cropped. All buckets have (about) the same area so that batches cost the same."""

    buckets: tuple[tuple[int, int], ...]

    def __post_init__(self):
        b = tuple((int(w), int(h)) for w, h in self.buckets)
        if not b:
            raise ConfigError("bucket list is empty; give at least one (width, height)")
        for w, h in b:
            check_side(w, "bucket width")
            check_side(h, "bucket height")
        areas = [w * h for w, h in b]
        if min(areas) < 0.75 * max(areas):  # 0.75: rounding to 16 px loses at most a few % per side
            raise ConfigError(f"buckets {b} differ in area by more than 25%; use buckets of about equal area")
        object.__setattr__(self, "buckets", b)

    @classmethod
    def for_size(cls, size: int, max_ratio: float = 2.0, step: int | None = None) -> Buckets:
        return cls(make_buckets(size, max_ratio, step))

    def index(self, width: int, height: int) -> int:
        """The bucket nearest to the image's aspect ratio (in log ratio, so 2:1 and 1:2 are symmetric)."""
        r = math.log(width / height)
        ratios = [math.log(w / h) for w, h in self.buckets]
        return min(range(len(ratios)), key=lambda i: abs(ratios[i] - r))

    def target(self, width: int, height: int) -> tuple[int, int]:
        return self.buckets[self.index(width, height)]

    def describe(self) -> dict:
        return {"mode": "buckets", "buckets": [list(b) for b in self.buckets]}

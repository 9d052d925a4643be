"""Training datasets over a `Source`, and deterministic, resumable samplers.

`ImageCaptionDataset(source, size=...)` (or `buckets=...`) yields
``{"image": [3, H, W] float32 in [-1, 1], "caption": str, "field": str, "text": {encoder: str}, "id": str,
"index": int}`` where "text" holds the caption each text encoder sees after dropout ("" when dropped; the
empty caption is the unconditional input of classifier-free guidance).

Determinism: a sample's caption choice and dropout are seeded by (seed, epoch, index) (call `set_epoch` at the
start of each epoch), and the samplers' order is a function of (seed, epoch) only, so the state
``{"epoch": e, "position": p}`` restores the exact remaining order.

Unreadable images: with ``on_error="raise"`` a `FormatError` names the file; with ``"skip"`` it is logged
once and the next readable sample (in index order) is returned in its place, resized to the bucket of the
requested index so batches still stack.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from rectiflow.data.captions import CaptionPolicy
from rectiflow.data.sources import ON_ERROR, Source
from rectiflow.data.transforms import IMAGE_ERRORS, Buckets, CenterCrop, resize_center_crop, to_tensor
from rectiflow.errors import ConfigError, FormatError

log = logging.getLogger(__name__)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images resized + centre-cropped to `size` (or to their aspect-ratio bucket) with one chosen caption."""

    def __init__(self, source: Source, *, size: int | None = None, buckets: Buckets | None = None,
                 captions: CaptionPolicy | None = None, seed: int = 0, on_error: str = "skip"):
        if (size is None) == (buckets is None):
            raise ConfigError("give exactly one of size (centre crop) or buckets (aspect-ratio buckets)")
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error={on_error!r}; use one of {ON_ERROR}")
        if len(source) == 0:
            raise FormatError(f"dataset {source.describe()} has no usable samples; see `rectiflow data "
                              "check`")
        self.source, self.seed, self.on_error, self.epoch = source, int(seed), on_error, 0
        self.resize = CenterCrop(size) if size is not None else buckets
        self.captions = captions or CaptionPolicy()
        self.bad: set[int] = set()
        self._bucket_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def describe(self) -> dict:
        return {"source": self.source.describe(), **self.resize.describe()}

    def bucket_ids(self) -> list[int]:
        """Bucket of every sample (0 for all with centre crop); reads image headers once."""
        if self._bucket_ids is None:
            if isinstance(self.resize, CenterCrop):
                self._bucket_ids = [0] * len(self)
            else:
                ids = []
                for i in tqdm(range(len(self)), desc="image sizes", disable=len(self) < 1000):
                    try:
                        ids.append(self.resize.index(*self.source.image_size(i)))
                    except IMAGE_ERRORS as e:
                        self._unreadable(i, e)
                        ids.append(0)
                self._bucket_ids = ids
        return self._bucket_ids

    def target_size(self, i: int) -> tuple[int, int]:
        if isinstance(self.resize, CenterCrop):
            return self.resize.size, self.resize.size
        return self.resize.buckets[self.bucket_ids()[i]]

    def _unreadable(self, i: int, e: Exception) -> None:
        where = self.source[i].location
        if self.on_error == "raise":
            raise FormatError(f"{where}: unreadable image ({e}); remove it or use on_error='skip'") from None
        if i not in self.bad:
            log.warning("skipping unreadable image %s (%s)", where, e)
            self.bad.add(i)

    def _load(self, i: int):
        """The image of sample i, or of the next readable sample after it (on_error="skip")."""
        for k in range(len(self)):
            j = (i + k) % len(self)
            if j in self.bad:
                continue
            try:
                return j, self.source.load_image(j)
            except IMAGE_ERRORS as e:
                self._unreadable(j, e)
        raise FormatError(f"no readable image in {self.source.describe()}")

    def __getitem__(self, i: int) -> dict:
        j, img = self._load(i)
        w, h = self.target_size(i)
        image = to_tensor(resize_center_crop(img, w, h))  # [3, h, w] in [-1, 1]
        sample = self.source[j]
        choice = self.captions(sample.captions, self.seed, self.epoch, j)
        return {"image": image, "id": sample.id, "index": j, **choice}


class ResumableSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch (identity if shuffle=False), restartable at (epoch, position).

    `position` counts indices handed out in the current epoch. A DataLoader prefetches, so the trainer should
    save the number of samples it has actually consumed: ``{"epoch": e, "position": consumed}``."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def __len__(self) -> int:
        return self.n - self.position

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.position < self.n:
            self.position += 1
            yield int(order[self.position - 1])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.n or epoch < 0:
            raise ConfigError(f"sampler state {state} does not fit a dataset of {self.n} samples")
        self.epoch, self.position = epoch, position


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches whose samples share a bucket: each epoch, every bucket's indices are shuffled and cut into
    batches, and the batches of all buckets are shuffled together (seeded by (seed, epoch)).
    `position` counts batches handed out in the current epoch; state and resume as `ResumableSampler`."""

    def __init__(self, bucket_ids, batch_size: int, seed: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; use a positive integer")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size, self.seed, self.drop_last = int(batch_size), int(seed), drop_last
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, int(epoch)])
        out = []
        for b in np.unique(self.bucket_ids):
            idx = rng.permutation(np.flatnonzero(self.bucket_ids == b))
            stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
            out += [idx[s:s + self.batch_size].tolist() for s in range(0, stop, self.batch_size)]
        return [out[k] for k in rng.permutation(len(out))]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.position

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.batches(epoch)):
            raise ConfigError(f"sampler state {state} does not fit this dataset's batches")
        self.epoch, self.position = epoch, position

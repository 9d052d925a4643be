"""The trainer's view of a latent cache: a held-out split, resumable global batches, per-rank slices.

Batches are GLOBAL: every rank draws the same list of `data.batch_size` cache indices (same bucket, seeded
by (seed, epoch)), and takes its slice of each accumulation micro-batch (`local_slice`). So the data seen by
a step, its timesteps and its noise do not depend on the number of processes, and a run on N ranks trains on
exactly what a single process with the same global batch trains on.
"""

from __future__ import annotations

import numpy as np

from rectiflow.data.datasets import BucketBatchSampler
from rectiflow.errors import ConfigError

__all__ = ["split_holdout", "BatchStream", "local_slice"]


def split_holdout(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): `holdout` samples picked by a seeded permutation, not trained."""
    if holdout >= n:
        raise ConfigError(f"validation.holdout={holdout} leaves no training samples in a cache of {n}; "
                          "hold out fewer")
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    held = sorted(int(i) for i in perm[:holdout])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


class BatchStream:
    """Global batches of cache indices from `indices`, grouped by latent shape; state (epoch, position)."""

    def __init__(self, bucket_ids: list[int], indices: list[int], batch_size: int, seed: int):
        self.indices = list(indices)
        self.sampler = BucketBatchSampler([bucket_ids[i] for i in self.indices], batch_size, seed,
                                          drop_last=True)
        self.epoch, self.position = 0, 0
        self._batches: tuple[int, list[list[int]]] | None = None
        if not self._epoch_batches(0):
            raise ConfigError(f"no latent-size bucket of the cache has data.batch_size={batch_size} training "
                              f"samples ({len(self.indices)} in all); lower data.batch_size")

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._batches is None or self._batches[0] != epoch:
            self._batches = (epoch, self.sampler.batches(epoch))
        return self._batches[1]

    def next(self) -> tuple[int, list[int]]:
        """(epoch, cache indices of the next global batch)."""
        batches = self._epoch_batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        batch = batches[self.position]
        self.position += 1
        return self.epoch, [self.indices[j] for j in batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self._epoch_batches(epoch)):
            raise ConfigError(f"data position {state} does not fit this cache and batch size; resume "
                              "with the same cache and data.batch_size")
        self.epoch, self.position = epoch, position


def local_slice(batch_size: int, micro: int, accumulation: int, rank: int, world_size: int) -> slice:
    """Positions in a global batch of micro-batch `micro` on `rank`: [(micro * world + rank) * n, + n)."""
    per = batch_size // (accumulation * world_size)
    if per * accumulation * world_size != batch_size:
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by world_size ({world_size}) x "
                          f"optim.accumulation ({accumulation}); change one of them")
    start = (micro * world_size + rank) * per
    return slice(start, start + per)

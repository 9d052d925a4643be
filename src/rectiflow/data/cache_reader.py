"""`LatentCache`: random access to a cache written by `rectiflow.data.cache_writer.build_cache`.

Shards are read with rectiflow.io.safetensors_io. A cache up to `max_ram_bytes` (default 2 GiB) is loaded
whole into RAM on first use; a larger one keeps the `max_shards` most recently used shards (use
`BucketBatchSampler` over `bucket_ids()` and `get_batch`, which groups indices by shard).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from rectiflow.data.cache_writer import (
    FORMAT,
    MANIFEST,
    VERSION,
    _mismatch,
    autoencoder_identity,
    text_encoder_identity,
)
from rectiflow.data.captions import CaptionPolicy, sample_rng
from rectiflow.errors import FormatError, RectiflowError
from rectiflow.io.safetensors_io import load_tensors

log = logging.getLogger(__name__)


class LatentCache:
    """Items: {"latents": [C, h, w], "txt": [L, D], "vec": [Dv], "caption_index": int, "id": str, "index": i}.

    The caption of item i is chosen by `captions` (a CaptionPolicy: field mix; its dropout is applied too,
    replacing the caption by index 0 = "" for the encoder named "default" or the first one) seeded by
    (seed, epoch, i); call `set_epoch` every epoch."""

    def __init__(self, path, captions: CaptionPolicy | None = None, seed: int = 0,
                 max_ram_bytes: int = 2 << 30, max_shards: int = 8):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise FormatError(f"{self.path}: no {MANIFEST}; build a cache there with `rectiflow cache`")
        m = json.loads(file.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise FormatError(f"{self.path}: not a {FORMAT} v{VERSION} cache; rebuild it with "
                              "`rectiflow cache`")
        if m.get("status") != "complete":
            n = len(m["shards"]) + len(m["text_shards"])
            raise FormatError(f"{self.path}: cache incomplete ({len(m.get('done', []))} of {n} shards); "
                              "rerun `rectiflow cache` with the same arguments to finish it")
        self.manifest, self.seed, self.epoch = m, int(seed), 0
        self.captions = captions or CaptionPolicy()
        self.ids: list[str] = m["ids"]
        self.caption_texts: list[str] = m["captions"]
        self.caption_indices: list[dict[str, list[int]]] = m["caption_indices"]
        self._shard_of = [k for k, s in enumerate(m["shards"]) for _ in range(s["count"])]
        size = sum((self.path / s["file"]).stat().st_size for s in m["shards"] + m["text_shards"])
        self._max_shards = len(m["shards"]) + len(m["text_shards"]) if size <= max_ram_bytes else max_shards
        self._loaded: OrderedDict[str, dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def empty_caption_index(self) -> int:
        return 0

    def _shard(self, file: str) -> dict[str, torch.Tensor]:
        if file in self._loaded:
            self._loaded.move_to_end(file)
        else:
            self._loaded[file] = load_tensors(self.path / file)
            while len(self._loaded) > self._max_shards:
                self._loaded.popitem(last=False)
        return self._loaded[file]

    def text(self, caption_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt [L, D], vec [Dv]) of a unique caption."""
        for s in self.manifest["text_shards"]:
            if s["start"] <= caption_index < s["start"] + s["count"]:
                t = self._shard(s["file"])
                return t["txt"][caption_index - s["start"]], t["vec"][caption_index - s["start"]]
        raise IndexError(f"caption index {caption_index} out of range 0..{len(self.caption_texts) - 1}")

    def latents(self, i: int) -> torch.Tensor:
        s = self.manifest["shards"][self._shard_of[i]]
        return self._shard(s["file"])["latents"][i - s["start"]]

    def caption_index(self, i: int) -> int:
        """The caption of item i this epoch (after the caption policy's mix and dropout)."""
        per_field = {f: tuple(v) for f, v in self.caption_indices[i].items()}
        rng = sample_rng(self.seed, self.epoch, i)
        _, k = self.captions.choose(per_field, rng)
        dropped = self.captions.drop("x", rng)
        return self.empty_caption_index if dropped[self.captions.encoders[0]] == "" else k

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} samples")
        i %= len(self)
        k = self.caption_index(i)
        txt, vec = self.text(k)
        return {"latents": self.latents(i), "txt": txt, "vec": vec, "caption_index": k, "id": self.ids[i],
                "index": i}

    def get_batch(self, indices) -> dict:
        """Stacked items (same latent shape needed: indices from one bucket), read shard by shard."""
        order = sorted(range(len(indices)), key=lambda j: self._shard_of[indices[j]])
        items = [None] * len(indices)
        for j in order:
            items[j] = self[indices[j]]
        shapes = {tuple(it["latents"].shape) for it in items}
        if len(shapes) > 1:
            raise RectiflowError(f"batch mixes latent shapes {sorted(shapes)}; sample batches per bucket")
        out = {k: torch.stack([it[k] for it in items]) for k in ("latents", "txt", "vec")}
        out["caption_index"] = torch.tensor([it["caption_index"] for it in items])
        out["id"] = [it["id"] for it in items]
        return out

    def bucket_ids(self) -> list[int]:
        """Per item, an id of its latent shape (for `BucketBatchSampler`)."""
        sizes = sorted({tuple(s["size"]) for s in self.manifest["shards"]})
        by_shard = [sizes.index(tuple(s["size"])) for s in self.manifest["shards"]]
        return [by_shard[k] for k in self._shard_of]

    def require_compatible(self, autoencoder=None, text_encoder=None) -> None:
        """Raise a one-line RectiflowError unless the cache was made by these encoders (None: not checked)."""
        problems = []
        if autoencoder is not None:
            problems.append(_mismatch("autoencoder", self.manifest["autoencoder"],
                                      autoencoder_identity(autoencoder)))
        if text_encoder is not None:
            problems.append(_mismatch("text encoder", self.manifest["text_encoder"],
                                      text_encoder_identity(text_encoder)))
        problems = [p for p in problems if p]
        if problems:
            raise RectiflowError(f"cache made by other encoders: {'; '.join(problems)}; rebuild it with "
                                 f"`rectiflow cache` or use the encoders recorded in {self.path / MANIFEST}")


class NegativeLatents:
    """The latents of a cache of counterfactual images that pairs row for row with `positive`: the same ids,
    captions and shards (`rectiflow data shapes --counterfactual` writes the images under the same names and
    captions, and `rectiflow cache` with the same arguments plans the same rows), the images different."""

    def __init__(self, path, positive: LatentCache):
        if Path(path).resolve() == positive.path.resolve():
            raise RectiflowError(f"data.negative_cache is data.cache itself ({path}); build a cache of the "
                                 "counterfactual images (`rectiflow data shapes --counterfactual`)")
        self.cache = LatentCache(path)
        mine, theirs = self.cache.manifest, positive.manifest
        for key, what in (("ids", "sample ids"), ("caption_indices", "captions"), ("shards", "shards")):
            if mine[key] != theirs[key]:
                raise RectiflowError(
                    f"negative cache {self.cache.path} does not pair with {positive.path}: its {what} "
                    "differ; build both with the same `rectiflow cache` arguments from the paired folders")
        if mine["autoencoder"] != theirs["autoencoder"]:
            raise RectiflowError(f"negative cache {self.cache.path} was encoded by another autoencoder than "
                                 f"{positive.path}; build both with the same one")

    def get_latents(self, indices) -> torch.Tensor:
        """[b, C, h, w]: the counterfactual latents of rows `indices`."""
        return torch.stack([self.cache.latents(int(i)) for i in indices])

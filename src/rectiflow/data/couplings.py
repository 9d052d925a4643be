"""Couplings for reflow: fixed (noise, endpoint latent) pairs drawn from a teacher's ODE, on disk.

Liu et al. 2022 ("Flow Straight and Fast", sec. 2.3 "reflow"): the k-rectified flow is trained on the pairs
(z_1, z_0) that the (k-1)-th flow's ODE links, x_t = (1 - t) z_0 + t z_1 with the paired noise z_1, not
fresh noise. `rectiflow reflow pairs` (rectiflow.sample.couplings) writes them; `CouplingsDataset` serves
them to `rectiflow train` (data.couplings=DIR) with the interface the trainer uses for a latent cache.

Layout of DIR:
    manifest.json            {"format": "rectiflow-couplings", "version": 1, "teacher": {"name", "hash"},
                              "solver", "steps", "shift", "cfg_scale", "guidance", "seed", "prompts":
                              {"source", "sha256", "count"}, "latent_shape": [C, h, w], "text_encoder":
                              {"spec", "fingerprint"}, "autoencoder": {"config", "weights_sha256"},
                              "shard_size", "shards": [{"file", "start", "count", "size": [W, H] pixels,
                              "seconds"}], "n", "status": "partial" | "complete"}
                             (the text_encoder / autoencoder / shards[].size entries as a latent cache's)
    empty.safetensors        txt [L, D], vec [Dv]: the embedding of "" (CFG's unconditional input, caption
                             dropout)
    pairs-00000.safetensors  noise [n, C, h, w], latents [n, C, h, w] (float32), txt [U, L, D], vec [U, Dv]
                             (the shard's unique prompts), text_index [n], seed [n], cache_row [n] (-1: a
                             prompt file); metadata "prompts": JSON list of the U prompts
Shard k always holds samples [k * shard_size, (k + 1) * shard_size) (the last one fewer), and sample i is a
function of (seed, i) alone, so an interrupted or extended run continues exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from rectiflow.data.cache_writer import _mismatch, autoencoder_identity
from rectiflow.data.captions import sample_rng
from rectiflow.errors import FormatError, RectiflowError
from rectiflow.io.atomic import write_text
from rectiflow.io.safetensors_io import load_tensors, read_metadata, save_safetensors

__all__ = ["FORMAT", "VERSION", "MANIFEST", "EMPTY_FILE", "shard_name", "read_manifest", "write_manifest",
           "write_shard", "CouplingsDataset", "CouplingsWithData"]

log = logging.getLogger(__name__)

FORMAT = "rectiflow-couplings"
VERSION = 1
MANIFEST = "manifest.json"
EMPTY_FILE = "empty.safetensors"


def shard_name(k: int) -> str:
    return f"pairs-{k:05d}.safetensors"


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """DIR/manifest.json of a couplings directory; None when there is none; FormatError if it is not ours."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        m = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise FormatError(f"{file} is not a couplings manifest (format {FORMAT!r}); use another directory")
    if m.get("version") != VERSION:
        raise FormatError(f"{file} is couplings format version {m.get('version')!r}; this rectiflow reads "
                          f"{VERSION}")
    return m


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    write_text(Path(path) / MANIFEST, json.dumps(manifest, indent=1))  # atomic: temp file, fsync, rename


def write_shard(path: Path, tensors: dict[str, torch.Tensor], prompts: list[str]) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_safetensors(tensors, path, {"prompts": json.dumps(prompts)})  # atomic


def _prompts_of(file: Path) -> list[str]:
    return json.loads(read_metadata(file).get("prompts", "[]"))


class CouplingsDataset:
    """A complete couplings directory as the trainer's data source. Items: {"latents": z_0 [C, h, w],
    "noise": z_1 [C, h, w], "txt": [L, D], "vec": [Dv], "id": str, "index": i}; caption dropout replaces a
    sample's text by the stored "" embedding with probability `caption_dropout`, seeded by (seed, epoch, i)
    like the latent cache's. Everything is held in memory (latents are small)."""

    def __init__(self, path: str | os.PathLike, caption_dropout: float = 0.0, seed: int = 0):
        self.path = Path(path)
        m = read_manifest(self.path)
        if m is None:
            raise FormatError(f"{self.path}: no {MANIFEST}; write couplings there with "
                              "`rectiflow reflow pairs`")
        if m.get("status") != "complete":
            done = sum(s["count"] for s in m["shards"])
            raise FormatError(f"{self.path}: couplings incomplete ({done} of {m['n']} pairs); rerun "
                              "`rectiflow reflow pairs` with the same arguments to finish them")
        self.manifest, self.dropout, self.seed, self.epoch = m, float(caption_dropout), int(seed), 0
        noise, latents, txt, vec, self.prompts = [], [], [], [], []
        for s in m["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise FormatError(f"{self.path}: shard {s['file']} named in the manifest is missing")
            t = load_tensors(f)
            noise.append(t["noise"].float())
            latents.append(t["latents"].float())
            txt.append(t["txt"][t["text_index"]].float())  # [U, L, D] -> [n, L, D]
            vec.append(t["vec"][t["text_index"]].float())
            names = _prompts_of(f)
            self.prompts += [names[j] for j in t["text_index"].tolist()]
        self.noise, self.z0 = torch.cat(noise), torch.cat(latents)
        self.txt, self.vec = torch.cat(txt), torch.cat(vec)
        if tuple(self.z0.shape[1:]) != tuple(m["latent_shape"]):
            raise FormatError(f"{self.path}: latents of shape {tuple(self.z0.shape[1:])}, the manifest says "
                              f"{m['latent_shape']}")
        empty = load_tensors(self.path / EMPTY_FILE)
        self._empty = (empty["txt"].float(), empty["vec"].float())
        self.teacher = m["teacher"]

    def __len__(self) -> int:
        return self.z0.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def empty_caption_index(self) -> int:
        return -1  # `text(-1)` is the "" embedding

    def text(self, caption_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt [L, D], vec [Dv]) of "" for index -1, else of sample `caption_index`'s prompt."""
        if caption_index == -1:
            return self._empty
        return self.txt[caption_index], self.vec[caption_index]

    def latents(self, i: int) -> torch.Tensor:
        return self.z0[i]

    def _dropped(self, i: int) -> bool:
        return self.dropout > 0 and float(sample_rng(self.seed, self.epoch, i).random()) < self.dropout

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} couplings")
        i %= len(self)
        txt, vec = self.text(-1 if self._dropped(i) else i)
        return {"latents": self.z0[i], "noise": self.noise[i], "txt": txt, "vec": vec, "id": f"pair-{i}",
                "index": i}

    def get_batch(self, indices) -> dict:
        items = [self[i] for i in indices]
        out = {k: torch.stack([it[k] for it in items]) for k in ("latents", "noise", "txt", "vec")}
        out["id"] = [it["id"] for it in items]
        return out

    def bucket_ids(self) -> list[int]:
        return [0] * len(self)  # one latent shape per couplings directory

    def require_compatible(self, autoencoder=None, text_encoder=None) -> None:
        """Raise unless `autoencoder` is the one the teacher's bundle decodes with (the latent space)."""
        if autoencoder is None or "autoencoder" not in self.manifest:
            return
        problem = _mismatch("autoencoder", self.manifest["autoencoder"], autoencoder_identity(autoencoder))
        if problem:
            raise RectiflowError(f"couplings {self.path} live in another latent space: {problem}; use the "
                                 "teacher bundle's autoencoder")


class CouplingsWithData(CouplingsDataset):
    """Couplings followed by the samples of a latent cache (`data.couplings` and `data.cache` both set): the
    real-data flow-matching loss mixed into reflow, in proportion to the two sizes. Indices [0, P) are pairs,
    [P, P + N) cache rows, whose noise is fresh each epoch, drawn from a generator seeded by (seed, epoch, i)
    (so a resumed run sees the same noise)."""

    def __init__(self, path, cache, caption_dropout: float = 0.0, seed: int = 0):
        super().__init__(path, caption_dropout, seed)
        self.data = cache
        shape = tuple(cache.latents(0).shape)
        if shape != tuple(self.z0.shape[1:]) or len(set(cache.bucket_ids())) != 1:
            raise RectiflowError(f"cache {cache.path} latents {shape} do not match the couplings' "
                                 f"{tuple(self.z0.shape[1:])}; mix couplings with a cache of the same size")
        problem = _mismatch("text encoder", self.manifest["text_encoder"], cache.manifest["text_encoder"])
        if problem:
            raise RectiflowError(f"cache {cache.path} and couplings {self.path} differ: {problem}; mix "
                                 "couplings with a cache made by the teacher's text encoder")

    def __len__(self) -> int:
        return self.z0.shape[0] + len(self.data)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.data.set_epoch(epoch)

    def latents(self, i: int) -> torch.Tensor:
        p = self.z0.shape[0]
        return self.z0[i] if i < p else self.data.latents(i - p)

    def __getitem__(self, i: int) -> dict:
        p = self.z0.shape[0]
        if i < p:
            return super().__getitem__(i)
        item = self.data[i - p]
        g = torch.Generator().manual_seed(int(sample_rng(self.seed, self.epoch, i, salt=1).integers(2**62)))
        noise = torch.randn(item["latents"].shape, generator=g)
        return {"latents": item["latents"], "noise": noise, "txt": item["txt"], "vec": item["vec"],
                "id": item["id"], "index": i}

    def bucket_ids(self) -> list[int]:
        return [0] * len(self)

    def require_compatible(self, autoencoder=None, text_encoder=None) -> None:
        super().require_compatible(autoencoder)
        self.data.require_compatible(autoencoder=autoencoder)

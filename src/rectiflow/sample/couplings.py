"""`rectiflow reflow pairs`: reflow couplings (noise z_1, the teacher's ODE endpoint z_0) into a directory.

Sample i gets the noise of seed `seed + i` (rectiflow.sample.initial_noise: the same noise `generate --seed`
draws) and a prompt picked by a generator seeded with (seed, i): a line of the prompt file, or a row of a
latent cache (its caption under the cache's field mix, no dropout; the cache's embeddings, so no text encoder
is needed). The teacher's ODE is solved from t = 1 to 0 with `solver` (euler / heun / midpoint / rk4 on
`steps` steps of timestep_grid(steps, shift), or dopri5: rectiflow.flow.solve_adaptive, the RK45 the RF paper
uses), CFG at `cfg_scale` with the "" embedding as unconditional input. Shards are written atomically and the
manifest after each (rectiflow.data.couplings), so rerunning the same command resumes, and a larger --n
extends. A directory holding another teacher's (or other settings') couplings is refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rectiflow.data.cache_writer import autoencoder_identity
from rectiflow.data.captions import read_prompt_file
from rectiflow.data.couplings import (
    EMPTY_FILE,
    FORMAT,
    VERSION,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.flow import METHODS, solve, solve_adaptive, timestep_grid
from rectiflow.sample.pipeline import Pipeline, initial_noise

__all__ = ["SOLVERS", "PromptSource", "make_couplings"]

log = logging.getLogger(__name__)

SOLVERS = (*METHODS, "dopri5")
# Settings that must agree between a run and the couplings already in its directory.
_FIXED = ("teacher", "solver", "steps", "shift", "cfg_scale", "guidance", "seed", "prompts", "latent_shape",
          "shard_size", "rtol", "atol")


@dataclass
class PromptSource:
    """Prompts and their embeddings. `pick(seed, i)` -> (prompt, cache row or -1, txt [L, D], vec [Dv])."""

    prompts: list[str]
    identity: dict
    cache: object | None = None  # a rectiflow.data.cache_reader.LatentCache
    encoder: object | None = None

    @classmethod
    def from_file(cls, path: str | Path, encoder) -> PromptSource:
        prompts = read_prompt_file(path)
        digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        return cls(prompts, {"source": "file", "sha256": digest, "count": len(prompts)}, encoder=encoder)

    @classmethod
    def from_cache(cls, path: str | Path) -> PromptSource:
        from rectiflow.data.cache_reader import LatentCache
        from rectiflow.data.captions import CaptionPolicy

        cache = LatentCache(path, captions=CaptionPolicy(dropout={"default": 0.0}), seed=0)
        ident = {"source": "cache", "sha256": hashlib.sha256("\n".join(cache.ids).encode()).hexdigest()[:16],
                 "count": len(cache)}
        return cls(cache.caption_texts, ident, cache=cache)

    def text_spec(self) -> dict:
        if self.cache is not None:
            return dict(self.cache.manifest["text_encoder"])
        return {"spec": self.encoder.spec(), "fingerprint": str(self.encoder.fingerprint())}

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The "" embedding (txt [L, D], vec [Dv])."""
        if self.cache is not None:
            txt, vec = self.cache.text(self.cache.empty_caption_index)
            return txt.float(), vec.float()
        txt, vec = self.encoder.encode([""])
        return txt[0].float(), vec[0].float()

    def pick(self, seed: int, i: int) -> tuple[str, int]:
        rng = np.random.default_rng([int(seed), int(i), 0xC0])  # ours: a salt apart from other seeded choices
        if self.cache is None:
            return self.prompts[int(rng.integers(len(self.prompts)))], -1
        row = int(rng.integers(len(self.cache)))
        k = self.cache.caption_index(row)
        return self.cache.caption_texts[k], row

    def embed(self, prompts: list[str], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            pairs = [self.cache.text(self.cache.caption_texts.index(p)) for p in prompts]
            return torch.stack([a for a, _ in pairs]).float(), torch.stack([b for _, b in pairs]).float()
        with torch.inference_mode():
            txt, vec = self.encoder.encode(list(prompts))
        return txt.float(), vec.float()


def _check_existing(out: Path, manifest: dict) -> list[dict]:
    """The shards already done that this run keeps; raises when the directory holds other couplings."""
    old = read_manifest(out)
    if old is None:
        if out.exists() and any(out.glob("pairs-*.safetensors")):
            raise RectiflowError(f"{out} holds couplings shards but no manifest; use an empty --out "
                                 "directory")
        return []
    if old["teacher"]["hash"] != manifest["teacher"]["hash"]:
        raise RectiflowError(
            f"{out} holds couplings of teacher {old['teacher']['name']} (hash {old['teacher']['hash']}), not "
            f"{manifest['teacher']['name']} (hash {manifest['teacher']['hash']}); couplings of two teachers "
            "do not mix: use another --out")
    for key in _FIXED:
        if old.get(key) != manifest.get(key):
            raise RectiflowError(f"{out} holds couplings made with {key}={old.get(key)!r}, this run has "
                                 f"{manifest.get(key)!r}; rerun with the same settings or use another --out")
    size = manifest["shard_size"]
    # keep the full shards, and a short last one only if it is still the last one
    return [s for s in old["shards"] if s["count"] == min(size, manifest["n"] - s["start"])
            and (out / s["file"]).is_file()]


def make_couplings(pipe: Pipeline, source: PromptSource, out: str | Path, n: int, *, steps: int = 8,
                   solver: str = "euler", shift=None, cfg_scale: float = 1.0, guidance: float | None = None,
                   seed: int = 0, batch_size: int = 64, shard_size: int = 1024, width: int | None = None,
                   height: int | None = None, rtol: float = 1e-4, atol: float = 1e-4,
                   progress: bool = True) -> dict:
    """Write (or complete) n couplings of `pipe`'s model under `out`; returns the manifest."""
    if not isinstance(n, int) or n < 1:
        raise RectiflowError(f"--n must be a positive number of pairs, got {n}")
    if solver not in SOLVERS:
        raise RectiflowError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 1 or batch_size < 1 or shard_size < 1:
        raise ConfigError("--steps, --batch-size and --shard-size must be >= 1")
    width, height = width or pipe.defaults.width, height or pipe.defaults.height
    pipe._check_size(width, height)
    lh, lw = height // pipe.downsample, width // pipe.downsample
    channels = pipe.autoencoder.params.z_channels
    text = source.text_spec()
    if source.cache is not None and pipe.text_encoder is not None:
        mine = {"spec": pipe.text_encoder.spec(), "fingerprint": str(pipe.text_encoder.fingerprint())}
        if mine != {k: text.get(k) for k in mine}:
            raise RectiflowError(f"cache {source.cache.path}'s captions were embedded by {text.get('spec')}, "
                                 f"the model uses {mine['spec']}; use a cache made with the model's encoder")
    out = Path(out)
    manifest = {
        "format": FORMAT, "version": VERSION, "teacher": {"name": pipe.name, "hash": pipe.model_hash},
        "solver": solver, "steps": None if solver == "dopri5" else steps, "shift": shift,
        "cfg_scale": float(cfg_scale), "guidance": guidance, "seed": int(seed), "prompts": source.identity,
        "latent_shape": [channels, lh, lw], "text_encoder": text,
        "autoencoder": autoencoder_identity(pipe.autoencoder),
        "shard_size": int(shard_size), "rtol": rtol if solver == "dopri5" else None,
        "atol": atol if solver == "dopri5" else None, "n": n, "status": "partial", "shards": [],
    }
    shards = _check_existing(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    empty_txt, empty_vec = source.empty()
    write_shard(out / EMPTY_FILE, {"txt": empty_txt, "vec": empty_vec}, [""])
    done = {s["start"] for s in shards}
    manifest["shards"] = shards
    write_manifest(out, manifest)
    ts = None if solver == "dopri5" else timestep_grid(steps, shift=shift, seq_len=pipe.image_tokens(lh, lw))
    uncond = (empty_txt, empty_vec) if cfg_scale != 1.0 else None
    todo = [k for k in range(math.ceil(n / shard_size)) if k * shard_size not in done]
    bar = tqdm(total=n, initial=n - sum(min(shard_size, n - k * shard_size) for k in todo), unit="pair",
               desc="couplings", disable=not progress)
    for k in todo:
        start = k * shard_size
        count = min(shard_size, n - start)
        t0 = time.perf_counter()
        tensors = _shard(pipe, source, range(start, start + count), seed, channels, lh, lw, ts, solver,
                         uncond, cfg_scale, guidance, batch_size, rtol, atol, bar)
        prompts = tensors.pop("prompts")
        write_shard(out / shard_name(k), tensors, prompts)
        entry = {"file": shard_name(k), "start": start, "count": count, "size": [width, height],
                 "seconds": round(time.perf_counter() - t0, 3)}
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda s: s["start"])
        write_manifest(out, manifest)
    bar.close()
    manifest["status"] = "complete"
    write_manifest(out, manifest)
    return manifest


def _shard(pipe, source, indices, seed, channels, lh, lw, ts, solver, uncond, cfg_scale, guidance, batch_size,
           rtol, atol, bar) -> dict:
    picks = [source.pick(seed, i) for i in indices]
    seeds = [seed + i for i in indices]
    unique = list(dict.fromkeys(p for p, _ in picks))
    txt, vec = source.embed(unique, [r for _, r in picks])  # [U, L, D], [U, Dv]
    text_index = torch.tensor([unique.index(p) for p, _ in picks])
    noise = initial_noise(seeds, len(seeds), channels, lh, lw)  # [n, C, lh, lw]
    ends = []
    for s in range(0, len(seeds), batch_size):
        sl = slice(s, s + batch_size)
        idx = text_index[sl]
        cond = (txt[idx].to(pipe.device, pipe.dtype), vec[idx].to(pipe.device, pipe.dtype))
        un = None if uncond is None else tuple(u.to(pipe.device, pipe.dtype).expand(len(idx), *u.shape)
                                               for u in uncond)
        velocity = pipe.velocity_fn(cond, un, lh, lw, guidance, cfg_scale)
        x = pipe.family.pack(noise[sl].to(pipe.device, pipe.dtype))  # [b, C, lh, lw] -> model space
        with torch.inference_mode():
            x = solve_adaptive(velocity, x, 1.0, 0.0, rtol=rtol, atol=atol)[0] if solver == "dopri5" \
                else solve(velocity, x, ts, method=solver)
        if not torch.isfinite(x).all():
            raise RectiflowError("the teacher produced non-finite latents; check the model's weights")
        ends.append(pipe.family.unpack(x, lh, lw).float().cpu())  # model space -> [b, C, lh, lw]
        bar.update(x.shape[0])
    return {"noise": noise, "latents": torch.cat(ends), "txt": txt, "vec": vec, "text_index": text_index,
            "seed": torch.tensor(seeds, dtype=torch.int64),
            "cache_row": torch.tensor([r for _, r in picks], dtype=torch.int64), "prompts": unique}

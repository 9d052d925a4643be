"""Writing a latent cache: `build_cache` precomputes latents and text embeddings once (`LatentCache` in
rectiflow.data.cache_reader reads them); `CachedText` reuses another cache's text table.

Layout of a cache directory:
    manifest.json               what made it (encoders, preprocessing, source), the plan, completed shards
    text-00000.safetensors      {"txt": [U, L, D], "vec": [U, Dv]}: embeddings of unique captions
    latents-00000.safetensors   {"latents": [n, C, h, w]}: one shape per shard (one bucket)

Text embeddings are stored once per unique caption text (class templates and the shapes world's finite
grammar repeat captions a lot); each sample keeps the indices of all its captions per field, so the trainer
can mix fields. Caption index 0 is always the empty caption "" (the unconditional input for CFG dropout).

Latents are `autoencoder.encode(x)` of images in [-1, 1], i.e. already normalised with the autoencoder's
scale and shift factors (FLUX: z = 0.3611 (z - 0.1159), BFL's AutoEncoder.encode).

Resume: the plan (sample order, shard boundaries, unique captions) is a function of the source and the
settings, so a rerun with the same arguments recomputes the same plan, checks it equals the one in
manifest.json, and redoes only shards not recorded as done. Shards are written to a temporary file, fsynced
and renamed into place; the manifest is rewritten the same way after every shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rectiflow.data.sources import Source
from rectiflow.data.transforms import IMAGE_ERRORS, Buckets, CenterCrop, resize_center_crop, to_tensor
from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.io.atomic import write_bytes
from rectiflow.io.safetensors_io import load_tensors, save_safetensors
from rectiflow.models.text import MINILM_POSITIONS
from rectiflow.models.text_base import truncation_warnings

log = logging.getLogger(__name__)

FORMAT = "rectiflow-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"


# ---- encoder identities --------------------------------------------------------------------------------


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the state dict, in sorted name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def autoencoder_identity(ae) -> dict:
    """{"config": the autoencoder's params dataclass, "weights_sha256": hash of its weights}."""
    params = getattr(ae, "params", None) or getattr(ae, "config", None)
    config = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params
    return {"config": _jsonable(config), "weights_sha256": weights_sha256(ae)}


def text_encoder_identity(text_encoder) -> dict:
    return {"spec": _jsonable(text_encoder.spec()), "fingerprint": str(text_encoder.fingerprint())}


def _mismatch(what: str, made: dict, given: dict) -> str | None:
    for key in made:
        if made[key] != given.get(key):
            a, b = str(made[key]), str(given.get(key))
            return f"{what} {key} differs (cache: {a[:60]}, given: {b[:60]})"
    return None


class CachedText:
    """The text embeddings of an earlier cache, served as a text encoder (`rectiflow cache --text-from DIR`).

    Re-encoding the latents of the same captions (another autoencoder or resolution) then needs no text
    encoder: `encode` looks every caption up in DIR's unique-caption table, `spec` / `fingerprint` repeat
    DIR's text encoder identity, so the new cache records the encoder that really made the embeddings. Reads
    only DIR/manifest.json's "text_encoder", "captions" and "text_shards" and the text shards; tensors are
    returned as float32 whatever their stored dtype."""

    def __init__(self, cache_dir) -> None:
        self.path = Path(cache_dir)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise RectiflowError(f"--text-from {self.path}: no {MANIFEST} there; give a directory written "
                                 "by `rectiflow cache`")
        try:
            m = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise FormatError(f"{manifest_path} is not valid JSON") from None
        missing = [k for k in ("text_encoder", "captions", "text_shards") if k not in m]
        if m.get("format") != FORMAT or missing:
            raise FormatError(f"{manifest_path} is not a {FORMAT} manifest with text embeddings "
                              f"(missing: {', '.join(missing) or 'format'})")
        txt, vec = [], []
        for shard in m["text_shards"]:
            f = self.path / shard["file"]
            if not f.is_file():
                raise RectiflowError(f"--text-from {self.path}: text shard {shard['file']} is missing")
            t = load_tensors(f)
            txt.append(t["txt"].float())
            vec.append(t["vec"].float())
        self.txt, self.vec = torch.cat(txt), torch.cat(vec)  # [U, L, D], [U, Dv]
        if len(self.txt) != len(m["captions"]):
            raise FormatError(f"{self.path}: {len(self.txt)} text rows for {len(m['captions'])} captions")
        self.identity = m["text_encoder"]
        self.index = {c: i for i, c in enumerate(m["captions"])}

    def spec(self) -> dict:
        return self.identity["spec"]

    def fingerprint(self) -> str:
        return self.identity["fingerprint"]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise RectiflowError(f"{len(missing)} caption(s) are not in the text table of {self.path} "
                                 f"(first: {missing[0]!r}); cache with --text-encoder instead of --text-from")
        idx = torch.tensor([self.index[c] for c in captions], dtype=torch.long)
        return self.txt[idx], self.vec[idx]


# ---- writing -------------------------------------------------------------------------------------------


class _ManifestWriter:
    """Rewrites manifest.json after every shard. The plan (ids, captions, caption indices, shards: ~100 bytes
    a sample) is serialised once; each write only appends "done" and "status". (Serialising the whole
    manifest per shard made caching quadratic: ~1 s per shard at 100,000 samples.)"""

    def __init__(self, out: Path, manifest: dict):
        self.path = out / MANIFEST
        text = json.dumps({k: v for k, v in manifest.items() if k not in ("done", "status")}, indent=1)
        self.prefix = text[:-2]  # without the closing "\n}"

    def write(self, done, status: str) -> None:
        tail = f',\n "done": {json.dumps(sorted(done))},\n "status": {json.dumps(status)}\n}}'
        write_bytes(self.path, (self.prefix + tail).encode())


def plan_cache(source: Source, resize: CenterCrop | Buckets, shard_size: int, on_error: str = "skip",
               progress: bool = True) -> dict:
    """Sample order, shards (one bucket each) and the unique caption table; reads image headers only."""
    if shard_size < 1:
        raise ConfigError(f"shard size {shard_size}; use a positive number of samples per shard")
    by_bucket: dict[int, list[int]] = {}
    for i in tqdm(range(len(source)), desc="planning", unit="img",
                  disable=not progress or len(source) < 1000):
        try:
            w, h = source.image_size(i)
        except IMAGE_ERRORS as e:
            if on_error == "raise":
                raise FormatError(f"{source[i].location}: unreadable image ({e}); remove it or use "
                                  "--on-error skip") from None
            log.warning("skipping unreadable image %s (%s)", source[i].location, e)
            continue
        b = 0 if isinstance(resize, CenterCrop) else resize.index(w, h)
        by_bucket.setdefault(b, []).append(i)
    shards, order = [], []
    for b in sorted(by_bucket):
        idx = by_bucket[b]
        width, height = resize.target(0, 0) if isinstance(resize, CenterCrop) else resize.buckets[b]
        for s in range(0, len(idx), shard_size):
            chunk = idx[s:s + shard_size]
            shards.append({"file": f"latents-{len(shards):05d}.safetensors", "start": len(order),
                           "count": len(chunk), "size": [width, height]})
            order += chunk
    captions, index = [""], {"": 0}  # unique caption texts; 0 is the empty caption

    def caption_id(c: str) -> int:
        if c not in index:
            index[c] = len(captions)
            captions.append(c)
        return index[c]

    caption_indices = [{fld: [caption_id(c) for c in caps] for fld, caps in source[i].captions.items()}
                       for i in order]
    text_shards = [{"file": f"text-{k // shard_size:05d}.safetensors", "start": k,
                    "count": min(shard_size, len(captions) - k)} for k in range(0, len(captions), shard_size)]
    return {"order": order, "ids": [source[i].id for i in order], "shards": shards, "captions": captions,
            "caption_indices": caption_indices, "text_shards": text_shards}


def _load_image(source: Source, i: int, width: int, height: int) -> torch.Tensor:
    try:
        img = source.load_image(i)
    except IMAGE_ERRORS as e:
        raise FormatError(f"{source[i].location}: unreadable image ({e}); run `rectiflow data check "
                          "--write-manifest` and cache the manifest") from None
    return to_tensor(resize_center_crop(img, width, height))  # [3, height, width] in [-1, 1]


@torch.no_grad()
def build_cache(source: Source, autoencoder, text_encoder, out, *, size: int | None = None,
                buckets: Buckets | None = None, batch_size: int = 8, shard_size: int = 1024,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                storage_dtype: torch.dtype | None = None, on_error: str = "skip",
                progress: bool = True) -> Path:
    """Encode every sample of `source` once into `out` (resuming a previous run with the same settings).

    `autoencoder` and `text_encoder` are built objects on `device` (images go in as `dtype`); stored tensors
    get `storage_dtype` (default: what the encoders return)."""
    if (size is None) == (buckets is None):
        raise ConfigError("give exactly one of size (centre crop) or buckets")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}; use a positive integer")
    resize = CenterCrop(size) if size is not None else buckets
    out = Path(out)
    plan = plan_cache(source, resize, shard_size, on_error, progress)
    if not plan["order"]:
        raise FormatError(f"no readable samples in {source.describe()}; see `rectiflow data check`")
    fields = sorted({f for s in source.samples for f in s.captions})
    manifest = {
        "format": FORMAT, "version": VERSION,
        "autoencoder": autoencoder_identity(autoencoder), "text_encoder": text_encoder_identity(text_encoder),
        "preprocessing": {**resize.describe(), "caption_fields": fields, "image_dtype": str(dtype)},
        "source": _jsonable(source.describe()), "num_samples": len(plan["order"]),
        **{k: plan[k] for k in ("ids", "captions", "caption_indices", "shards", "text_shards")},
    }
    done = _resume_state(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ManifestWriter(out, manifest)
    writer.write(done, "in_progress")
    total = len(manifest["text_shards"]) + len(manifest["shards"])
    todo_text = [s for s in manifest["text_shards"] if s["file"] not in done]
    note = truncation_note(text_encoder, [c for s in todo_text
                                          for c in plan["captions"][s["start"]:s["start"] + s["count"]]])
    if note:
        log.warning("%s", note)
    with tqdm(total=total, initial=len(done), desc="caching", unit="shard", disable=not progress) as bar:
        for shard in todo_text:
            caps = plan["captions"][shard["start"]:shard["start"] + shard["count"]]
            with truncation_warnings(note is None):  # said once above, with the total
                _encode_text_shard(text_encoder, caps, out / shard["file"], batch_size, storage_dtype)
            _mark_done(writer, done, shard["file"], bar)
        for shard in manifest["shards"]:
            if shard["file"] not in done:
                idx = plan["order"][shard["start"]:shard["start"] + shard["count"]]
                _encode_latent_shard(source, autoencoder, idx, shard["size"], out / shard["file"], batch_size,
                                     device, dtype, storage_dtype)
                _mark_done(writer, done, shard["file"], bar)
    writer.write(done, "complete")
    log.info("cached %d samples (%d unique captions) in %s", manifest["num_samples"], len(plan["captions"]),
             out)
    return out


def truncation_note(text_encoder, captions: list[str]) -> str | None:
    """One warning for all `captions` the encoder will truncate (None if none, or if it cannot count)."""
    count, limit = getattr(text_encoder, "count_tokens", None), getattr(text_encoder, "max_length", None)
    if count is None or limit is None or not captions:
        return None
    needed = [count(c) for c in captions]
    over = [n for n in needed if n > limit]
    if not over:
        return None
    spec = text_encoder.spec() if hasattr(text_encoder, "spec") else {}
    longest = max(over)
    minilm = spec.get("kind") == "minilm" and longest <= MINILM_POSITIONS
    fix = f"cache with --text-encoder minilm:{longest} to read them whole" if minilm else "shorten them"
    return (f"{len(over)} of {len(captions)} unique captions are longer than the text encoder's {limit} "
            f"tokens and are truncated, dropping {sum(n - limit for n in over)} tokens in all (longest needs "
            f"{max(over)}); {fix}")


def _resume_state(out: Path, manifest: dict) -> set[str]:
    """Shards already done by a previous run with the same plan; refuses a directory made otherwise."""
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise RectiflowError(f"{out} exists and is not a latent cache; choose an empty or new --out")
        return set()
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FormatError(f"{path} is not valid JSON; delete {out} and cache again") from None
    diffs = [k for k in manifest if k not in ("done", "status") and old.get(k) != manifest[k]]
    if diffs:
        raise RectiflowError(f"{out} holds a cache made with other settings ({', '.join(diffs)} differ); "
                             "use another --out or delete it")
    done = {f for f in old.get("done", []) if (out / f).is_file()}
    if done:
        log.info("resuming cache in %s: %d shards already done", out, len(done))
    return done


def _mark_done(writer: _ManifestWriter, done: set, file: str, bar) -> None:
    done.add(file)
    writer.write(done, "in_progress")
    bar.update(1)


def _cast(t: torch.Tensor, storage_dtype) -> torch.Tensor:
    return t.detach().to("cpu", storage_dtype or t.dtype)


def _encode_text_shard(text_encoder, captions: list[str], path: Path, batch_size: int, storage_dtype) -> None:
    txts, vecs = [], []
    for s in range(0, len(captions), batch_size):
        txt, vec = text_encoder.encode(captions[s:s + batch_size])  # [b, L, D], [b, Dv]
        txts.append(_cast(txt, storage_dtype))
        vecs.append(_cast(vec, storage_dtype))
    lengths = {t.shape[1] for t in txts}
    if len(lengths) > 1:
        raise RectiflowError(f"text encoder returned sequence lengths {sorted(lengths)} for different "
                             "batches; it must pad to a fixed length to be cached")
    save_safetensors({"txt": torch.cat(txts), "vec": torch.cat(vecs)}, path)


def _encode_latent_shard(source, autoencoder, indices, size, path, batch_size, device, dtype,
                         storage_dtype) -> None:
    width, height = size
    lats = []
    for s in range(0, len(indices), batch_size):
        batch = indices[s:s + batch_size]
        x = torch.stack([_load_image(source, i, width, height) for i in batch])  # [b, 3, H, W]
        z = autoencoder.encode(x.to(device, dtype))  # [b, C, H/8, W/8]
        lats.append(_cast(z, storage_dtype))
    save_safetensors({"latents": torch.cat(lats)}, path)

"""The project's one safetensors stack: validated before use, read tensor by tensor, written atomically.

Every safetensors file rectiflow reads or writes (model weights, bundles, checkpoints, latent caches) goes
through here. Public API:

- `refuse_pickle(path)`: raise `FormatError` if `path` is a pickle / torch zip checkpoint, judged from its
  suffix and its first bytes only. Nothing is ever unpickled.
- `read_header(path) -> SafetensorsHeader`: parse and validate a safetensors header without reading any
  tensor data: dtypes, shapes vs byte sizes, offsets contiguous, and the file long enough (truncation).
- `read_metadata(path) -> dict[str, str]`: the `__metadata__` of a safetensors file.
- `read_diffusers_weights(folder, name) -> (dict[str, TensorInfo], list[Path])`: the tensors of a diffusers
  model folder (`<name>.safetensors` or sharded `<name>-0000i-of-0000n.safetensors` + `<name>.safetensors.
  index.json`), again from headers only.
- `iter_tensors(infos, device, dtype)` / `load_tensors(...)`: read tensors one at a time straight into their
  own buffer (one `readinto` per tensor, no second copy of the file in memory), converting floating-point
  tensors to `dtype` per tensor.
- `save_safetensors(tensors, path, metadata)`: stream tensors to a temporary file in the destination
  directory, fsync, rename into place (rectiflow.io.atomic; an interrupted save leaves the previous file).
- `save_sharded(tensors, folder, name, max_shard_bytes, metadata)`: the diffusers layout, with index.
- `state_dict_mismatch(expected, found) -> Mismatch`: readable missing / unexpected / mis-shaped report.

Why our own reader rather than `safetensors.safe_open`: we must validate the header (truncation, offsets)
before loading anyway, and reading each tensor with `readinto` keeps peak memory at one copy of the weights
whatever the target dtype or device. `safe_open` maps the whole file, so every page it touches stays resident
next to the converted copy until the handle and every tensor from it are gone; on safetensors < 0.6
`get_tensor` also copies. The file format itself is the published one (8-byte little-endian header length,
JSON header, raw little-endian data), and the tests cross-check both directions against the safetensors
library.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rectiflow.errors import FormatError
from rectiflow.io.atomic import atomic_write

log = logging.getLogger(__name__)

# safetensors dtype strings (https://github.com/huggingface/safetensors, "Format" in the README).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# The safetensors library refuses headers above 100 MB (safetensors/src/tensor.rs, MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype string, shape and absolute byte range [start, end)."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ----------------------------------------------------------------------------------------------- refusal


def sniff(path: str | os.PathLike) -> str:
    """What the first bytes of a file say it is: 'safetensors', 'zip', 'pickle', 'gguf' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":  # torch.save since 1.6 writes a zip archive holding a pickle
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode, protocols 2-5
        return "pickle"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    return "unknown"


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise FormatError if `path` is a pickle-based checkpoint. Reads at most 16 bytes; never unpickles."""
    p = Path(path)
    kind = sniff(p) if p.is_file() else "unknown"
    if p.suffix.lower() in PICKLE_SUFFIXES or kind in ("zip", "pickle"):
        raise FormatError(
            f"{p} is a pickle checkpoint ({p.suffix or kind}); rectiflow never unpickles files because that "
            "can run arbitrary code: convert it to .safetensors with a tool you trust (e.g. "
            "safetensors.torch.save_file) and pass that file"
        )
    if kind == "gguf":
        raise FormatError(f"{p} is a GGUF (quantized) file, which rectiflow cannot read: "
                          "pass a .safetensors file")


# ----------------------------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; reads no tensor data."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p} does not exist: check the path")
    if p.is_dir():
        raise FormatError(f"{p} is a directory, expected a .safetensors file")
    refuse_pickle(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{p} is not a safetensors file ({size} bytes, too short): "
                              "pass a .safetensors file")
        (n,) = struct.unpack("<Q", raw)  # header length, u64 little-endian
        if n > MAX_HEADER_BYTES or n < 2:
            raise FormatError(f"{p} is not a safetensors file (header length {n}): pass a .safetensors file")
        if 8 + n > size:
            raise FormatError(f"{p} is truncated: header needs {8 + n} bytes, file has {size}; "
                              "re-download it")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{p} is not a safetensors file (bad JSON header: {e}); "
                          "pass a .safetensors file") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(p, name, entry, data_start)
    _check_layout(p, tensors, data_start, size)
    return SafetensorsHeader(p, tensors, {str(k): str(v) for k, v in metadata.items()})


def _tensor_info(p: Path, name: str, entry, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (s, e) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{p}: malformed header entry for {name!r}; the file is corrupt") from err
    if dtype not in _DTYPES:
        raise FormatError(f"{p}: tensor {name!r} has dtype {dtype}, which rectiflow cannot load")
    itemsize = _DTYPES[dtype].itemsize
    if e - s != math.prod(shape) * itemsize or s < 0:
        raise FormatError(f"{p}: tensor {name!r} byte range {s}..{e} does not match shape {list(shape)} "
                          f"of {dtype}; the file is corrupt")
    return TensorInfo(p, name, dtype, shape, data_start + s, data_start + e)


def _check_layout(p: Path, tensors: Mapping[str, TensorInfo], data_start: int, size: int) -> None:
    """The data buffer must be covered exactly once, in order, and must fit in the file."""
    pos = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            raise FormatError(f"{p}: tensor {t.name!r} starts at byte {t.start}, expected {pos} (overlap or "
                              "gap in the data offsets); the file is corrupt")
        pos = t.end
    if pos > size:
        raise FormatError(f"{p} is truncated: its header describes {pos} bytes but the file has {size} "
                          f"({pos - size} missing); re-download or re-save it")
    if pos < size:
        log.warning("%s has %d trailing bytes after the tensor data; ignoring them", p, size - pos)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path).metadata


def read_diffusers_weights(folder: str | os.PathLike, name: str = "diffusion_pytorch_model"
                           ) -> tuple[dict[str, TensorInfo], list[Path]]:
    """Tensors of a diffusers model folder, single-file or sharded with `<name>.safetensors.index.json`."""
    d = Path(folder)
    index = d / f"{name}.safetensors.index.json"
    single = d / f"{name}.safetensors"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{index} is not a valid shard index (no weight_map); "
                              "re-save the folder") from e
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FormatError(f"{index} lists shard {f.name}, which is missing from {d}; re-download it")
    elif single.is_file():
        weight_map, files = {}, [single]
    else:
        variants = sorted(d.glob(f"{name}.*.safetensors"))  # e.g. diffusion_pytorch_model.fp16.safetensors
        pickles = [f for f in d.glob(f"{name}*") if f.suffix in PICKLE_SUFFIXES]
        if len(variants) == 1:
            weight_map, files = {}, variants
        elif pickles:
            refuse_pickle(pickles[0])
            raise AssertionError("unreachable")
        else:
            raise FormatError(f"{d} has no {single.name} (nor a shard index): not a diffusers model folder")
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for k, info in read_header(f).tensors.items():
            if k in infos:
                raise FormatError(f"{d}: tensor {k!r} appears in two shards; the folder is corrupt")
            if weight_map and weight_map.get(k) != f.name:
                raise FormatError(f"{index}: tensor {k!r} is in {f.name} but the index says "
                                  f"{weight_map.get(k)}; re-save the folder")
            infos[k] = info
    missing = set(weight_map) - set(infos)
    if missing:
        raise FormatError(f"{index} lists {len(missing)} tensors absent from the shards (e.g. "
                          f"{sorted(missing)[0]}); re-download the folder")
    return infos, files


def iter_tensors(infos: Iterable[TensorInfo], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, in file order, each read directly into its own CPU buffer.

    Floating-point tensors are converted to `dtype` (when given) and moved to `device` one by one, so peak
    memory is the result plus one tensor in flight.
    """
    by_file: dict[Path, list[TensorInfo]] = {}
    for t in infos:
        by_file.setdefault(t.path, []).append(t)
    for path, items in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for t in sorted(items, key=lambda t: t.start):
                buf = torch.empty(t.nbytes, dtype=torch.uint8)
                f.seek(t.start)
                got = f.readinto(memoryview(buf.numpy())) if t.nbytes else 0
                if got != t.nbytes:
                    raise FormatError(f"{path} is truncated inside tensor {t.name!r}; re-download it")
                x = buf.view(t.torch_dtype).reshape(t.shape)  # (nbytes,) uint8 -> shape, file dtype
                if dtype is not None and x.is_floating_point() and x.dtype != dtype:
                    x = x.to(dtype)
                yield t.name, x.to(device)


def load_tensors(infos: Iterable[TensorInfo] | str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a file (path) or of the given TensorInfos, as a dict."""
    if isinstance(infos, (str, os.PathLike)):
        infos = read_header(infos).tensors.values()
    return dict(iter_tensors(infos, device, dtype))


# ----------------------------------------------------------------------------------------------- writing


def _write_safetensors(f, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    # Same order as the safetensors library: larger items first (keeps every tensor aligned), then by name.
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for k in names:
        t = tensors[k]
        if t.dtype not in _NAMES:
            raise FormatError(f"cannot save tensor {k!r} of dtype {t.dtype} to safetensors")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # pad so the data starts 8-byte aligned (the format allows spaces)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for k in names:
        t = tensors[k].detach()
        if t.device.type == "meta":
            raise FormatError(f"cannot save tensor {k!r}: it is on the meta device (no data); "
                              "load weights first")
        flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,) raw bytes
        if flat.numel():
            f.write(memoryview(flat.numpy()))


def check_save_path(path: Path, format: str, folder: bool) -> None:
    """Refuse a destination of the wrong kind: `format` writes a folder (folder=True, e.g. diffusers) or one
    file; FormatError in one line naming what to pass."""
    if not folder and path.is_dir():
        raise FormatError(f"{path} is a directory; the {format} format is one file: pass a path ending in "
                          ".safetensors")
    if folder and path.is_file():
        raise FormatError(f"{path} is a file; the {format} format is a folder: pass a directory path")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically (temp file in the same dir, fsync, rename). Streams per tensor."""
    p = Path(path)
    with atomic_write(p) as tmp, open(tmp, "wb") as f:
        _write_safetensors(f, tensors, metadata)
    return p


def save_sharded(tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike,
                 name: str = "diffusion_pytorch_model", max_shard_bytes: int = 10 * 2**30,
                 metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write the diffusers weight layout into an existing folder: one file, or shards plus an index.

    Shard names follow diffusers / transformers: `<name>-00001-of-00003.safetensors` and
    `<name>.safetensors.index.json` with {"metadata": {"total_size": ...}, "weight_map": {key: file}}.
    """
    d = Path(folder)
    groups: list[list[str]] = [[]]
    size = 0
    for k in tensors:
        n = tensors[k].numel() * tensors[k].element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    if len(groups) == 1:
        return [save_safetensors(tensors, d / f"{name}.safetensors", metadata)]
    files, weight_map = [], {}
    for i, keys in enumerate(groups):
        fname = f"{name}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        files.append(save_safetensors({k: tensors[k] for k in keys}, d / fname, metadata))
        weight_map.update(dict.fromkeys(keys, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with atomic_write(d / f"{name}.safetensors.index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return files


# ----------------------------------------------------------------------------------------------- strictness


@dataclass(frozen=True)
class Mismatch:
    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, expected shape, found shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def summary(self, n: int = 3) -> str:
        def few(xs: list) -> str:
            more = f", ... (+{len(xs) - n})" if len(xs) > n else ""
            return ", ".join(map(str, xs[:n])) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({few(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({few(self.unexpected)})")
        if self.misshaped:
            shaped = [f"{k} {list(f)} vs expected {list(e)}" for k, e, f in self.misshaped]
            parts.append(f"{len(self.misshaped)} mis-shaped ({few(shaped)})")
        return "; ".join(parts)


def state_dict_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
                        ) -> Mismatch:
    """Compare key -> shape maps (e.g. a model's state dict on `meta` vs a file's header)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [(k, tuple(expected[k]), tuple(found[k])) for k in expected
                 if k in found and tuple(expected[k]) != tuple(found[k])]
    return Mismatch(missing, unexpected, misshaped)

"""`rectiflow convert SRC DST --to bfl|stability|diffusers|rectiflow`: FLUX and SD3 transformer checkpoints
between formats.

Reads anything `load_transformer` reads (BFL / Stability / ComfyUI single files, diffusers folders, rectiflow
files),
checks it strictly against its config, and writes the requested format atomically. Conversions are exact
(bit-identical tensors) unless --dtype asks for a cast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from rectiflow.errors import ConfigError, RectiflowError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Decimal and binary units as huggingface_hub's parse_size_to_int reads them ("10GB" = 10 * 10**9 bytes).
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a FLUX or SD3 transformer checkpoint between single-file, diffusers and rectiflow "
        "formats",
        description="Convert a FLUX or SD3 / SD3.5 transformer checkpoint (BFL / Stability / ComfyUI "
        ".safetensors, diffusers folder or rectiflow file) to another format. Pickle checkpoints "
        "(.ckpt/.pt/.bin) are refused.",
    )
    p.add_argument("src", help="source: .safetensors file, diffusers transformer/ folder or pipeline folder")
    p.add_argument("dst", help="destination: a .safetensors file (bfl, stability, rectiflow) or a folder "
                   "(diffusers)")
    p.add_argument("--to", required=True, choices=["bfl", "stability", "diffusers", "rectiflow"],
                   help="output format (bfl: FLUX single file; stability: SD3 / SD3.5 single file)")
    p.add_argument("--config", default=None,
                   help="preset name or JSON file of FluxParams / SD3Params fields (default: from the file / "
                   "shapes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast floating-point weights (default: keep the stored dtype)")
    p.add_argument("--max-shard-size", default=None,
                   help="diffusers only: largest shard, e.g. 5GB or 500MB (default 10GB, as diffusers)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r} is not a size: use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def _config(value: str | None):
    if value is None or not value.endswith(".json"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--config {value}: no such file; pass a preset name or a JSON file of FluxParams")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"--config {value} is not valid JSON ({e})") from e


def _size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def run(args: argparse.Namespace) -> int:
    import torch

    from rectiflow.convert.transformer import (
        DEFAULT_MAX_SHARD_BYTES,
        describe_params,
        inspect_transformer,
        load_transformer,
        save_transformer,
    )

    if args.max_shard_size is not None and args.to != "diffusers":
        raise RectiflowError(f"--max-shard-size applies to --to diffusers only, not --to {args.to}")
    shard = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_MAX_SHARD_BYTES
    src, dst = Path(args.src), Path(args.dst)
    t0 = time.perf_counter()
    source = inspect_transformer(src)
    print(f"reading {source.path} ({source.format}, {len(source.tensors)} tensors, "
          f"{_human(source.nbytes)})", file=sys.stderr)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = load_transformer(src, config=_config(args.config), dtype=dtype)
    print(f"writing {dst} ({args.to})", file=sys.stderr)
    save_transformer(model, dst, format=args.to, max_shard_bytes=shard)
    params = model.params
    n = sum(p.numel() for p in model.parameters())
    dtypes = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
    print(f"converted {src} ({source.format}) -> {dst} ({args.to}): "
          f"{describe_params(params)}, {n / 1e6:.1f}M parameters, {dtypes}, "
          f"{_human(_size_of(dst))}, {time.perf_counter() - t0:.1f} s")
    return 0

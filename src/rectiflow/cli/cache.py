"""`rectiflow cache`: encode a dataset's latents and caption embeddings once, into sharded safetensors."""

from __future__ import annotations

from pathlib import Path

from rectiflow.cli.data import add_source_arguments, open_source_from_args

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="precompute autoencoder latents and text embeddings of a dataset")
    p.add_argument("--data", required=True,
                   help="dataset folder, .tar shards folder or the manifest .jsonl of `rectiflow data check`")
    add_source_arguments(p)
    p.add_argument("--autoencoder", required=True,
                   help="autoencoder weights (.safetensors file or folder) or a preset name (random weights)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text-encoder", help="text encoder name (minilm, minilm:N, trainable) or a spec "
                                             ".json (FLUX's T5 + CLIP)")
    text.add_argument("--text-from", metavar="CACHE",
                      help="reuse the caption embeddings of an earlier cache (same captions; e.g. new "
                           "latents at another size) instead of running a text encoder")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--size", type=int, help="resize + centre-crop to SIZE x SIZE (a multiple of 16)")
    size.add_argument("--buckets", type=int, metavar="SIZE",
                      help="aspect-ratio buckets of about SIZE x SIZE pixels instead of a centre crop")
    p.add_argument("--out", required=True,
                   help="cache directory (resumes a cache made with the same arguments)")
    p.add_argument("--batch-size", type=int, default=8, help="images / captions per encoder call (default 8)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="samples (and unique captions) per shard (default 1024)")
    p.add_argument("--device", default="cpu", help="device the encoders run on (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype the encoders run in (default float32)")
    p.add_argument("--storage-dtype", choices=DTYPES,
                   help="dtype of the stored tensors (default: as computed)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="what to do with unreadable images and samples without captions (default skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_autoencoder_arg(autoencoder: str, device, dtype):
    """An autoencoder from a path (weights) or a preset name (random weights), in eval mode."""
    from rectiflow.convert.autoencoder import build_autoencoder, load_autoencoder

    if Path(autoencoder).exists():
        return load_autoencoder(autoencoder, device=device, dtype=dtype).eval()
    return build_autoencoder(autoencoder, device=device, dtype=dtype).eval()


def load_encoders(autoencoder: str, text_encoder: str, device, dtype):
    """(autoencoder, text encoder) from CLI-style names: a path or a preset; a name or a spec file."""
    import json

    from rectiflow.models.text import load_text_encoder

    ae = load_autoencoder_arg(autoencoder, device, dtype)
    spec = text_encoder
    if text_encoder.endswith(".json") and Path(text_encoder).is_file():
        spec = json.loads(Path(text_encoder).read_text())
    return ae, load_text_encoder(spec, device=device, dtype=dtype)


def run(args) -> int:
    import torch

    from rectiflow.data.cache_writer import build_cache
    from rectiflow.data.transforms import Buckets

    source = open_source_from_args(args, on_error=args.on_error)
    dtype = getattr(torch, args.dtype)
    if args.text_from:
        from rectiflow.data.cache_writer import CachedText

        text_encoder = CachedText(args.text_from)
        ae = load_autoencoder_arg(args.autoencoder, torch.device(args.device), dtype)
    else:
        ae, text_encoder = load_encoders(args.autoencoder, args.text_encoder, torch.device(args.device),
                                         dtype)
    out = build_cache(
        source, ae, text_encoder, args.out, size=args.size,
        buckets=Buckets.for_size(args.buckets) if args.buckets else None,
        batch_size=args.batch_size, shard_size=args.shard_size, device=torch.device(args.device), dtype=dtype,
        storage_dtype=getattr(torch, args.storage_dtype) if args.storage_dtype else None,
        on_error=args.on_error, progress=not args.no_progress,
    )
    print(f"cache written to {out}")
    return 0

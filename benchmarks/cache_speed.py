"""`rectiflow cache`: the per-shard manifest rewrite, whole manifest (before) vs the cached plan (now).

    python benchmarks/cache_speed.py [--samples 100000] [--shard-size 1024] [--runs 7]

build_cache rewrites manifest.json after every shard so an interrupted build resumes. The manifest holds the
plan (ids, per-sample caption indices, shards: ~100 bytes a sample), so serialising all of it per shard made
a build quadratic in the dataset size (caching 100,000 images took 177 s on a GPU machine). This
times one rewrite both ways on a synthetic manifest shaped like the shapes world's (two caption fields, ~1500
unique captions), interleaved, and prints what that costs over all shards of such a build.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import interleaved_medians, print_machine_info
from rectiflow.data.cache_writer import MANIFEST, _ManifestWriter
from rectiflow.io.atomic import write_bytes


def synthetic_manifest(n: int, shard_size: int) -> dict:
    shards = [{"file": f"latents-{k:05d}.safetensors", "start": s, "count": min(shard_size, n - s),
               "size": [128, 128]} for k, s in enumerate(range(0, n, shard_size))]
    return {
        "format": "rectiflow-latent-cache", "version": 1, "num_samples": n,
        "ids": [f"{i:06d}" for i in range(n)],
        "captions": [""] + [f"a photo of caption number {k}" for k in range(1500)],
        "caption_indices": [{"text": [1 + i % 1500], "captions": [1 + i % 1500, 1 + (7 * i) % 1500]}
                            for i in range(n)],
        "shards": shards, "text_shards": [{"file": "text-00000.safetensors", "start": 0, "count": 1501}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    print_machine_info()
    m = synthetic_manifest(args.samples, args.shard_size)
    files = [s["file"] for s in m["shards"]]
    done = set(files[: len(files) // 2])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        writer = _ManifestWriter(out, m)

        def before():  # what build_cache used to do per shard: serialise the whole manifest
            full = {**m, "done": sorted(done), "status": "in_progress"}
            write_bytes(out / MANIFEST, json.dumps(full, indent=1).encode())

        med = interleaved_medians({"before": before, "now": lambda: writer.write(done, "in_progress")},
                                  runs=args.runs, warmup=1)
        size = (out / MANIFEST).stat().st_size
    n_shards = len(files) + 1
    print(f"{args.samples} samples, {n_shards} shards, manifest {size / 1e6:.1f} MB: one rewrite "
          f"{med['before'] * 1e3:.0f} ms before, {med['now'] * 1e3:.1f} ms now "
          f"({med['before'] / med['now']:.0f}x); "
          f"over the build {med['before'] * n_shards:.0f} s before, {med['now'] * n_shards:.1f} s now")


if __name__ == "__main__":
    main()

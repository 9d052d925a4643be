"""`rectiflow cache` image reading: decoding threads (--workers N) vs the single-threaded build.

    python benchmarks/cache_speed.py [--n 1024] [--size 128] [--workers 2] [--runs 7]

Writes N shapes-world PNGs to a temporary imagefolder, then builds a cache of them with a cheap stand-in
encoder (8x8 mean pooling, so the number is the reading/decoding path that dominated a GPU run, where the
autoencoder itself is fast), once with workers=0 and once with --workers, interleaved; prints the medians and
the ratio, and checks the two caches are identical.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import interleaved_medians, print_machine_info
from rectiflow.data.cache import build_cache
from rectiflow.data.shapes import write_imagefolder
from rectiflow.data.sources import open_source


class MeanPool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.params = {"kind": "mean-pool-benchmark"}
        self.w = torch.nn.Parameter(torch.ones(16, 3) / 3, requires_grad=False)

    @torch.no_grad()
    def encode(self, x):
        return torch.einsum("oc,bchw->bohw", self.w, torch.nn.functional.avg_pool2d(x, 8))


class Table:
    def encode(self, prompts):
        return torch.zeros(len(prompts), 4, 8), torch.zeros(len(prompts), 8)

    def spec(self):
        return {"kind": "zeros"}

    def fingerprint(self):
        return "zeros"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    print_machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="rectiflow-cache-bench-"))
    try:
        write_imagefolder(tmp / "data", args.n, args.size, seed=0, workers=1, progress=False)
        src = open_source(tmp / "data", caption_columns=["text"])
        outs = {}

        def build(workers: int):
            out = tmp / f"cache-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            build_cache(src, MeanPool(), Table(), out, size=args.size, batch_size=64, shard_size=256,
                        workers=workers)
            outs[workers] = out

        med = interleaved_medians({"serial": lambda: build(0), "threads": lambda: build(args.workers)},
                                  runs=args.runs, warmup=1)
        a, b = outs[0], outs[args.workers]
        same = all(torch.equal(load_file(str(f))["latents"], load_file(str(b / f.name))["latents"])
                   for f in sorted(a.glob("latents-*.safetensors")))
        print(f"{args.n} images at {args.size} px: serial {med['serial']:.2f} s "
              f"({args.n / med['serial']:.0f} img/s), {args.workers} threads {med['threads']:.2f} s "
              f"({args.n / med['threads']:.0f} img/s): {med['serial'] / med['threads']:.2f}x; "
              f"identical: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

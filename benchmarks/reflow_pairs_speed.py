"""`rectiflow reflow pairs` speed: couplings per second against the same model's `generate` in one process.

    python benchmarks/reflow_pairs_speed.py [--model PATH] [--n 64] [--steps 8] [--cfg 1] [--runs 7]

--cfg: classifier-free guidance scale of both sides (> 1: two forwards per step, the pairs of an undistilled
teacher).
--model: a bundle directory (default: the bundled default model). Both sides draw n samples of the same
prompts with the same solver and step count on the CPU in float32, interleaved (pairs, generate, pairs, ...),
median of --runs (>= 7) after warm-up:
  pairs      make_couplings(n) into a fresh directory: noise, the teacher's ODE, shards + manifest written;
  generate   Pipeline.generate(n images, batch n): noise, the same ODE, then decoding to PIL images.
The ratio says what writing pairs costs relative to sampling images (no decoder, but safetensors output).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import interleaved_medians, parse_model_bench_args  # noqa: E402
from rectiflow.sample import Pipeline  # noqa: E402
from rectiflow.sample.couplings import PromptSource, make_couplings  # noqa: E402

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue star left of a cross"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=7)
    args, model = parse_model_bench_args(ap)
    pipe = Pipeline.from_bundle(model, "cpu", torch.float32)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    source = PromptSource.from_file(tmp / "prompts.txt", pipe.text_encoder)
    prompts = [source.pick(0, i)[0] for i in range(args.n)]

    def pairs():
        shutil.rmtree(tmp / "pairs", ignore_errors=True)
        make_couplings(pipe, source, tmp / "pairs", args.n, steps=args.steps, batch_size=args.n,
                       shard_size=args.n, cfg_scale=args.cfg, progress=False)

    def generate():
        pipe(prompts, steps=args.steps, seed=0, batch_size=args.n, cfg_scale=args.cfg, progress=False)

    t = interleaved_medians({"pairs": pairs, "generate": generate}, runs=args.runs)
    d = pipe.defaults
    print(f"\n{args.n} samples, {d.width}x{d.height}, Euler {args.steps} steps, CFG {args.cfg:g}, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"  reflow pairs: {t['pairs']:.2f} s ({args.n / t['pairs']:.1f} pairs/s)")
    print(f"  generate:     {t['generate']:.2f} s ({args.n / t['generate']:.1f} images/s)")
    print(f"  pairs / generate throughput: {t['generate'] / t['pairs']:.2f}x")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

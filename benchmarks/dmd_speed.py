"""`rectiflow tune dmd` speed: what DMD2's GAN term adds to an iteration, against DMD alone in one process.

    python benchmarks/dmd_speed.py [--model PATH] [--iterations 2] [--batch 32] [--fake-updates 5] [--runs 7]

--model: a bundle directory (default: the bundled default model), loaded twice: as the generator (one Euler
step) and as the teacher (CFG 3). Both sides run `dmd()` for --iterations iterations into a fresh directory,
interleaved (plain, gan, plain, ...), median of --runs (>= 7) after warm-up:
  plain   DMD: per iteration --fake-updates fake-model updates and one generator update;
  gan     the same with --real (a cache of 64 flat-colour images made here with the bundle's encoders) and
          --gan 0.2: each fake update also runs the fake model on a batch of noised real latents for the
          classifier, and the generator update runs the frozen fake model once more for its GAN loss.
Each call also copies the teacher into the fake model and writes the bundle, the same on both sides.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import interleaved_medians, parse_model_bench_args  # noqa: E402
from rectiflow.data.cache_writer import build_cache  # noqa: E402
from rectiflow.data.sources import ArraySource  # noqa: E402
from rectiflow.sample import Pipeline  # noqa: E402
from rectiflow.tune.dmd import DMDOptions, dmd  # noqa: E402
from rectiflow.tune.prompts import shapes_pool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fake-updates", type=int, default=5)
    ap.add_argument("--runs", type=int, default=7)
    args, model = parse_model_bench_args(ap)
    generator, teacher = (Pipeline.from_bundle(model, "cpu", torch.float32) for _ in range(2))
    tmp = Path(tempfile.mkdtemp())
    size = generator.defaults.width

    def flat(i):
        rgb = np.random.default_rng([5, i]).integers(0, 256, 3)
        return np.full((size, size, 3), rgb, np.uint8), {"caption": ["a photo of a shape"]}, f"r{i}"

    real = build_cache(ArraySource(64, flat, name="flat"), teacher.autoencoder, teacher.text_encoder,
                       tmp / "real", size=size, batch_size=32, shard_size=64, progress=False)
    pool = shapes_pool()
    base = dict(iterations=args.iterations, batch=args.batch, steps=1, fake_updates=args.fake_updates,
                checkpoint_every=10**6)

    def run(name, **kw):
        def go():
            shutil.rmtree(tmp / name, ignore_errors=True)
            dmd(generator, teacher, pool, tmp / name, DMDOptions(**base, **kw.get("opt", {})),
                real=kw.get("real"), progress=False)
        return go

    t = interleaved_medians({"plain": run("plain"), "gan": run("gan", opt={"gan": 0.2}, real=real)},
                            runs=args.runs, warmup=1)
    print(f"\n{args.iterations} iterations of batch {args.batch}, {args.fake_updates} fake updates each, "
          f"one-step generator, teacher CFG 3, fp32, {torch.get_num_threads()} threads")
    for k in ("plain", "gan"):
        print(f"  {k:>5}: {t[k]:.2f} s ({t[k] / args.iterations:.2f} s per iteration)")
    print(f"  gan / plain time: {t['gan'] / t['plain']:.2f}x")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

"""`rectiflow generate` speed: cold wall time of the command (subprocess) and warm per-image time.

    python benchmarks/generate_speed.py [--model PATH] [--preset tiny] [--size 256] [--steps 4] [--runs 7]
                                        [--cold-runs 3] [--baseline-src OTHER/src]

--model: a bundle directory; default: the bundled default model when it exists, else a bundle with random
weights (--preset transformer, autoencoder "tiny", text encoder "minilm"; speed is what matters here).

Cold: `python -m rectiflow generate PROMPT --model M ...` in a fresh subprocess, wall time from spawn to exit
(interpreter start, imports, model load, text encoding, sampling, decoding, PNG write); median of --cold-runs.
Warm: the pipeline loaded once in this process, then one image per call; median of --runs (>= 7) after
warm-up. Both on the CPU in float32 (add --int8 to measure the int8 transformer).
Cold runs also report the child's CPU time (user + sys), which a busy shared machine inflates less than the
wall time. --baseline-src: the `src` folder of another version of rectiflow (e.g. `git archive main src`),
whose cold command runs interleaved with this one's (A, B, A, B, ...) for a ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import interleaved_medians, print_machine_info  # noqa: E402
from rectiflow.convert.bundle import CARD_FILE, SamplingDefaults, default_bundle_path  # noqa: E402
from rectiflow.sample import Pipeline, random_bundle  # noqa: E402

PROMPT = "a photo of a red circle above a blue square"
SRC = Path(__file__).resolve().parents[1] / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--baseline-src", help="another version's src folder, timed interleaved with this one")
    args = ap.parse_args()
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7)")
    print_machine_info()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None and (default_bundle_path() / CARD_FILE).is_file():
        model = str(default_bundle_path())
    if model is None:
        model = str(random_bundle(Path(tmp.name) / "random", transformer=args.preset,
                                  defaults=SamplingDefaults(steps=args.steps, width=args.size,
                                                            height=args.size)))
        print(f"{'model':>26}: random weights, transformer preset {args.preset!r}")
    else:
        print(f"{'model':>26}: {model}")
    opts = ["--steps", str(args.steps), "--width", str(args.size), "--height", str(args.size), "--device",
            "cpu", "--dtype", "fp32", "--no-progress"] + (["--int8"] if args.int8 else [])

    trees = {"this": SRC} | ({"baseline": Path(args.baseline_src).resolve()} if args.baseline_src else {})
    cold: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for i in range(args.cold_runs):
        for name, src in trees.items():
            env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            out = Path(tmp.name) / f"cold-{name}-{i}.png"
            cmd = [sys.executable, "-m", "rectiflow", "generate", PROMPT, "--model", model, "-o", str(out)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([*cmd, *opts], env=env, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            cold[name].append((wall, cpu))

    pipe = Pipeline.from_bundle(model, "cpu", torch.float32, int8=args.int8)
    kw = dict(steps=args.steps, width=args.size, height=args.size, seed=0, progress=False)
    warm = interleaved_medians({"image": lambda: pipe(PROMPT, **kw)}, runs=args.runs)["image"]
    print(f"\n{args.size}x{args.size}, {args.steps} steps, euler, fp32{' + int8' if args.int8 else ''}, "
          f"{torch.get_num_threads()} threads")
    for name, runs in cold.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"  cold `rectiflow generate` ({name} src): wall {statistics.median(walls):.2f} s, CPU "
              f"{statistics.median(cpus):.2f} s (medians of {len(runs)}; wall: "
              f"{', '.join(f'{w:.2f}' for w in walls)})")
    if "baseline" in cold:
        ratio = [statistics.median([r[k] for r in cold["this"]]) / statistics.median([r[k] for r in
                 cold["baseline"]]) for k in (0, 1)]
        print(f"  this / baseline: wall {ratio[0]:.2f}x, CPU {ratio[1]:.2f}x")
    print(f"  warm per image: {warm:.3f} s (median of {args.runs})")
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""Shared helpers for benchmarks/: machine description, measured fp32 matmul peak, interleaved median timing.

Benchmarks are scripts, never timed tests (docs/design.md, "Benchmarks"). They compare against a peer
measured in the same process, interleaved (A, B, A, B, ...) so that drifting machine load affects both sides
alike, and report medians of >= 7 runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, str]:
    """What a reader needs to reproduce a number: CPU, cores, threads, torch, load at the time."""
    return {
        "cpu": cpu_model(),
        "logical cpus": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "load average (1/5/15 min)": load_average(),
    }


def print_machine_info() -> None:
    for k, v in machine_info().items():
        print(f"{k:>26}: {v}")


def time_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(
    fns: dict[str, Callable[[], object]], runs: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median wall time (s) of each callable, calls interleaved round-robin: a b a b ... (after warm-up)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            times[k].append(time_call(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def square_matmul(n: int = 4096, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], float]:
    """(a callable doing one n x n x n matmul into a preallocated output, its FLOP count 2 n^3)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    b = torch.randn(n, n, generator=g, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def matmul_peak_flops(n: int = 4096, runs: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """This machine's best observed matmul rate (FLOP/s): the fastest of `runs` n x n x n matmuls.

    The fastest run rather than the median: on a shared machine the peak is what the hardware can do when
    nothing interferes, which makes "% of peak" figures conservative.
    """
    fn, flops = square_matmul(n, dtype)
    fn()
    return flops / min(time_call(fn) for _ in range(runs))


def parse_model_bench_args(ap) -> tuple[object, str]:
    """Parse a model benchmark's arguments (--model, --runs among them): refuse --runs under 7, print the
    machine and the model (default: the bundled one). Returns (args, model path)."""
    from rectiflow.convert.bundle import default_bundle_path

    args = ap.parse_args()
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7)")
    print_machine_info()
    model = args.model or str(default_bundle_path())
    print(f"{'model':>26}: {model}")
    return args, model

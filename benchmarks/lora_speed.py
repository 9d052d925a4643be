"""LoRA cost: generation with a LoRA unmerged vs merged vs none, and a LoRA training step vs a full one.

    python benchmarks/lora_speed.py [--preset small] [--size 256] [--rank 16] [--targets attn,mlp]
                                    [--gen-steps 4] [--train-batch 4] [--train-size 64] [--runs 7]
                                    [--threads N] [--skip-train] [--skip-gen]

Generation: the transformer's part of sampling (`--gen-steps` Euler steps of a batch of one at `--size` px,
16 text tokens) with three models of the same random weights, timed interleaved in one process (median of
>= 7 runs each): none (the base), unmerged (a rank-`--rank` LoRA attached on `--targets`, the hooks add
up(down(x)) to every targeted layer's output), merged (the same LoRA added into the weights, adapters gone).

Training: one step = forward, flow-matching loss, backward, AdamW on a batch of `--train-batch` latents of a
`--train-size` px image (random data: the step's cost does not depend on it), each side in its own fresh
subprocess so that peak memory is its own, sides alternating (lora, full, lora, ...; median of >= 7 runs):
full = every parameter trains; lora = base frozen, only the adapters train (AdamW state for them alone).
Peak memory: the process's peak RSS during the timed steps (VmHWM reset after the warm-up steps, as
benchmarks/train_speed.py measures it), whole and above the RSS after imports.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from _common import interleaved_medians, print_machine_info
from rectiflow.flow import get_path, sample_timesteps, training_pair
from rectiflow.models.transformer import Flux, image_ids, pack, text_ids
from rectiflow.nn.lora import add_lora, lora_modules, lora_parameters, merge_lora, remove_lora
from train_speed import _peak_rss_mib, _reset_peak_rss, _status_mib

TXT = 16  # text tokens (the bundled model's MiniLM length)


def build(preset: str, seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    return Flux(preset).eval()


def attach(model: Flux, rank: int, targets: list[str]) -> None:
    add_lora(model, "bench", rank=rank, targets=targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (non-zero up), so nothing is skipped
        for _, a in lora_modules(model, "bench"):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.01)


def generation(args) -> dict[str, float]:
    none = build(args.preset)
    unmerged = copy.deepcopy(none)
    attach(unmerged, args.rank, args.targets)
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    remove_lora(merged)
    p = none.params
    lat = args.size // 8
    g = torch.Generator().manual_seed(2)
    x0 = pack(torch.randn(1, p.latent_channels, lat, lat, generator=g))
    txt, vec = torch.randn(1, TXT, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    iid, tid = image_ids(1, lat, lat), text_ids(1, TXT)

    def sample(model):
        def run():
            x = x0
            with torch.inference_mode():
                for i in range(args.gen_steps):
                    t, t_next = 1 - i / args.gen_steps, 1 - (i + 1) / args.gen_steps
                    x = x + (t_next - t) * model(x, iid, txt, tid, torch.full((1,), t), vec)
            return x

        return run

    with torch.inference_mode():
        a, b = sample(unmerged)(), sample(merged)()
    err = float((a - b).abs().max() / b.abs().max())
    med = interleaved_medians(
        {"none": sample(none), "unmerged": sample(unmerged), "merged": sample(merged)}, runs=args.runs
    )
    return {**med, "merged_vs_unmerged_rel_err": err}


def train_worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    base_rss = _status_mib("VmRSS") or 0.0
    model = build(args.preset).train()
    if args.worker == "lora":
        for q in model.parameters():
            q.requires_grad_(False)
        attach(model, args.rank, args.targets)
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    p, lat, b = model.params, args.train_size // 8, args.train_batch
    g = torch.Generator().manual_seed(3)
    path = get_path("rectified_flow")
    x0 = pack(torch.randn(b, p.latent_channels, lat, lat, generator=g))
    txt, vec = torch.randn(b, TXT, p.context_in_dim, generator=g), torch.randn(b, p.vec_in_dim, generator=g)
    iid, tid = image_ids(b, lat, lat), text_ids(b, TXT)

    def step():
        t = sample_timesteps("logit_normal", b, g)
        x_t, target = training_pair(path, x0, torch.randn(x0.shape, generator=g), t)
        loss = (model(x_t, iid, txt, tid, t, vec) - target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    dt = time.perf_counter() - t0
    peak = _peak_rss_mib(reset)
    return {
        "samples_s": b * args.train_steps / dt,
        "peak_mib": peak,
        "above_base_mib": peak - base_rss,
        "trainable": sum(q.numel() for q in params),
    }


def run_worker(side: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--preset",
        args.preset,
        "--rank",
        str(args.rank),
        "--targets",
        ",".join(args.targets),
        "--train-batch",
        str(args.train_batch),
        "--train-size",
        str(args.train_size),
        "--train-steps",
        str(args.train_steps),
        "--threads",
        str(args.threads or 0),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=256, help="generation image px")
    ap.add_argument("--gen-steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", type=lambda s: s.split(","), default=["attn", "mlp"])
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument(
        "--train-steps", type=int, default=3, help="timed steps per training run (after 2 warm-up)"
    )
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--worker", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(train_worker(args)))
        return 0
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7 runs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine_info()
    print(
        f"config: preset {args.preset}, LoRA rank {args.rank} on {','.join(args.targets)}, {args.runs} runs\n"
    )
    if not args.skip_gen:
        g = generation(args)
        print(
            f"generation: {args.gen_steps} Euler steps, batch 1, {args.size} px ({(args.size // 16) ** 2} "
            f"image + {TXT} text tokens); merged vs unmerged output: max rel diff "
            f"{g['merged_vs_unmerged_rel_err']:.1e}"
        )
        print("| model | s per image | vs none |\n|---|---|---|")
        for k in ("none", "merged", "unmerged"):
            print(f"| {k} | {g[k]:.3f} | {g[k] / g['none']:.3f}x |")
        print()
    if not args.skip_train:
        res: dict[str, list[dict]] = {"lora": [], "full": []}
        for i in range(args.runs):
            for side in res:
                res[side].append(run_worker(side, args))
            print(
                f"run {i + 1}/{args.runs}: "
                + ", ".join(
                    f"{s} {r[-1]['samples_s']:.2f} samples/s {r[-1]['peak_mib']:.0f} MiB"
                    for s, r in res.items()
                ),
                file=sys.stderr,
            )
        med = {s: {k: statistics.median(r[k] for r in v) for k in v[0]} for s, v in res.items()}
        print(
            f"training step: batch {args.train_batch} at {args.train_size} px, {args.train_steps} timed "
            "steps per run, AdamW, median over runs"
        )
        print("| step | trainable parameters | samples/s | peak RSS (MiB) | above post-import RSS (MiB) |")
        print("|---|---|---|---|---|")
        for s in ("full", "lora"):
            m = med[s]
            print(
                f"| {s} | {m['trainable']:,.0f} | {m['samples_s']:.2f} | {m['peak_mib']:.0f} | "
                f"{m['above_base_mib']:.0f} |"
            )
        lo, fu = med["lora"], med["full"]
        print(
            f"\nLoRA / full: speed {lo['samples_s'] / fu['samples_s']:.2f}x, peak RSS "
            f"{lo['peak_mib'] / fu['peak_mib']:.2f}x (above base "
            f"{lo['above_base_mib'] / fu['above_base_mib']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput and peak memory: rectiflow's Trainer step vs a plain loop around diffusers' Flux.

    python benchmarks/train_speed.py [--preset tiny] [--size 256] [--txt 64] [--batch 4] [--steps 8]
                                     [--runs 7] [--threads N] [--ac] [--device cpu|cuda]

Sides, each measured in its own fresh subprocess (so that peak memory is per side), run interleaved
(ours, diffusers, ours, ...; median of >= 7 runs of each):
  - ours: `rectiflow.train.Trainer.train_step()` on a latent cache (synthetic images through a pooling
    stand-in autoencoder and hashed word vectors; data loading, timestep / noise sampling, flow-matching loss,
    backward, grad clip 1.0, AdamW; EMA off as the plain loop has none);
  - ours+ac (with --ac): the same with train.activation_checkpointing = true;
  - diffusers: a plain loop around diffusers' FluxTransformer2DModel with the same config and weights (a
    random diffusers state dict, converted for ours with rectiflow.convert.flux_keys.diffusers_to_bfl), on a
    fixed batch from the same cache (so no data loading), same loss (x_t = (1 - t) x0 + t eps, target
    eps - x0, MSE, logit-normal t), grad clip 1.0, torch.optim.AdamW with the same hyperparameters.
Samples/s = batch * steps / time of `steps` steps after 2 warm-up steps. Peak memory: CPU: the process's
peak resident set during the timed steps (VmHWM, reset to the current RSS after the warm-up via
/proc/self/clear_refs; falls back to getrusage's ru_maxrss; tracemalloc does not see torch's allocations),
reported whole and above the RSS after imports, before the model is built (the training state: weights,
gradients, AdamW moments, activations); CUDA: torch.cuda.max_memory_allocated. Both sides import the same
modules first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from _common import print_machine_info  # noqa: E402

SIDES = ("ours", "diffusers")


# ---- fixtures: a synthetic latent cache and shared random weights ------------------------------------------


class _PoolAE(torch.nn.Module):
    """8x8 average pooling and a fixed 1x1 projection 3 -> 16 channels (FLUX's latent shape, no weights)."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.params = SimpleNamespace(channels=16, factor=8)
        self.proj = torch.nn.Parameter(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)),
                                       requires_grad=False)

    @torch.no_grad()
    def encode(self, x):
        return torch.einsum("oc,bchw->bohw", self.proj, torch.nn.functional.avg_pool2d(x, 8))


class _HashText:
    """Each word -> a fixed pseudo-random vector (seeded by crc32); `max_length` tokens of width `dim`."""

    def __init__(self, dim: int, max_length: int):
        self.txt_dim = self.vec_dim = dim
        self.max_length = max_length

    def encode(self, prompts):
        txt = torch.zeros(len(prompts), self.max_length, self.txt_dim)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[: self.max_length]):
                g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
                txt[i, j] = torch.randn(self.txt_dim, generator=g)
        return txt, txt.mean(1)

    def spec(self):
        return {"kind": "bench-hash", "dim": self.txt_dim, "max_length": self.max_length}

    def fingerprint(self):
        return f"bench-hash-{self.txt_dim}-{self.max_length}"


def make_fixtures(args, work: Path) -> None:
    """work/cache (2 * batch samples of args.size px) and work/diffusers.safetensors (random weights)."""
    import numpy as np
    from safetensors.torch import save_file

    from rectiflow.data.cache_writer import build_cache
    from rectiflow.data.sources import ArraySource
    from rectiflow.models.transformer import TRANSFORMER_PRESETS

    p = TRANSFORMER_PRESETS[args.preset]

    def item(i):
        img = np.random.default_rng([3, i]).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        words = " ".join(f"w{(i * 7 + j) % 50}" for j in range(args.txt))
        return img, {"caption": [words]}, f"s{i:04d}"

    text = _HashText(p.context_in_dim, args.txt)
    build_cache(ArraySource(2 * args.batch, item, name="bench"), _PoolAE(), text, work / "cache",
                size=args.size, batch_size=8, shard_size=64)
    torch.manual_seed(0)
    ref = diffusers_model(p)
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_(0.0, 0.02)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(work / "diffusers.safetensors"))


def diffusers_model(p):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim,
    )


# ---- one side, in a worker process -------------------------------------------------------------------------

LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.999), 1e-8, 1.0


def _ours(args, work: Path, device: torch.device, ac: bool):
    from safetensors.torch import load_file

    from rectiflow.convert.flux_keys import diffusers_to_bfl
    from rectiflow.train.config import config_from_dict
    from rectiflow.train.trainer import Trainer

    cfg = config_from_dict({
        "model": {"preset": args.preset},
        "data": {"cache": str(work / "cache"), "batch_size": args.batch, "caption_dropout": 0.0},
        "optim": {"lr": LR, "betas": list(BETAS), "eps": EPS, "warmup_steps": 0, "grad_clip": CLIP},
        "ema": {"enabled": False},
        "train": {"steps": 10**6, "device": str(device), "activation_checkpointing": ac, "progress": False},
        "validation": {"every": 0, "holdout": 0}, "logging": {"tensorboard": False},
    })
    tr = Trainer(cfg)
    sd = diffusers_to_bfl(load_file(str(work / "diffusers.safetensors")), tr.params)
    tr.model.load_state_dict(sd, strict=True)
    return tr.train_step


def _plain(args, work: Path, device: torch.device):
    from safetensors.torch import load_file

    from rectiflow.data.cache_reader import LatentCache
    from rectiflow.models.transformer import TRANSFORMER_PRESETS, image_ids, pack, text_ids

    model = diffusers_model(TRANSFORMER_PRESETS[args.preset]).to(device).train()
    model.load_state_dict(load_file(str(work / "diffusers.safetensors")), strict=True)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    batch = LatentCache(work / "cache").get_batch(list(range(args.batch)))
    lat, txt, vec = (batch[k].to(device, torch.float32) for k in ("latents", "txt", "vec"))
    b, _, h, w = lat.shape
    x0 = pack(lat)  # [b, (h/2)(w/2), 64]
    img_ids, txt_ids = image_ids(1, h, w, device)[0], text_ids(1, txt.shape[1], device)[0]
    g = torch.Generator().manual_seed(0)

    def step():
        t = torch.sigmoid(torch.randn(b, generator=g)).to(device)  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=g).to(device)
        tt = t[:, None, None]
        x_t = (1 - tt) * x0 + tt * eps
        out = model(hidden_states=x_t, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = (out - (eps - x0)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _status_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS: Linux >= 4.0, `5` > /proc/self/clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset: bool) -> float:
    # VmHWM rather than getrusage's ru_maxrss where possible: ru_maxrss also keeps the peak of the image the
    # process exec'd from (the driver, which has torch loaded) and cannot be reset after imports.
    hwm = _status_mib("VmHWM") if reset else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    import diffusers  # noqa: F401  (both sides import the same modules before measuring)

    import rectiflow.train.trainer  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.work)
    base = _status_mib("VmRSS") or 0.0  # after imports, before the model is built
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = _plain(args, work, device) if args.worker == "diffusers" else \
        _ours(args, work, device, ac=args.worker == "ours+ac")
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reset = device.type == "cpu" and _reset_peak_rss()  # peak of the steady-state steps below
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib(reset)
    return {"samples_s": args.batch * args.steps / dt, "peak_mib": mem,
            "above_base_mib": mem - (0.0 if device.type == "cuda" else base)}


# ---- driver ------------------------------------------------------------------------------------------------


def run_side(side: str, args, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--work", str(work), "--preset", args.preset,
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
           "--threads", str(args.threads or 0)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256, help="image px (latents size/8, tokens size^2/256)")
    ap.add_argument("--txt", type=int, default=64, help="text tokens")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (after 2 warm-up steps)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ac", action="store_true", help="also time ours with activation checkpointing")
    ap.add_argument("--worker", choices=("ours", "ours+ac", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.runs < 7:
        ap.error("--runs must be >= 7 (median of at least 7 runs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine_info()
    sides = [*SIDES, "ours+ac"] if args.ac else list(SIDES)
    print(f"config: preset {args.preset}, {args.size} px ({(args.size // 16) ** 2} image + {args.txt} text "
          f"tokens), batch {args.batch}, {args.steps} timed steps per run, {args.runs} runs, device "
          f"{args.device}\n")
    res: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="rectiflow-train-speed-") as tmp:
        work = Path(tmp)
        make_fixtures(args, work)
        for i in range(args.runs):
            for s in sides:
                res[s].append(run_side(s, args, work))
            last = {s: res[s][-1] for s in sides}
            print(f"run {i + 1}/{args.runs}: " + ", ".join(
                f"{s} {r['samples_s']:.2f} samples/s {r['peak_mib']:.0f} MiB" for s, r in last.items()),
                file=sys.stderr)
    med = {s: {k: statistics.median(r[k] for r in res[s]) for k in res[s][0]} for s in sides}
    mem = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"| side | samples/s | {mem} (MiB) | above post-import RSS (MiB) | speed vs diffusers "
          "| memory vs diffusers (whole / above base) |")
    print("|---|---|---|---|---|---|")
    d = med["diffusers"]
    for s in sides:
        m = med[s]
        print(f"| {s} | {m['samples_s']:.2f} | {m['peak_mib']:.0f} | {m['above_base_mib']:.0f} "
              f"| {m['samples_s'] / d['samples_s']:.2f}x | {m['peak_mib'] / d['peak_mib']:.2f}x / "
              f"{m['above_base_mib'] / max(d['above_base_mib'], 1e-9):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

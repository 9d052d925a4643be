"""`rectiflow eval straightness`: how straight a model's sampling paths are (rectiflow.flow.straightness).

For n samples (sample i: noise of seed `seed + i`, as `generate --seed` draws it, and prompt i mod P of the
prompt list; default the shapes-world benchmark's seen prompts), on the model's own (guided) ODE:
  - S = E_t E ||(z_1 - z_0) - v(z_t, t)||^2 (Liu et al. 2022 eq. 8; mean over latent elements) on a
    `steps`-step Euler trajectory, overall and per t-bucket;
  - the RMS latent distance of the 1-, 2- and 4-step endpoints (Euler on the model's default grid, or
    `shift`) to a reference endpoint: that same `steps`-step Euler endpoint, or an adaptive dopri5 solve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rectiflow.errors import RectiflowError
from rectiflow.flow import endpoint_errors, rms_distance, solve_adaptive, straightness
from rectiflow.sample.pipeline import DEFAULT, Pipeline, initial_noise

__all__ = ["evaluate_straightness", "default_prompts", "format_straightness", "write_report"]


def default_prompts() -> list[str]:
    """The shapes-world benchmark's seen prompts (288), in a fixed shuffled order so that the first n of them
    cover every task."""
    import numpy as np

    from rectiflow.eval.shapes import prompt_set

    texts = [p.text for p in prompt_set("seen")]
    return [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]


def evaluate_straightness(pipe: Pipeline, *, n: int = 64, prompts: Sequence[str] | None = None, seed: int = 0,
                          steps: int = 64, buckets: int = 8, few_steps: Sequence[int] = (1, 2, 4),
                          reference: str = "euler", shift: Any = DEFAULT, cfg_scale: float | None = None,
                          guidance: Any = DEFAULT, size: int | None = None, batch_size: int = 32,
                          progress: bool = True) -> dict:
    """The report as a dict: {"S", "S_by_bucket", "bucket_edges", "endpoint_rms": {steps: value}, ...}."""
    if n < 1:
        raise RectiflowError(f"--n must be >= 1, got {n}")
    if reference not in ("euler", "dopri5"):
        raise RectiflowError(f"--reference must be euler ({steps} Euler steps) or dopri5, got {reference!r}")
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts:
        raise RectiflowError("no prompts to evaluate straightness on")
    d = pipe.defaults
    cfg_scale = d.cfg_scale if cfg_scale is None else float(cfg_scale)
    shift = d.shift if shift is DEFAULT else shift
    width, height = (size, size) if size else (d.width, d.height)
    pipe._check_size(width, height)
    guidance = pipe._resolve_guidance(guidance)
    lh, lw = height // pipe.downsample, width // pipe.downsample
    channels = pipe.autoencoder.params.z_channels
    use_cfg = cfg_scale != 1.0
    empty = pipe.encode_prompts([""]) if use_cfg else None
    per_sample, bucket_sums, errs, ref_nfe = [], torch.zeros(buckets, dtype=torch.float64), {}, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="straightness", unit="sample", disable=not progress)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        cond = pipe.encode_prompts([prompts[i % len(prompts)] for i in idx])
        uncond = None if empty is None else tuple(e.expand(len(idx), *e.shape[1:]) for e in empty)
        velocity = pipe.velocity_fn(cond, uncond, lh, lw, guidance, cfg_scale)
        noise = initial_noise([seed + i for i in idx], len(idx), channels, lh, lw)
        x1 = pipe.family.pack(noise.to(pipe.device, pipe.dtype))  # model space
        with torch.inference_mode():
            rep = straightness(velocity, x1, steps=steps, buckets=buckets)
            ref = rep.endpoint
            if reference == "dopri5":
                ref, nfe = solve_adaptive(velocity, x1, 1.0, 0.0, rtol=1e-5, atol=1e-5)
                ref_nfe += nfe
            for k, v in endpoint_errors(velocity, x1, ref, few_steps, shift=shift,
                                        seq_len=pipe.image_tokens(lh, lw)).items():
                errs[k] = errs.get(k, 0.0) + v * len(idx)
            if reference == "dopri5":
                errs[steps] = errs.get(steps, 0.0) + float(rms_distance(rep.endpoint, ref).sum())
        per_sample.append(rep.per_sample)
        bucket_sums += torch.tensor(rep.by_bucket, dtype=torch.float64) * len(idx)
        bar.update(len(idx))
    bar.close()
    values = torch.cat(per_sample)
    return {
        "model": pipe.name, "model_hash": pipe.model_hash, "n": n, "seed": seed, "euler_steps": steps,
        "cfg_scale": cfg_scale, "guidance": guidance, "shift": shift, "width": width, "height": height,
        "S": float(values.double().mean()), "S_std": float(values.double().std()) if n > 1 else 0.0,
        "S_by_bucket": [float(v) for v in bucket_sums / n],
        "bucket_edges": [k / buckets for k in range(buckets + 1)],
        "reference": f"euler {steps}" if reference == "euler" else f"dopri5 (rtol 1e-5, {ref_nfe / n:.0f} "
                                                                   "evaluations per sample)",
        "endpoint_rms": {str(k): v / n for k, v in sorted(errs.items())},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def format_straightness(report: dict) -> str:
    """Human-readable lines of a report."""
    edges = report["bucket_edges"]
    buckets = ", ".join(f"[{a:.2f},{b:.2f}) {v:.4g}" for a, b, v in zip(edges[:-1], edges[1:],
                                                                         report["S_by_bucket"]))
    ends = ", ".join(f"{k} steps {v:.4f}" for k, v in report["endpoint_rms"].items())
    return "\n".join([
        f"model {report['model']} ({report['model_hash']}), {report['n']} samples, CFG "
        f"{report['cfg_scale']:g}, {report['euler_steps']} Euler steps",
        f"straightness S = {report['S']:.5g} (per-sample std {report['S_std']:.3g})",
        f"S by t bucket (t = 0 data): {buckets}",
        f"endpoint RMS distance to {report['reference']}: {ends}",
    ])


def write_report(report: dict, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=1))
    return p

"""Classifier-free guidance and FLUX-dev's guidance input.

CFG (Ho & Salimans 2022) on velocities: v = v_uncond + scale (v_cond - v_uncond) (`cfg_combine`); scale = 1
is the plain conditional model, scale = 0 the unconditional one. Both halves run as one doubled batch whose
order this module owns, the UNCONDITIONAL half first (as diffusers' pipelines): `cfg_batch(cond, uncond)`
builds [uncond; cond] for any conditioning input (text, pooled vector, guidance), `cfg_guide(out, scale)`
combines the model's [2B, ...] output, and `cfg_velocity_fn(model_fn, scale)` wraps a model_fn that takes
the duplicated state x2 = cat([x, x]) [2B, ...] into a guided velocity for the solvers.

FLUX-dev is guidance-distilled: instead of CFG it takes the guidance scale as a model input. That input is
the raw scale (e.g. 3.5, BFL's default for dev); the x1000 scaling happens inside the model's embedder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rectiflow.errors import ConfigError


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """v_uncond + scale * (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_batch(cond: Tensor, uncond: Tensor) -> Tensor:
    """A conditioning input of a doubled CFG batch: [uncond; cond] along dim 0 ([B, ...] x 2 -> [2B, ...])."""
    return torch.cat([uncond, cond], dim=0)


def cfg_guide(out: Tensor, scale: float) -> Tensor:
    """The guided result from a doubled-batch output [uncond; cond] [2B, ...] -> [B, ...]."""
    v_uncond, v_cond = out.chunk(2, dim=0)  # [2B, ...] -> 2 x [B, ...]
    return cfg_combine(v_cond, v_uncond, scale)


def cfg_velocity_fn(
    model_fn: Callable[[Tensor, Tensor], Tensor], scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap a doubled-batch model_fn(x2, t) -> [uncond; cond] into a guided velocity_fn(x, t) for `solve`."""

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(torch.cat([x, x], dim=0), t)  # [B, ...] -> [2B, ...]
        if out.shape[0] != 2 * x.shape[0]:
            raise ConfigError(
                f"cfg model_fn returned batch {out.shape[0]} for a doubled batch of {2 * x.shape[0]}"
            )
        return cfg_guide(out, scale)

    return velocity_fn


def guidance_vector(value: float, batch: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """FLUX-dev's guidance input: the raw scale repeated, shape [batch]."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    return torch.full((batch,), float(value), device=device, dtype=dtype)

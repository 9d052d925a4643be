"""Classifier-free guidance and FLUX-dev's guidance input.

CFG (Ho & Salimans 2022) on velocities: v = v_uncond + scale (v_cond - v_uncond); scale = 1 is the plain
conditional model, scale = 0 the unconditional one. `cfg_velocity_fn` evaluates both halves in one batch:
the wrapped model_fn sees the state duplicated along the batch, x2 = cat([x, x]) [2B, ...], and must return
[2B, ...] with the UNCONDITIONAL half first and the conditional half second (the caller concatenates its
text conditioning in that order, like diffusers' pipelines).

FLUX-dev is guidance-distilled: instead of CFG it takes the guidance scale as a model input. That input is
the raw scale (e.g. 3.5, BFL's default for dev); the x1000 scaling happens inside the model's embedder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rectiflow.errors import ConfigError


def cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """v_uncond + scale * (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


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
        v_uncond, v_cond = out.chunk(2, dim=0)  # [2B, ...] -> 2 x [B, ...]
        return cfg(v_cond, v_uncond, scale)

    return velocity_fn


def guidance_vector(value: float, batch: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """FLUX-dev's guidance input: the raw scale repeated, shape [batch]."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    return torch.full((batch,), float(value), device=device, dtype=dtype)

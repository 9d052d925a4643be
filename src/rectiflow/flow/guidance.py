"""Classifier-free guidance and FLUX-dev's guidance input.

CFG (Ho & Salimans 2022) on velocities: v = v_uncond + scale (v_cond - v_uncond) (`cfg_combine`); scale = 1
is the plain conditional model, scale = 0 the unconditional one. Both halves run as one doubled batch whose
order this module owns, the UNCONDITIONAL half first (as diffusers' pipelines): `cfg_batch(cond, uncond)`
builds [uncond; cond] for any conditioning input (text, pooled vector, guidance), `cfg_guide(out, scale)`
combines the model's [2B, ...] output, and `cfg_velocity_fn(model_fn, scale)` wraps a model_fn that takes
the duplicated state x2 = cat([x, x]) [2B, ...] into a guided velocity for the solvers. A CFG interval
(lo, hi) guides only at flow times lo <= t <= hi and runs the conditional model alone elsewhere
(Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution quality
in diffusion models"; they state it in noise levels sigma, here in flow time t = sigma / (1 + sigma)).

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


def check_cfg_interval(interval, what: str = "cfg interval") -> tuple[float, float] | None:
    """None, or (lo, hi) with 0 <= lo <= hi <= 1: the flow times at which CFG applies (ConfigError else)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be two times LO,HI in [0, 1], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"{what} must satisfy 0 <= LO <= HI <= 1 (flow time, 1 = noise), got {lo:g},{hi:g}")
    return lo, hi


def cfg_scale_at(t: Tensor, scale: float, interval: tuple[float, float] | None) -> Tensor:
    """The CFG scale at flow time(s) t: `scale` where lo <= t <= hi, 1 (the plain conditional model)
    elsewhere; every t is inside when interval is None. Same shape as t (0-d or [B])."""
    if interval is None:
        return torch.full_like(t, float(scale), dtype=torch.float32)
    inside = (t >= interval[0]) & (t <= interval[1])
    return torch.where(inside, torch.full_like(t, float(scale), dtype=torch.float32),
                       torch.ones_like(t, dtype=torch.float32))


def cfg_velocity_fn(
    model_fn: Callable[[Tensor, Tensor], Tensor], scale: float,
    interval: tuple[float, float] | None = None,
    cond_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap a doubled-batch model_fn(x2, t) -> [uncond; cond] into a guided velocity_fn(x, t) for `solve`.

    interval (lo, hi): guide only at solver times lo <= t <= hi (Kynkaanniemi et al. 2024, "Applying
    guidance in a limited interval"); elsewhere the velocity is the conditional model's, from
    cond_fn(x, t) (one forward of the plain batch) when given, else the doubled batch's second half."""

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        if interval is not None and not interval[0] <= float(t) <= interval[1]:
            if cond_fn is not None:
                return cond_fn(x, t)
            return model_fn(torch.cat([x, x], dim=0), t).chunk(2, dim=0)[1]
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

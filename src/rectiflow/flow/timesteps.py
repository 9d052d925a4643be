"""Training-time timestep samplers, their densities, and SD3's loss weightings (SD3 section 3.1).

Samplers: `f(n, *, generator, device=None, dtype=torch.float32, **params) -> t [n]` in [0, 1] (t = 0 data,
t = 1 noise). Randomness is drawn in float64 on the CPU from the explicit `generator` (a CPU
torch.Generator), so a seed gives the same t on every device; the result is then cast and moved.

    uniform        t ~ U(0, 1)                         pdf 1
    logit_normal   t = sigmoid(m + s n), n ~ N(0, 1)
                                          pdf 1/(s sqrt(2 pi)) 1/(t(1-t)) exp(-(logit t - m)^2 / 2s^2)
    mode           t = f_mode(u; s) = 1 - u - s (cos^2(pi u/2) - 1 + u), u ~ U(0, 1)
                                          (-1 <= s <= 2/(pi-2) keeps f_mode monotone)
                                          pdf |d f_mode^{-1}(t) / dt| = 1 / |f_mode'(u)|
    cosmap         t = 1 - 1 / (tan(pi u / 2) + 1)    pdf 2 / (pi - 2 pi t + 2 pi t^2)
    u_shaped       t = 1/2 + asinh((2u - 1) sinh(a/2)) / a
                                          pdf a cosh(a (t - 1/2)) / (2 sinh(a/2))   (a > 0; default 4)
    grid           t = 1 - k / N, k ~ U{0..N-1}        discrete (steps = N; N = 1: t = 1 only)

SD3's defaults are logit_normal(m=0, s=1) (their best "rf/lognorm(0.00, 1.00)") and mode(s=1.29).
u_shaped is the reflow sampler of Lee et al. 2024 ("Improving the Training of Rectified Flows",
arXiv:2405.20320, sec. 4.1): p(t) proportional to e^{at} + e^{a(1-t)}, a = 4, which puts the training where a
2-rectified flow's loss is largest, at both ends (their figure 3). Their code draws it as a truncated
exponential mirrored with probability 1/2; the inverse CDF above is the same law from one uniform draw.

Loss weights (`loss_weight(name, t, **params)`): SD3 section 3.1 notes that drawing t ~ pi(t) is the same
objective as drawing t uniformly and weighting the eps-loss by w_t = t/(1-t) pi(t), i.e. weighting the
rectified-flow (v) loss by pi(t). So each sampler's density doubles as a per-sample weight for the RF loss
under uniform t: "none", "logit_normal", "mode", "cosmap", "u_shaped"; plus "sigma_sqrt" = t^-2 (diffusers'
compute_loss_weighting_for_sd3, for comparison). For a whole formulation's weight relative to RF, see
`rectiflow.flow.paths.equivalent_rf_weight`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from rectiflow.errors import ConfigError
from rectiflow.flow.schedules import sd3_shift

_MODE_S_MAX = 2.0 / (math.pi - 2.0)  # SD3 section 3.1: f_mode is monotone for -1 <= s <= 2/(pi - 2)


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ConfigError("timestep samplers need a CPU generator: torch.Generator().manual_seed(seed)")


def _uniform64(n: int, generator: torch.Generator) -> Tensor:
    _check_generator(generator)
    if n < 0:
        raise ConfigError(f"number of timesteps must be >= 0, got {n}")
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _out(t: Tensor, device, dtype) -> Tensor:
    return t.to(dtype=dtype).to(device) if device is not None else t.to(dtype=dtype)


def _check_mode_s(s: float) -> None:
    if not -1.0 <= s <= _MODE_S_MAX:
        raise ConfigError(f"mode sampling needs -1 <= s <= 2/(pi-2) = {_MODE_S_MAX:.4f}, got s={s}")


def _check_u_shaped_a(a: float) -> None:
    if not a > 0:
        raise ConfigError(f"u_shaped needs a > 0 (Lee et al. 2024 use a = 4), got a={a}")


def _check_lognorm_s(s: float) -> None:
    if not s > 0:
        raise ConfigError(f"logit_normal needs a scale s > 0, got s={s}")


# -- samplers -----------------------------------------------------------------------------------------


def uniform(n: int, *, generator: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    return _out(_uniform64(n, generator), device, dtype)


def logit_normal(
    n: int, *, generator: torch.Generator, device=None, dtype=torch.float32, m: float = 0.0, s: float = 1.0
) -> Tensor:
    _check_generator(generator)
    _check_lognorm_s(s)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    return _out(torch.sigmoid(m + s * z), device, dtype)


def f_mode(u: Tensor, s: float) -> Tensor:
    """SD3 section 3.1, mode sampling with heavy tails: f_mode(u; s) = 1 - u - s(cos^2(pi u/2) - 1 + u)."""
    return 1.0 - u - s * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)


def mode(n: int, *, generator: torch.Generator, device=None, dtype=torch.float32, s: float = 1.29) -> Tensor:
    _check_mode_s(s)
    return _out(f_mode(_uniform64(n, generator), s), device, dtype)


def cosmap(n: int, *, generator: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    u = _uniform64(n, generator)
    return _out(1.0 - 1.0 / (torch.tan(0.5 * math.pi * u) + 1.0), device, dtype)


def u_shaped(
    n: int, *, generator: torch.Generator, device=None, dtype=torch.float32, a: float = 4.0
) -> Tensor:
    _check_u_shaped_a(a)
    u = _uniform64(n, generator)
    return _out(0.5 + torch.asinh((2.0 * u - 1.0) * math.sinh(0.5 * a)) / a, device, dtype)


# -- densities (closed forms, float64 in, same dtype out) ----------------------------------------------


def uniform_pdf(t: Tensor) -> Tensor:
    return torch.where((t >= 0) & (t <= 1), torch.ones_like(t), torch.zeros_like(t))


def logit_normal_pdf(t: Tensor, m: float = 0.0, s: float = 1.0) -> Tensor:
    _check_lognorm_s(s)
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - m) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def u_shaped_pdf(t: Tensor, a: float = 4.0) -> Tensor:
    _check_u_shaped_a(a)
    return a * torch.cosh(a * (t - 0.5)) / (2.0 * math.sinh(0.5 * a))


def _f_mode_inverse(t: Tensor, s: float, iters: int = 64) -> Tensor:
    """u with f_mode(u; s) = t by vectorised bisection (f_mode decreases from 1 at u=0 to 0 at u=1)."""
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(iters):  # 64 halvings reach float64 resolution on [0, 1]
        mid = 0.5 * (lo + hi)
        right = f_mode(mid, s) > t
        lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
    return 0.5 * (lo + hi)


def mode_pdf(t: Tensor, s: float = 1.29) -> Tensor:
    """1 / |f_mode'(u)| at u = f_mode^{-1}(t); f_mode'(u) = -1 - s + (s pi / 2) sin(pi u)."""
    _check_mode_s(s)
    u = _f_mode_inverse(t, s)
    return 1.0 / (1.0 + s - 0.5 * s * math.pi * torch.sin(math.pi * u))


def cosmap_pdf(t: Tensor) -> Tensor:
    return 2.0 / (math.pi - 2.0 * math.pi * t + 2.0 * math.pi * t * t)


def grid(n: int, *, generator: torch.Generator, device=None, dtype=torch.float32, steps: int = 4,
         shift: float = 1.0) -> Tensor:
    """t uniform on the start times of an N-step Euler sampler on the linear grid: 1, 1 - 1/N, ..., 1/N
    (N = steps), or on SD3's shifted grid (shift = alpha != 1, rectiflow.flow.sd3_shift: the times a model
    sampled with `--shift alpha` is queried at). steps = 1 gives t = 1 only: with reflow couplings the model
    then learns the one-step map z_1 -> z_0 (the RF paper's distillation, Liu et al. 2022 sec. 2.3). A
    discrete law: no density."""
    _check_generator(generator)
    if not float(steps).is_integer() or steps < 1:  # TOML configs give floats: {steps = 1} -> 1.0
        raise ConfigError(f"grid sampling needs an integer steps >= 1, got {steps!r}")
    steps = int(steps)
    if n < 0:
        raise ConfigError(f"number of timesteps must be >= 0, got {n}")
    k = torch.randint(steps, (n,), generator=generator)
    return _out(sd3_shift(1.0 - k.double() / steps, float(shift)), device, dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform,
    "grid": grid,
    "logit_normal": logit_normal,
    "mode": mode,
    "cosmap": cosmap,
    "u_shaped": u_shaped,
}

PDFS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_pdf,
    "logit_normal": logit_normal_pdf,
    "mode": mode_pdf,
    "cosmap": cosmap_pdf,
    "u_shaped": u_shaped_pdf,
}


def sample_timesteps(
    name: str, n: int, generator: torch.Generator, device=None, dtype=torch.float32, **params
) -> Tensor:
    """Dispatch to a sampler by name (a key of SAMPLERS) -> t [n]."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown timestep sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    try:
        return SAMPLERS[name](n, generator=generator, device=device, dtype=dtype, **params)
    except TypeError as e:
        raise ConfigError(f"bad parameters {sorted(params)} for timestep sampler {name!r}: {e}") from None


LOSS_WEIGHTS = ("none", "logit_normal", "mode", "cosmap", "u_shaped", "sigma_sqrt")


def loss_weight(name: str, t: Tensor, **params) -> Tensor:
    """Per-sample weight for the rectified-flow loss at times t (uniform-t training), see module doc.

    "none" -> 1; "logit_normal"(m, s) / "mode"(s) / "cosmap" / "u_shaped"(a) -> the sampler's density pi(t)
    (SD3 3.1: w_t = t/(1-t) pi(t) in eps-form); "sigma_sqrt" -> t^-2 (diffusers'
    weighting_scheme="sigma_sqrt").
    """
    if name not in LOSS_WEIGHTS:
        raise ConfigError(f"unknown loss weighting {name!r}; choose one of {', '.join(LOSS_WEIGHTS)}")
    if name == "none":
        if params:
            raise ConfigError(f"loss weighting 'none' takes no parameters, got {sorted(params)}")
        return torch.ones_like(t)
    if name == "sigma_sqrt":
        if params:
            raise ConfigError(f"loss weighting 'sigma_sqrt' takes no parameters, got {sorted(params)}")
        return t.to(torch.float64).pow(-2).to(t.dtype)
    try:
        return PDFS[name](t.to(torch.float64), **params).to(t.dtype)
    except TypeError as e:
        raise ConfigError(f"bad parameters {sorted(params)} for loss weighting {name!r}: {e}") from None

"""Inference time grids: t[0] = 1 (noise) ... t[-1] = 0 (data), and the FLUX / SD3 time shifts.

    linear_grid(steps, t_last=None)     [steps + 1]: linspace(1, t_last, steps) then 0. t_last defaults to
                                         1/steps, i.e. linspace(1, 0, steps + 1) (BFL's get_schedule and
                                         diffusers' FluxPipeline); diffusers' FlowMatchEulerDiscreteScheduler
                                         without explicit sigmas uses t_last = 1/num_train_timesteps = 1e-3.
    flux_mu(seq_len, ...)               FLUX's resolution-dependent shift mu, linear in the number of image
                                         tokens: 0.5 at 256 tokens, 1.15 at 4096 (BFL sampling.py defaults).
    time_shift(mu, sigma, t)            e^mu / (e^mu + (1/t - 1)^sigma), with 0 -> 0 and 1 -> 1 exactly.
    sd3_shift(t, alpha)                 alpha t / (1 + (alpha - 1) t) (SD3 section 5.3.2; SD3 uses 3.0).
    timestep_grid(steps, shift=...)     one entry point: shift None | "flux" (needs seq_len) | float alpha.
    TimeShift, parse_time_shift(v)      the one time-shift type and its parser, used at every edge (CLI
                                         flags, TOML configs, bundle cards) so inside the code a shift is
                                         always None (linear), "flux" (FLUX's resolution-dependent) or an SD3
                                         alpha > 0 (a constant shift; 1 = none).

The shifts move the grid towards t = 1 (more steps at high noise), which larger images need: SD3 section 5.3.2
("resolution-dependent shifting") derives sd3_shift from matching the SNR of n = alpha^2 times more pixels;
FLUX's time_shift with sigma = 1 is the same map with alpha = e^mu.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from rectiflow.errors import ConfigError

# BFL flux sampling.py get_schedule / diffusers FluxPipeline scheduler config defaults.
FLUX_BASE_SEQ_LEN = 256
FLUX_MAX_SEQ_LEN = 4096
FLUX_BASE_SHIFT = 0.5
FLUX_MAX_SHIFT = 1.15

# None: the linear grid; "flux": FLUX's sequence-length shift; a number: SD3's constant shift alpha > 0.
TimeShift = Literal["flux"] | float | None
_NO_SHIFT_WORDS = ("", "none", "linear")


def parse_time_shift(value: Any, where: str = "shift") -> TimeShift:
    """A time shift from a flag, a config value or a bundle card: None, "", "none" or "linear" -> None;
    "flux" -> "flux"; a number or numeric string > 0 -> that number (a string becomes a float). Anything
    else: ConfigError naming `where`."""
    if value is None:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _NO_SHIFT_WORDS:
            return None
        if word == "flux":
            return "flux"
        try:
            number = float(word)
        except ValueError:
            raise ConfigError(f"{where}: unknown shift {value!r}; use none (a linear grid), flux (FLUX's "
                              "sequence-length shift) or an SD3 alpha > 0 such as 3") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        raise ConfigError(f"{where}: unknown shift {value!r}; use none, flux or an SD3 alpha > 0 such as 3")
    if not number > 0 or math.isinf(number):
        raise ConfigError(f"{where}: the shift must be > 0 (SD3's alpha; 1 = no shift), got {number}")
    return number


def linear_grid(steps: int, t_last: float | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """[steps + 1] from 1 down to 0: linspace(1, t_last, steps) followed by 0 (t_last default 1/steps)."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"number of sampling steps must be an integer >= 1, got {steps!r}")
    if t_last is None:
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).to(dtype)
    if not 0.0 < t_last <= 1.0 or (steps > 1 and t_last >= 1.0):
        raise ConfigError(f"t_last must be in (0, 1) (the last nonzero time), got {t_last}")
    head = torch.linspace(1.0, t_last, steps, dtype=torch.float64)
    return torch.cat([head, head.new_zeros(1)]).to(dtype)


def flux_mu(
    seq_len: int,
    base_seq_len: int = FLUX_BASE_SEQ_LEN,
    max_seq_len: int = FLUX_MAX_SEQ_LEN,
    base_shift: float = FLUX_BASE_SHIFT,
    max_shift: float = FLUX_MAX_SHIFT,
) -> float:
    """mu on the line through (base_seq_len, base_shift) and (max_seq_len, max_shift) at seq_len."""
    if seq_len < 1:
        raise ConfigError(f"seq_len (number of image tokens) must be >= 1, got {seq_len}")
    if max_seq_len == base_seq_len:
        raise ConfigError("flux_mu needs max_seq_len != base_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """FLUX's shift e^mu / (e^mu + (1/t - 1)^sigma), exact at the endpoints (t = 0 -> 0, t = 1 -> 1)."""
    if sigma <= 0:
        raise ConfigError(f"time_shift needs sigma > 0, got {sigma}")
    inner = t.clamp_min(torch.finfo(t.dtype).tiny)  # 1/t finite; t = 0 is restored below
    out = 1.0 / (1.0 + math.exp(-mu) * (1.0 / inner - 1.0) ** sigma)  # = e^mu / (e^mu + (1/t - 1)^sigma)
    out = torch.where(t >= 1, torch.ones_like(out), out)
    return torch.where(t <= 0, torch.zeros_like(out), out)


def sd3_shift(t: Tensor, alpha: float) -> Tensor:
    """SD3's static shift alpha t / (1 + (alpha - 1) t); alpha = 1 is the identity."""
    if alpha <= 0:
        raise ConfigError(f"the SD3 shift alpha must be > 0, got {alpha}")
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def timestep_grid(
    steps: int,
    *,
    shift: TimeShift = None,
    seq_len: int | None = None,
    t_last: float | None = None,
    base_seq_len: int = FLUX_BASE_SEQ_LEN,
    max_seq_len: int = FLUX_MAX_SEQ_LEN,
    base_shift: float = FLUX_BASE_SHIFT,
    max_shift: float = FLUX_MAX_SHIFT,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Sampling grid [steps + 1], strictly decreasing, t[0] = 1 and t[-1] = 0.

    shift=None: linear grid; shift="flux": time_shift(flux_mu(seq_len, ...), 1, grid) as in FLUX (seq_len =
    number of packed image tokens, (H/16) * (W/16)); shift=alpha (float): sd3_shift(grid, alpha).
    Computed in float64, returned in `dtype`.
    """
    grid = linear_grid(steps, t_last=t_last)
    shift = parse_time_shift(shift)
    if shift is None:
        out = grid
    elif shift == "flux":
        if seq_len is None:
            raise ConfigError("shift='flux' needs seq_len (the number of image tokens, (H/16)*(W/16))")
        mu = flux_mu(seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        out = time_shift(mu, 1.0, grid)
    else:
        out = sd3_shift(grid, float(shift))
    return out.to(dtype)

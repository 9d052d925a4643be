"""ODE solvers for dx/dt = v(x, t) along a time grid (sampling: t from 1 to 0).

`velocity_fn(x, t) -> v` receives x (the current state, same shape and dtype as the input) and t as a 0-d
tensor on x's device, in float64 if x is float64 and float32 otherwise (never half precision: bf16 cannot
tell t = 0.99 from 1). The caller's model wrapper broadcasts t to [B] (e.g. `t.expand(x.shape[0])`).
The state update is x <- x + h * v with h = t_next - t (negative when sampling), in x's dtype.

Fixed-grid methods (`solve`), with N = len(timesteps) - 1 steps; NFE = number of velocity evaluations:

    euler       x + h v(x, t)                                              order 1, NFE N
    midpoint    x + h v(x + h/2 v(x, t), t + h/2)                          order 2, NFE 2N
    heun        x + h/2 (v(x, t) + v(x + h v(x, t), t + h))     order 2, NFE 2N - 1 if the grid ends
                at t = 0: as in Karras et al. 2022 (algorithm 1, step 8), the last step into t = 0 is an Euler
                step, since paths other than RF are singular or degenerate exactly at t = 0; else 2N
    rk4         classic Runge-Kutta 4                                      order 4, NFE 4N

`solve_adaptive` is Dormand-Prince 5(4) with local extrapolation, FSAL and the standard step-size control
(Hairer, Norsett & Wanner, "Solving ODEs I", II.4), the "RK45" the rectified-flow paper (Liu et al. 2022)
samples with; it returns (x, nfe).
Any strictly monotone grid works, so the same code also integrates 0 -> 1 (inversion).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rectiflow.errors import ConfigError, RectiflowError

log = logging.getLogger(__name__)

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, float, Tensor], None]

METHODS = ("euler", "midpoint", "heun", "rk4")


def _t_tensor(t: float, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor(t, dtype=dtype, device=x.device)


def _check_grid(timesteps: Tensor | list[float]) -> list[float]:
    ts = [float(v) for v in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)]
    if len(ts) < 2:
        raise ConfigError(f"a time grid needs at least 2 points, got {len(ts)}")
    diffs = [b - a for a, b in zip(ts[:-1], ts[1:])]
    if not (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)):
        raise ConfigError("the time grid must be strictly monotone (e.g. timestep_grid(steps): 1 -> 0)")
    return ts


def solver_nfe(method: str, timesteps: Tensor | list[float]) -> int:
    """Number of velocity evaluations `solve` makes for this method and grid (see module doc)."""
    ts = _check_grid(timesteps)
    n = len(ts) - 1
    per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    if method not in per_step:
        raise ConfigError(f"unknown solver {method!r}; choose one of {', '.join(METHODS)}")
    return per_step[method] * n - (1 if method == "heun" and ts[-1] == 0.0 else 0)


def _step(f: VelocityFn, method: str, x: Tensor, t: float, tn: float, last_to_zero: bool) -> Tensor:
    h = tn - t
    k1 = f(x, _t_tensor(t, x))
    if method == "euler" or (method == "heun" and last_to_zero):
        return x + h * k1
    if method == "midpoint":
        return x + h * f(x + (0.5 * h) * k1, _t_tensor(t + 0.5 * h, x))
    if method == "heun":
        k2 = f(x + h * k1, _t_tensor(tn, x))
        return x + (0.5 * h) * (k1 + k2)
    # rk4 (Kutta 1901): weights 1/6, 1/3, 1/3, 1/6
    tm = _t_tensor(t + 0.5 * h, x)
    k2 = f(x + (0.5 * h) * k1, tm)
    k3 = f(x + (0.5 * h) * k2, tm)
    k4 = f(x + h * k3, _t_tensor(tn, x))
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def solve(
    velocity_fn: VelocityFn,
    x: Tensor,
    timesteps: Tensor | list[float],
    method: str = "euler",
    *,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate dx/dt = velocity_fn(x, t) from timesteps[0] to timesteps[-1]; returns x at timesteps[-1].

    callback(i, t_next, x_next) is called after step i (0-based) with the new state, e.g. for previews.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown solver {method!r}; choose one of {', '.join(METHODS)}")
    ts = _check_grid(timesteps)
    n = len(ts) - 1
    for i in tqdm(range(n), desc=f"sampling ({method})", disable=not progress, leave=False):
        last_to_zero = i == n - 1 and ts[-1] == 0.0
        x = _step(velocity_fn, method, x, ts[i], ts[i + 1], last_to_zero)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", table 5.2 (RK5(4)7M).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))


def _rms(x: Tensor) -> float:
    return float(torch.sqrt(torch.mean(x.double() ** 2)))


def _dp_step(f: VelocityFn, x: Tensor, t: float, h: float, k1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand-Prince attempt: (x5, error estimate x5 - x4, k7 = v(x5, t + h) for FSAL). 6 NFE."""
    ks = [k1]
    for i in range(1, 7):
        xi = x + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
        ks.append(f(xi, _t_tensor(t + _DP_C[i] * h, x)))
    x5 = xi  # stage 7 is evaluated at the 5th-order solution (row 7 of A equals b5)
    err = h * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
    return x5, err, ks[6]


def _initial_step(f: VelocityFn, x: Tensor, t0: float, k1: Tensor, direction: float, scale: Tensor) -> float:
    """Hairer-Norsett-Wanner II.4 starting step (one extra evaluation)."""
    d0, d1 = _rms(x / scale), _rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    k2 = f(x + direction * h0 * k1, _t_tensor(t0 + direction * h0, x))
    d2 = _rms((k2 - k1) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def solve_adaptive(
    velocity_fn: VelocityFn,
    x: Tensor,
    t0: float = 1.0,
    t1: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    *,
    progress: bool = False,
) -> tuple[Tensor, int]:
    """Dormand-Prince 5(4) from t0 to t1 with error control; returns (x(t1), number of evaluations).

    A step is accepted when rms((x5 - x4) / (atol + rtol max(|x|, |x5|))) <= 1; the next step is scaled by
    0.9 err^(-1/5), clipped to [0.2, 10]. Raises RectiflowError after max_steps attempted steps.
    """
    if t0 == t1:
        return x, 0
    if rtol <= 0 and atol <= 0:
        raise ConfigError("solve_adaptive needs rtol > 0 or atol > 0")
    direction = 1.0 if t1 > t0 else -1.0
    t, k1 = float(t0), velocity_fn(x, _t_tensor(t0, x))
    nfe = 1
    h = _initial_step(velocity_fn, x, t, k1, direction, atol + rtol * x.abs())
    nfe += 1
    bar = tqdm(total=abs(t1 - t0), desc="sampling (dopri5)", disable=not progress, leave=False)
    for _ in range(max_steps):
        h = min(h, abs(t1 - t))
        x5, err, k7 = _dp_step(velocity_fn, x, t, direction * h, k1)
        nfe += 6
        e = _rms(err / (atol + rtol * torch.maximum(x.abs(), x5.abs())))
        if e <= 1.0:
            t = t1 if abs(t1 - t) <= h else t + direction * h
            x, k1 = x5, k7
            bar.update(h)
            if t == t1:
                bar.close()
                log.debug("dopri5 finished with %d evaluations", nfe)
                return x, nfe
        if not math.isfinite(e):
            raise RectiflowError("adaptive solver hit a non-finite velocity; check the model output for NaN")
        h *= min(10.0, max(0.2, 0.9 * max(e, 1e-10) ** (-1 / 5)))
    bar.close()
    raise RectiflowError(
        f"adaptive solver did not reach t={t1} in max_steps={max_steps} (at t={t:.4g}); "
        "raise max_steps or loosen rtol/atol"
    )

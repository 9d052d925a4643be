"""How straight a velocity field's trajectories are, and how close few-step samples get to many-step ones.

Liu et al. 2022 ("Flow Straight and Fast", eq. 8) define the straightness of a flow Z as
    S(Z) = integral_0^1 E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt,
zero exactly when every trajectory is a straight line travelled at constant speed, in which case ONE Euler
step lands on the trajectory's endpoint. In our convention (t = 1 noise, t = 0 data, dx/dt = v) the same
quantity is S = E_t E ||(z_1 - z_0) - v(z_t, t)||^2 with z_1 the starting noise and z_0 the endpoint the
model's own ODE reaches from it. We estimate it on an N-step Euler trajectory (N = 64 by default): t_i on the
linear grid 1 = t_0 > ... > t_N = 0, v_i = v(z_{t_i}, t_i), z_0 = z_1 - sum_i (t_i - t_{i+1}) v_i, and
S = mean over samples and i of the squared deviation. On a uniform grid z_1 - z_0 is the mean of the v_i, so
S is the variance of the velocity along each path (0 for straight paths, to float precision).

Normalisation: the paper sums over dimensions; we report the MEAN over the D elements of a sample, i.e. the
paper's value divided by D, so numbers are comparable across image sizes (a 2-D toy then reports S / 2).

    report = straightness(velocity_fn, noise, steps=64, buckets=8)
    report.value, report.by_bucket, report.endpoint          # float, [buckets] floats, z_0 [B, ...]
    errs = endpoint_errors(velocity_fn, noise, report.endpoint, steps=(1, 2, 4))   # {1: rms, 2: ..., 4: ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rectiflow.errors import ConfigError
from rectiflow.flow.schedules import timestep_grid
from rectiflow.flow.solvers import VelocityFn, solve

__all__ = ["Straightness", "straightness", "endpoint_errors", "rms_distance"]


@dataclass(frozen=True)
class Straightness:
    """value: S (mean over samples, times and elements); per_sample: S of each trajectory [B];
    by_bucket: S restricted to the times in each of `buckets` equal t intervals, bucket k covering
    [k / buckets, (k + 1) / buckets) (k = 0 nearest the data); endpoint: z_0 of the Euler trajectory;
    steps: the Euler steps used."""

    value: float
    per_sample: Tensor
    by_bucket: list[float]
    endpoint: Tensor
    steps: int


def straightness(velocity_fn: VelocityFn, noise: Tensor, steps: int = 64, buckets: int = 8) -> Straightness:
    """S of the trajectories starting at `noise` [B, ...] (t = 1), integrated with `steps` Euler steps on the
    linear grid. Memory: the `steps` velocities of the batch are kept until the endpoint is known."""
    if steps < 1 or buckets < 1 or steps % buckets:
        raise ConfigError(f"straightness needs steps >= 1 divisible by buckets >= 1, got {steps} and "
                          f"{buckets}")
    ts = timestep_grid(steps).tolist()  # [steps + 1], 1 -> 0, uniform
    velocities = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        v = velocity_fn(x, t)
        velocities.append(v.detach())
        return v

    endpoint = solve(recording, noise, ts, method="euler")
    direction = (noise - endpoint).double()  # z_1 - z_0 [B, ...]
    b = noise.shape[0]
    # [steps, B]: per time and sample, the mean over elements of ((z_1 - z_0) - v_i)^2
    dev = torch.stack([((direction - v.double()) ** 2).reshape(b, -1).mean(dim=1) for v in velocities])
    # the velocity at t_i stands for the interval (t_{i+1}, t_i]; the grid runs from t = 1 down, so the
    # first steps / buckets rows belong to the bucket nearest the noise (k = buckets - 1)
    per_bucket = dev.reshape(buckets, steps // buckets, b).mean(dim=(1, 2)).flip(0)  # [buckets], k=0 at data
    return Straightness(value=float(dev.mean()), per_sample=dev.mean(dim=0).float(),
                        by_bucket=[float(s) for s in per_bucket], endpoint=endpoint, steps=steps)


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample root-mean-square distance over elements: [B, ...] x 2 -> [B] (float64)."""
    return ((a.double() - b.double()) ** 2).reshape(a.shape[0], -1).mean(dim=1).sqrt()


def endpoint_errors(velocity_fn: VelocityFn, noise: Tensor, reference: Tensor,
                    steps: Sequence[int] = (1, 2, 4),
                    *, method: str = "euler", shift=None, seq_len: int | None = None) -> dict[int, float]:
    """Mean over samples of the RMS distance between the `n`-step endpoint (solver `method`, grid
    timestep_grid(n, shift=shift, seq_len=seq_len)) and `reference` (e.g. `straightness(...).endpoint` or an
    adaptive solve), for each n in `steps`."""
    out = {}
    for n in steps:
        x = solve(velocity_fn, noise, timestep_grid(n, shift=shift, seq_len=seq_len), method=method)
        out[int(n)] = float(rms_distance(x, reference).mean())
    return out


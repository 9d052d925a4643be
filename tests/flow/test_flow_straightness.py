"""Straightness (Liu et al. 2022 eq. 8) against closed forms, and one reflow on a 2-D toy (their figure 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rectiflow.errors import ConfigError
from rectiflow.flow import (
    endpoint_errors,
    get_path,
    sample_timesteps,
    solve,
    straightness,
    timestep_grid,
    training_pair,
)


def _scaled_gaussian_field(sigma: float):
    """The exact velocity of x_t = ((1 - t) sigma + t) z (data N(0, sigma^2), noise N(0, 1), coupled by z):
    every trajectory is a straight line travelled at constant speed (1 - sigma) z."""

    def v(x, t):
        return (1.0 - sigma) * x / ((1.0 - t) * sigma + t)

    return v


def test_straight_field_has_zero_straightness_and_exact_few_step_endpoints():
    noise = torch.randn(16, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = straightness(_scaled_gaussian_field(0.3), noise, steps=64, buckets=8)
    assert report.value == pytest.approx(0.0, abs=1e-24)
    assert max(report.by_bucket) == pytest.approx(0.0, abs=1e-24)
    torch.testing.assert_close(report.endpoint, 0.3 * noise, rtol=1e-12, atol=1e-12)
    errs = endpoint_errors(_scaled_gaussian_field(0.3), noise, report.endpoint, steps=(1, 2, 4))
    assert max(errs.values()) < 1e-12


def test_varying_speed_along_a_line_matches_the_closed_form():
    # v = 2 t a: a straight path whose speed changes; S = a^2 / 3 in the limit, and on an N-step Euler grid
    # exactly the variance of 2 t_i a over t_i = 1, (N-1)/N, ..., 1/N: a^2 (N^2 - 1) / (3 N^2).
    a, n = 1.5, 64
    noise = torch.zeros(3, 5, dtype=torch.float64)
    report = straightness(lambda x, t: 2 * t * torch.full_like(x, a), noise, steps=n, buckets=4)
    assert report.value == pytest.approx(a * a * (n * n - 1) / (3 * n * n), rel=1e-12)
    # the deviation is largest at both ends of [0, 1] and smallest in the middle buckets
    assert report.by_bucket[0] > report.by_bucket[1] and report.by_bucket[3] > report.by_bucket[2]


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        straightness(lambda x, t: x, torch.zeros(1, 2), steps=10, buckets=4)


# ---- a 2-D toy: one reflow straightens the paths ---------------------------------------------------------


class ToyField(nn.Module):
    def __init__(self, width: int = 96):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.expand(x.shape[0])[:, None].to(x.dtype)], dim=1))


def _two_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """Data: an equal mixture of N((0, +-2), 0.3^2 I)."""
    sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    return torch.cat([torch.zeros(n, 1), 2.0 * sign], dim=1) + 0.3 * torch.randn(n, 2, generator=g)


def _fit(model: nn.Module, x0_fn, steps: int, g: torch.Generator) -> nn.Module:
    """Rectified-flow training; x0_fn(n) -> (x0 [n, 2], eps [n, 2]) draws the coupling."""
    path, opt = get_path("rectified_flow"), torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x0, eps = x0_fn(512)
        t = sample_timesteps("uniform", x0.shape[0], g)
        x_t, target = training_pair(path, x0, eps, t)
        loss = ((model(x_t, t) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _measure(model: nn.Module, noise: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        s = straightness(model, noise, steps=64)
        return s.value, endpoint_errors(model, noise, s.endpoint, steps=(1,))[1]


def test_one_reflow_straightens_a_two_gaussian_toy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # 1-RF: independent coupling of noise and data
    rf1 = _fit(ToyField(), lambda n: (_two_gaussians(n, g), torch.randn(n, 2, generator=g)), 600, g)
    # couplings: noise -> the 1-RF model's ODE endpoint (64 Euler steps), as `rectiflow reflow pairs` does
    z1 = torch.randn(4096, 2, generator=g)
    with torch.no_grad():
        z0 = solve(rf1, z1, timestep_grid(64))
    # 2-RF: initialised from 1-RF, trained on the fixed pairs (x_t = (1 - t) z0 + t z1)
    rf2 = ToyField()
    rf2.load_state_dict(rf1.state_dict())

    def pairs(n):
        i = torch.randint(0, z1.shape[0], (n,), generator=g)
        return z0[i], z1[i]

    rf2 = _fit(rf2, pairs, 600, g)
    test_noise = torch.randn(1024, 2, generator=torch.Generator().manual_seed(1))
    s1, e1 = _measure(rf1, test_noise)
    s2, e2 = _measure(rf2, test_noise)
    assert s1 > 0.05  # the independent coupling's paths are curved (they cross in the middle)
    assert s2 < 0.5 * s1, (s1, s2)
    assert e2 < 0.7 * e1, (e1, e2)

"""Timestep samplers vs their closed-form densities (KS), loss weights, determinism, errors."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import cumulative_trapezoid

from rectiflow.errors import ConfigError
from rectiflow.flow import LOSS_WEIGHTS, SAMPLERS, loss_weight, sample_timesteps, timestep_grid
from rectiflow.flow.timesteps import PDFS, f_mode

CASES = [
    ("uniform", {}),
    ("logit_normal", {}),
    ("logit_normal", {"m": 0.5, "s": 0.6}),
    ("mode", {}),
    ("mode", {"s": -0.5}),
    ("cosmap", {}),
    ("u_shaped", {}),
    ("u_shaped", {"a": 1.5}),
]


def _cdf_from_pdf(name, params):
    """CDF by integrating the closed-form density on a fine grid (independent of how the sampler works)."""
    t = np.concatenate(  # dense near the endpoints, where logit-normal / cosmap densities are steep
        [np.linspace(0, 1e-3, 2001), np.linspace(1e-3, 0.999, 20001)[1:], 1 - np.linspace(1e-3, 0, 2001)[1:]]
    )
    t = np.clip(t, 1e-12, 1 - 1e-12)
    pdf = PDFS[name](torch.from_numpy(t), **params).numpy()
    cdf = cumulative_trapezoid(pdf, t, initial=0.0)
    return lambda x: np.interp(x, t, cdf), cdf[-1]


@pytest.mark.parametrize("name,params", CASES)
def test_samples_follow_the_closed_form_density(name, params):
    cdf, total = _cdf_from_pdf(name, params)
    assert abs(total - 1.0) < 1e-4  # the density integrates to one
    t = sample_timesteps(name, 20000, torch.Generator().manual_seed(1234), dtype=torch.float64, **params)
    assert t.shape == (20000,) and t.min() >= 0 and t.max() <= 1
    res = stats.kstest(t.numpy(), cdf)
    assert res.pvalue > 1e-3, res


@pytest.mark.parametrize("name,params", CASES[1:])
def test_samplers_are_not_uniform(name, params):
    """Guards the KS test above against being vacuous: each non-uniform sampler fails it for uniform."""
    t = sample_timesteps(name, 20000, torch.Generator().manual_seed(1234), dtype=torch.float64, **params)
    assert stats.kstest(t.numpy(), "uniform").pvalue < 1e-6


def test_densities_closed_forms():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    # logit-normal: density of sigmoid(N(m, s^2)) by change of variables
    m, s = 0.3, 0.8
    logit = torch.log(t / (1 - t))
    expect = torch.from_numpy(stats.norm.pdf(logit.numpy(), m, s)) / (t * (1 - t))
    assert torch.allclose(PDFS["logit_normal"](t, m=m, s=s), expect)
    # mode with s = 0 is uniform; in general 1 / |f_mode'| at u = f_mode^{-1}(t) (finite differences)
    assert torch.allclose(PDFS["mode"](t, s=0.0), torch.ones_like(t))
    u = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (f_mode(u + h, 1.29) - f_mode(u - h, 1.29)) / (2 * h)
    assert torch.allclose(PDFS["mode"](f_mode(u, 1.29), s=1.29), 1 / fd.abs(), rtol=1e-6)
    # cosmap: derivative of its inverse u = (2/pi) atan(t / (1 - t))
    inv = lambda x: (2 / math.pi) * torch.atan(x / (1 - x))  # noqa: E731
    assert torch.allclose(PDFS["cosmap"](t), (inv(t + h) - inv(t - h)) / (2 * h), rtol=1e-6)
    # u_shaped: Lee et al. 2024's construction, an exponential a e^{ax} / (e^a - 1) on [0, 1] mirrored with
    # probability 1/2, has the density (e^{at} + e^{a(1-t)}) a / (2 (e^a - 1))
    def expo(x, a):
        return a * torch.exp(a * x) / (math.exp(a) - 1)

    for a in (4.0, 1.5):
        assert torch.allclose(PDFS["u_shaped"](t, a=a), 0.5 * (expo(t, a) + expo(1 - t, a)))
    # U-shaped: cosh(2) = 3.76 times denser at either end than in the middle for a = 4
    ends = PDFS["u_shaped"](torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert math.isclose(ends[0] / ends[1], math.cosh(2.0)) and math.isclose(ends[0], ends[2])


def test_loss_weights():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float32)
    assert torch.equal(loss_weight("none", t), torch.ones_like(t))
    for name in ("logit_normal", "mode", "cosmap", "u_shaped"):
        w = loss_weight(name, t)
        assert w.dtype == torch.float32 and torch.allclose(w, PDFS[name](t.double()).float())
    w = loss_weight("logit_normal", t, m=1.0, s=0.5)
    assert torch.allclose(w, PDFS["logit_normal"](t.double(), 1.0, 0.5).float())
    # parity with diffusers' SD3 training weights for the schemes it shares with us
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    for name in ("cosmap", "sigma_sqrt"):
        ref = compute_loss_weighting_for_sd3(name, t)
        assert torch.allclose(loss_weight(name, t), ref, rtol=1e-6), name
    assert set(LOSS_WEIGHTS) == {"none", "logit_normal", "mode", "cosmap", "u_shaped", "sigma_sqrt"}


def test_importance_weighting_equals_sampling():
    """E_{t~pi}[g(t)] == E_{t~U}[pi(t) g(t)] (SD3 3.1: a sampler is a loss weight), Monte Carlo."""
    g = torch.Generator().manual_seed(7)
    f = lambda t: torch.sin(3 * t) + t**2  # noqa: E731
    for name in ("logit_normal", "mode", "cosmap", "u_shaped"):
        direct = f(sample_timesteps(name, 200000, g, dtype=torch.float64)).mean()
        u = sample_timesteps("uniform", 200000, g, dtype=torch.float64)
        weighted = (loss_weight(name, u) * f(u)).mean()
        assert abs(direct - weighted) < 1e-2, name


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_determinism_and_dtype(name):
    a = sample_timesteps(name, 64, torch.Generator().manual_seed(5))
    b = sample_timesteps(name, 64, torch.Generator().manual_seed(5))
    c = sample_timesteps(name, 64, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    # the function form equals the dispatcher
    assert torch.equal(SAMPLERS[name](64, generator=torch.Generator().manual_seed(5), device="cpu"), a)


def test_bad_inputs():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="unknown timestep sampler"):
        sample_timesteps("beta", 4, g)
    with pytest.raises(ConfigError, match="bad parameters"):
        sample_timesteps("uniform", 4, g, s=1.0)
    with pytest.raises(ConfigError, match="mode sampling needs"):
        sample_timesteps("mode", 4, g, s=2.0)
    with pytest.raises(ConfigError, match="s > 0"):
        sample_timesteps("logit_normal", 4, g, s=0.0)
    with pytest.raises(ConfigError, match="a > 0"):
        sample_timesteps("u_shaped", 4, g, a=0.0)
    with pytest.raises(ConfigError, match="CPU generator"):
        sample_timesteps("uniform", 4, None)
    with pytest.raises(ConfigError, match=">= 0"):
        sample_timesteps("uniform", -1, g)
    with pytest.raises(ConfigError, match="unknown loss weighting"):
        loss_weight("snr", torch.rand(3))
    with pytest.raises(ConfigError, match="bad parameters"):
        loss_weight("cosmap", torch.rand(3), s=1.0)
    with pytest.raises(ConfigError, match="no parameters"):
        loss_weight("none", torch.rand(3), s=1.0)


def test_grid_sampler_draws_the_euler_start_times():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("grid", 4000, g, steps=4)
    assert set(t.tolist()) == {1.0, 0.75, 0.5, 0.25}
    counts = torch.stack([(t == v).sum() for v in (1.0, 0.75, 0.5, 0.25)]).float()
    assert counts.min() > 900  # about uniform: 1000 each
    assert torch.equal(sample_timesteps("grid", 5, g, steps=1.0), torch.ones(5))  # as a TOML config gives it
    with pytest.raises(ConfigError, match="steps >= 1"):
        sample_timesteps("grid", 4, g, steps=0)
    with pytest.raises(ConfigError, match="integer"):
        sample_timesteps("grid", 4, g, steps=2.5)


def test_grid_sampler_with_a_shift_draws_the_shifted_sampler_times():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("grid", 400, g, steps=4, shift=3.0)
    grid = timestep_grid(4, shift=3.0)[:-1].float()  # the times `--steps 4 --shift 3` queries: 1, .9, .75, .5
    assert torch.allclose(torch.tensor(sorted(set(t.tolist()), reverse=True)), grid)
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        sample_timesteps("grid", 4, g, steps=4, shift=0.0)

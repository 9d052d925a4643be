"""Paths: target / velocity consistency, SD3 weights, EDM preconditioning, LDM schedule parity."""

import math

import pytest
import torch
from torch.autograd.functional import jvp  # double-backward jvp (torch.func.jvp warns inside torch)

from rectiflow.errors import ConfigError
from rectiflow.flow import (
    PATHS,
    equivalent_rf_weight,
    get_path,
    solve_adaptive,
    t_from_log_snr,
    training_pair,
    velocity_fn_from_model,
)

NAMES = sorted(PATHS)


def _data(seed=0, b=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 5, generator=g, dtype=dtype)
    eps = torch.randn(b, 3, 4, 5, generator=g, dtype=dtype)
    t = 0.01 + 0.98 * torch.rand(b, generator=g, dtype=dtype)
    return x0, eps, t


@pytest.mark.parametrize("name", NAMES)
def test_velocity_of_target_is_dxt_dt(name):
    """to_velocity(target) equals the true d x_t / dt (forward-mode autodiff of interpolate in t)."""
    p = get_path(name)
    x0, eps, t = _data()
    _, dxdt = jvp(lambda s: p.interpolate(x0, eps, s), (t,), (torch.ones_like(t),))
    x_t, tgt = training_pair(p, x0, eps, t)
    v = p.to_velocity(tgt, x_t, t)
    assert torch.allclose(v, dxdt, rtol=1e-9, atol=1e-9)
    assert torch.allclose(p.to_x0(tgt, x_t, t), x0, atol=1e-10)
    assert torch.allclose(p.to_eps(tgt, x_t, t), eps, atol=1e-10)
    # and a finite difference, independent of autograd through our coefficient code
    h = 1e-6
    fd = (p.interpolate(x0, eps, t + h) - p.interpolate(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(v, fd, rtol=1e-6, atol=1e-6)


def test_rectified_flow_is_the_project_convention():
    p = get_path("rectified_flow")
    x0, eps, t = _data()
    tb = t.view(-1, 1, 1, 1)
    assert torch.equal(p.interpolate(x0, eps, t), (1 - tb) * x0 + tb * eps)
    assert torch.equal(p.target(x0, eps, t), eps - x0)
    assert torch.equal(p.interpolate(x0, eps, 0.0), x0)
    assert torch.equal(p.interpolate(x0, eps, 1.0), eps)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints_are_finite_and_scalar_t_works(name):
    p = get_path(name)
    x0, eps, _ = _data()
    for t in (0.0, 1.0, torch.tensor(0.0), torch.zeros(6), torch.ones(6)):
        x_t = p.interpolate(x0, eps, t)
        out = p.target(x0, eps, t)
        for y in (x_t, out, p.to_velocity(out, x_t, t), p.to_x0(out, x_t, t), p.model_input(x_t, t)):
            assert torch.isfinite(y).all()
    # clean data at t = 0, up to the documented clamp t_min = T_EPS (b(T_EPS) = 0.003 / 0.0018 for LDM / EDM)
    assert torch.allclose(p.interpolate(x0, eps, 0.0), x0, atol=2e-2 if p.t_min > 0 else 1e-12)
    assert p.coeffs(0.0)[1].item() < 5e-3


@pytest.mark.parametrize("name", NAMES)
def test_float32_in_float32_out(name):
    p = get_path(name)
    x0, eps, t = _data(dtype=torch.float32)
    x_t = p.interpolate(x0, eps, t)
    assert x_t.dtype == torch.float32
    assert p.to_velocity(p.target(x0, eps, t), x_t, t).dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_eps_weight_matches_its_definition(name):
    """SD3 section 2: unweighted loss ||out - target||^2 = -1/2 w_t lambda'_t ||eps_hat - eps||^2."""
    p = get_path(name)
    x0, eps, t = _data(seed=3)
    x_t, tgt = training_pair(p, x0, eps, t)
    delta = 1e-3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = (delta**2).flatten(1).sum(1)
    eps_err = ((p.to_eps(tgt + delta, x_t, t) - eps) ** 2).flatten(1).sum(1)
    _, dlam = jvp(p.log_snr, (t,), (torch.ones_like(t),))
    w = -2.0 * loss / (dlam * eps_err)
    assert torch.allclose(w, p.eps_weight(t), rtol=1e-6)


def test_eps_weights_are_sd3s_up_to_a_constant():
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    rf = get_path("rectified_flow")
    assert torch.allclose(rf.eps_weight(t), t / (1 - t))  # w_t^RF = t / (1 - t)
    cos = get_path("v_cosine")
    assert torch.allclose(cos.eps_weight(t), (2 / math.pi) * torch.exp(-cos.log_snr(t) / 2))  # e^{-lambda/2}
    edm = get_path("edm")  # w^EDM = N(lambda | -2 P_m, (2 P_s)^2) (e^{-lambda} + 0.5^2)
    lam = edm.log_snr(t)
    normal = torch.exp(-((lam + 2 * -1.2) ** 2) / (2 * (2 * 1.2) ** 2)) / (2 * 1.2 * math.sqrt(2 * math.pi))
    assert torch.allclose(edm.eps_weight(t), 8 * normal * (torch.exp(-lam) + 0.25), rtol=1e-9)


def test_equivalent_rf_weight():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    assert torch.allclose(equivalent_rf_weight(get_path("rectified_flow"), t), torch.ones_like(t))
    # SD3: cosine with v-prediction has w = e^{-lambda/2}, the same as RF's t/(1-t): a constant ratio
    assert torch.allclose(equivalent_rf_weight(get_path("v_cosine"), t), torch.full_like(t, 2 / math.pi))
    edm = get_path("edm")
    t_e = t_from_log_snr(edm, get_path("rectified_flow").log_snr(t))
    assert torch.allclose(edm.log_snr(t_e), get_path("rectified_flow").log_snr(t), atol=1e-9)


def test_eps_linear_matches_ldm_discrete_schedule():
    """alpha_bar at t = (i + 1) / 1000 equals diffusers' DDPMScheduler scaled_linear cumprod."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref = sched.alphas_cumprod.double()
    p = get_path("eps_linear")
    i = torch.arange(1000, dtype=torch.float64)
    a, b, _, _ = p.coeffs((i + 1) / 1000)
    assert torch.allclose(a**2, ref, rtol=2e-6)
    assert torch.allclose(a**2 + b**2, torch.ones_like(a))
    assert p.log_alpha_bar(0.0)[0].item() == 0.0  # t = 0 is clean data (before clamping)


def test_edm_sigma_and_preconditioning():
    p = get_path("edm")
    # log sigma(t) is normal(P_m, P_s) quantile: median at t = 1/2, P_m + P_s at t = Phi(1)
    assert math.isclose(p.sigma(0.5).item(), math.exp(-1.2), rel_tol=1e-12)
    assert math.isclose(p.sigma(0.5 * (1 + math.erf(1 / math.sqrt(2)))).item(), 1.0, rel_tol=1e-9)
    # c_in gives the network unit-variance input for data of std sigma_data = 0.5 (Karras 2022, sec. 5)
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        x_in = p.model_input(p.interpolate(x0, eps, t), t)
        assert abs(x_in.std().item() - 1.0) < 0.02


def _gaussian_model(p, mu, s):
    """Exact network output for data N(mu, s^2): target(E[x0|x_t], E[eps|x_t], t), fed model_input(x_t)."""

    def model_fn(net_in, t):
        x_t = net_in / p.model_input(torch.ones_like(net_in), t)
        a, b, _, _ = p.coeffs(t)
        var = a * a * s * s + b * b
        x0 = mu + a * s * s / var * (x_t - a * mu)
        eps = b / var * (x_t - a * mu)
        return p.target(x0, eps, t)

    return model_fn


@pytest.mark.parametrize("name", NAMES)
def test_every_path_samples_the_same_probability_flow(name):
    """With the exact Gaussian denoiser, each path's ODE maps x(1) to the same data point mu + s z."""
    p = get_path(name)
    mu, s = 0.7, 0.4
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a1, b1, _, _ = p.coeffs(1.0)
    x1 = a1 * mu + torch.sqrt(a1**2 * s**2 + b1**2) * z  # exact marginal at t = 1 (t_max for EDM)
    v = velocity_fn_from_model(p, _gaussian_model(p, mu, s))
    # EDM's sigma'(t) diverges at both ends of t: a uniform grid converges slowly there, so use dopri5
    x, _ = solve_adaptive(v, x1, p.t_max, p.t_min, rtol=1e-8, atol=1e-8)
    a0, b0, _, _ = p.coeffs(p.t_min)
    expect = a0 * mu + torch.sqrt(a0**2 * s**2 + b0**2) * z
    assert torch.allclose(x, expect, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="unknown flow path"):
        get_path("ddpm")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_path("rectified_flow", beta_start=0.1)
    with pytest.raises(ConfigError, match="t_min"):
        get_path("v_cosine", t_min=0.5, t_max=0.2)
    with pytest.raises(ConfigError, match="edm needs"):
        get_path("edm", t_max=1.0)
    with pytest.raises(ConfigError, match="eps_linear needs"):
        get_path("eps_linear", beta_start=0.02, beta_end=0.01)
    x = torch.zeros(4, 3)
    with pytest.raises(ConfigError, match="batch"):
        get_path("rectified_flow").interpolate(x, x, torch.zeros(3))

"""Inference grids and shifts: closed forms, the SNR meaning of the SD3 shift, parity with diffusers."""

import math

import numpy as np
import pytest
import torch

from rectiflow.errors import ConfigError
from rectiflow.flow import flux_mu, get_path, linear_grid, sd3_shift, time_shift, timestep_grid


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("shift", [None, "flux", 3.0, 0.5])
def test_grids_start_at_one_end_at_zero_and_decrease(steps, shift):
    g = timestep_grid(steps, shift=shift, seq_len=1024)
    assert g.shape == (steps + 1,) and g.dtype == torch.float64
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    assert (g[1:] < g[:-1]).all()
    assert timestep_grid(steps, shift=shift, seq_len=1024, dtype=torch.float32).dtype == torch.float32


def test_linear_grid():
    assert torch.allclose(linear_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    g = linear_grid(3, t_last=0.001)
    assert torch.allclose(g, torch.tensor([1.0, 0.5005, 0.001, 0.0], dtype=torch.float64))


def test_flux_mu_is_linear_through_the_published_points():
    assert math.isclose(flux_mu(256), 0.5) and math.isclose(flux_mu(4096), 1.15)
    assert math.isclose(flux_mu(2176), 0.825)  # midpoint of the line
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (64, 256, 1024, 1369, 4096, 8192):
        assert math.isclose(flux_mu(n), calculate_shift(n), rel_tol=1e-12)


def test_time_shift_and_sd3_shift_closed_forms():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    mu = 0.9
    s = time_shift(mu, 1.0, t)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    half = time_shift(mu, 1.0, torch.tensor(0.5, dtype=torch.float64)).item()
    assert math.isclose(half, math.exp(mu) / (math.exp(mu) + 1), rel_tol=1e-12)
    # with sigma = 1, FLUX's shift is SD3's with alpha = e^mu
    assert torch.allclose(s, sd3_shift(t, math.exp(mu)))
    assert math.isclose(sd3_shift(torch.tensor(0.5), 3.0).item(), 0.75)
    assert torch.equal(sd3_shift(t, 1.0), t)
    s2 = time_shift(mu, 2.0, t[1:-1])
    assert torch.allclose(s2, math.exp(mu) / (math.exp(mu) + (1 / t[1:-1] - 1) ** 2))


def test_sd3_shift_scales_the_snr():
    """SD3 5.3.2: shifting by alpha lowers the RF log-SNR by exactly 2 log(alpha) at every step."""
    rf = get_path("rectified_flow")
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for alpha in (0.5, 3.0, 6.0):
        assert torch.allclose(rf.log_snr(sd3_shift(t, alpha)), rf.log_snr(t) - 2 * math.log(alpha))


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1's scheduler_config.json values
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


@pytest.mark.parametrize("steps", [1, 4, 20, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 1369, 4096])
def test_flux_shift_equals_diffusers_scheduler(steps, seq_len):
    sched = _flux_scheduler()
    mu = flux_mu(seq_len)
    # FluxPipeline passes sigmas = linspace(1, 1/N, N): the grid is BFL's linspace(1, 0, N + 1), shifted
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = timestep_grid(steps, shift="flux", seq_len=seq_len)
    assert torch.allclose(sched.sigmas.double(), ours, rtol=0, atol=1e-6)
    # the scheduler's own grid (no sigmas): linspace(1, 1/num_train_timesteps, N), shifted, then 0
    sched.set_timesteps(steps, mu=mu)
    ours = timestep_grid(steps, shift="flux", seq_len=seq_len, t_last=1e-3)
    assert torch.allclose(sched.sigmas.double(), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 10, 28])
def test_sd3_static_shift_equals_diffusers_scheduler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's config
    sched.set_timesteps(steps)
    # diffusers' default grid ends at sigma_min = shift(1/1000), which it then shifts once more
    ours = timestep_grid(steps, shift=3.0, t_last=sd3_shift(torch.tensor(1e-3), 3.0).item())
    assert torch.allclose(sched.sigmas.double(), ours, rtol=0, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="steps"):
        timestep_grid(0)
    with pytest.raises(ConfigError, match="steps"):
        linear_grid(2.5)
    with pytest.raises(ConfigError, match="seq_len"):
        timestep_grid(4, shift="flux")
    with pytest.raises(ConfigError, match="unknown shift"):
        timestep_grid(4, shift="karras")
    with pytest.raises(ConfigError, match="alpha"):
        timestep_grid(4, shift=-1.0)
    with pytest.raises(ConfigError, match="t_last"):
        linear_grid(4, t_last=1.5)
    with pytest.raises(ConfigError, match="seq_len"):
        flux_mu(0)
    with pytest.raises(ConfigError, match="sigma"):
        time_shift(1.0, 0.0, torch.rand(3))

"""DMD's gradient (rectiflow.flow.distribution_matching): the surrogate's gradient is DMD's normalised score
difference, and with exact denoisers it moves a generator onto the data distribution, its spread included
(what a regression onto denoised targets does not do)."""

from __future__ import annotations

import torch

from rectiflow.flow import denoised, distribution_matching_gradient, distribution_matching_loss


def gaussian_denoiser(x_t, t, mean, std):
    """E[x0 | x_t] for x0 ~ N(mean, std^2), x_t = (1 - t) x0 + t eps: the exact posterior mean."""
    var = std ** 2
    gain = (1 - t) * var / ((1 - t) ** 2 * var + t ** 2)
    return mean + gain * (x_t - (1 - t) * mean)


def test_denoised_inverts_the_straight_path():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.9])
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    assert torch.allclose(denoised(x_t, eps - x0, t), x0, atol=1e-6)
    assert torch.allclose(denoised(x_t, eps - x0, torch.tensor(0.5)), x_t - 0.5 * (eps - x0))


def test_the_surrogate_gradient_is_dmds_normalised_score_difference():
    x0 = torch.randn(4, 3, 2, 2, requires_grad=True)
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    distribution_matching_loss(x0, real, fake).backward()
    scale = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / scale
    assert torch.allclose(distribution_matching_gradient(x0.detach(), real, fake), expected, atol=1e-6)
    assert torch.allclose(x0.grad, expected / x0.numel(), atol=1e-7)
    # the teacher reproducing a sample exactly does not divide by zero
    assert torch.isfinite(distribution_matching_gradient(real, real, fake)).all()


def test_exact_denoisers_move_a_generator_onto_the_data():
    """Generator x0 = a z + b (z ~ N(0, 1)) against data N(2, 0.5^2): descending DMD's gradient, with the
    fake denoiser exact for the generator's current N(b, a^2), brings a to 0.5 and b to 2."""
    torch.manual_seed(0)
    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.02)
    for _ in range(600):
        z = torch.randn(256, 8)
        x0 = a * z + b
        t = 0.02 + 0.96 * torch.rand(256, 1)
        x_t = (1 - t) * x0.detach() + t * torch.randn(256, 8)
        real = gaussian_denoiser(x_t, t, 2.0, 0.5)
        fake = gaussian_denoiser(x_t, t, b.detach(), a.detach().abs())
        opt.zero_grad()
        distribution_matching_loss(x0, real, fake).backward()
        opt.step()
    a, b = float(a.detach()), float(b.detach())
    assert abs(b - 2.0) < 0.05 and abs(abs(a) - 0.5) < 0.05, (a, b)

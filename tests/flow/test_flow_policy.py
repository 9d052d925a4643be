"""rectiflow.flow.policy: Flow-GRPO's SDE step keeps the marginals, its log-likelihood and KL are the
Gaussian ones, GRPO's advantages and clipped surrogate behave as defined."""

from __future__ import annotations

import pytest
import torch

from rectiflow.errors import ConfigError
from rectiflow.flow.policy import (
    advantage_weighted_matching,
    clipped_surrogate,
    cps_step,
    gaussian_kl,
    gaussian_logprob,
    group_advantages,
    policy_step,
    sde_step,
)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_eta_zero_is_the_euler_step(kind):
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    mean, std = policy_step(kind, x, v, 0.75, 0.5, eta=0.0)
    assert std == 0.0 and torch.allclose(mean, x + (0.5 - 0.75) * v, atol=1e-6)


def test_a_cps_step_carries_exactly_the_noise_of_its_time():
    """From x = (1 - t) x0 + t eps with the exact v = eps - x0, the CPS mean keeps (1 - t') x0 plus
    sqrt(t'^2 - s^2) eps, and s^2 of fresh noise tops the noise up to t'^2; the last step is exact."""
    x0, eps = torch.randn(2, 8), torch.randn(2, 8)
    t, tn, eta = 0.75, 0.5, 0.8
    mean, std = cps_step((1 - t) * x0 + t * eps, eps - x0, t, tn, eta)
    assert std == pytest.approx(tn * torch.sin(torch.tensor(eta * torch.pi / 2)).item())
    assert torch.allclose(mean, (1 - tn) * x0 + (tn ** 2 - std ** 2) ** 0.5 * eps, atol=1e-6)
    last, s0 = cps_step((1 - t) * x0 + t * eps, eps - x0, t, 0.0, eta)
    assert s0 == 0.0 and torch.allclose(last, x0, atol=1e-6)


def _gaussian_data_velocity(s2: float):
    """The exact rectified-flow velocity E[eps - x0 | x_t] for data x0 ~ N(0, s2) per element: x_t is
    N(0, (1-t)^2 s2 + t^2), and E[eps - x0 | x_t] = x_t (t - (1 - t) s2) / ((1 - t)^2 s2 + t^2)."""
    def v(x, t):
        return x * (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t * t)
    return v


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_the_sde_keeps_the_marginals_of_the_flow(eta):
    """Integrated with the exact velocity of Gaussian data, the SDE's samples have the flow's marginal
    variance at every time, and end on the data's (a wrong sign or factor in the drift breaks this). (CPS
    does not: its fresh noise does not shrink with the step, so many steps of it contract the variance.)"""
    s2, steps = 0.25, 400
    v = _gaussian_data_velocity(s2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for k in range(steps):
        t, tn = ts[k], ts[k + 1]
        mean, std = sde_step(x, v(x, t), t, tn, eta, t_cap=ts[1])
        x = mean + std * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        if k + 1 == steps // 2:
            want = (1 - tn) ** 2 * s2 + tn ** 2
            assert x.var().item() == pytest.approx(want, rel=0.03)
    assert x.var().item() == pytest.approx(s2, rel=0.03)
    # without the drift's score term the added noise would stay: the variance ends far above the data's
    y = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    for k in range(steps):
        t, tn = ts[k], ts[k + 1]
        _, std = sde_step(y, v(y, t), t, tn, eta, t_cap=ts[1])
        y = y + (tn - t) * v(y, t) + std * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert y.var().item() > 1.5 * s2


def test_logprob_and_kl_are_the_gaussian_ones_averaged_over_elements():
    mean, other, x = torch.randn(4, 3, 2), torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    std = 0.37
    ref = torch.distributions.Normal(mean, std).log_prob(x).mean((1, 2))
    assert torch.allclose(gaussian_logprob(x, mean, std), ref, atol=1e-6)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                           torch.distributions.Normal(other, std)).mean((1, 2))
    assert torch.allclose(gaussian_kl(mean, other, std), kl, atol=1e-6)
    with pytest.raises(ConfigError, match="std > 0"):
        gaussian_logprob(x, mean, 0.0)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    own = group_advantages(r, 4, global_std=False)
    assert torch.allclose(own[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (r[:4].std() + 1e-4))
    assert torch.equal(own[4:], torch.zeros(4))  # a group of equal rewards says nothing
    shared = group_advantages(r, 4)  # Flow-GRPO's GenEval setting: the batch's deviation
    assert torch.allclose(shared[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (r.std() + 1e-4))
    assert group_advantages(torch.tensor([0.0, 1.0]), 2, clip=0.5, global_std=False).abs().max() == 0.5
    with pytest.raises(ConfigError, match=">= 2 samples per prompt"):
        group_advantages(r, 1)
    with pytest.raises(ConfigError, match="do not form groups of 3"):
        group_advantages(r, 3)


def test_clipped_surrogate_is_reinforce_at_the_old_policy_and_stops_past_the_clip():
    logp = torch.tensor([0.2, -0.1], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    clipped_surrogate(logp, logp.detach(), adv, 0.1).sum().backward()
    assert torch.allclose(logp.grad, -adv)  # gradient of -A logp
    # a ratio already past 1 + c for a positive advantage (or below 1 - c for a negative) gets no gradient
    logp2 = torch.tensor([0.5, -0.5], requires_grad=True)
    loss = clipped_surrogate(logp2, torch.zeros(2), adv, 0.1)
    loss.sum().backward()
    assert torch.equal(logp2.grad, torch.zeros(2))
    assert torch.allclose(loss.detach(), -torch.tensor([1.1 * 2.0, 0.9 * -1.0]))


def test_advantage_weighted_matching_cancels_what_a_group_shares():
    """Within a group (advantages summing to 0) the gradient at v is sum_i A_i (v - target_i): a target every
    sample shares drops out, and the velocity moves toward the better sample's target."""
    g = torch.Generator().manual_seed(0)
    shared, good, bad = (torch.randn(1, 6, generator=g) for _ in range(3))
    adv = torch.tensor([1.0, -1.0])
    grads = []
    for common in (torch.zeros(1, 6), shared):
        v = torch.zeros(2, 6, requires_grad=True)
        advantage_weighted_matching(v, torch.cat([good, bad]) + common, adv).sum().backward()
        grads.append(v.grad.sum(0))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # the shared part cancels
    assert torch.allclose(grads[0], 2.0 / 6 * (bad - good)[0], atol=1e-6)  # descent moves v toward good - bad
    rows = advantage_weighted_matching(torch.zeros(2, 6), torch.cat([good, bad]), adv)
    assert torch.allclose(rows, adv * torch.cat([good, bad]).pow(2).mean(1))


def test_bad_steps_are_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="t_next < t"):
        sde_step(x, x, 0.5, 0.75, 0.7)
    with pytest.raises(ConfigError, match="eta must be >= 0"):
        sde_step(x, x, 0.75, 0.5, -1.0)
    with pytest.raises(ConfigError, match=r"CPS noise level eta must be in \[0, 1\]"):
        cps_step(x, x, 0.75, 0.5, 1.5)
    with pytest.raises(ConfigError, match="unknown stochastic step 'ddim'"):
        policy_step("ddim", x, x, 0.75, 0.5, 0.5)

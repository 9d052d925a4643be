"""A sampler as a stochastic policy: the step distribution, its log-likelihood and the GRPO objective.

Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv:2505.05470)
turns the sampling ODE dx = v dt into an SDE with the same marginals, so that every sampling step is a
Gaussian whose log-likelihood has a gradient, and trains with GRPO's group-relative advantages (Shao et al.
2024). With our convention (t = 1 noise, x_t = (1 - t) x0 + t eps, v = eps - x0) the score of p_t is
-(x + (1 - t) v) / t, and the SDE (their eq. 8) is

    dx = [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dw,    sigma_t = eta sqrt(t / (1 - t)),

integrated from t = 1 to 0 (dt < 0). One Euler-Maruyama step t -> t_next is the Gaussian
N(x + drift (t_next - t), sigma_t^2 (t - t_next) I). sigma_t is infinite at t = 1; as Flow-GRPO does, the
first step puts the next grid time in sigma's denominator instead (`t_cap`). eta = 0 is the ODE's Euler step
exactly, so a model trained with this policy is sampled as before, with the ODE (`rectiflow generate`).

CPS (Wang et al. 2025, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching",
arXiv:2509.05952; Flow-GRPO's later `sde_type = "cps"`) replaces that step with DDIM's stochastic step in
rectified-flow form: from the predictions x0^ = x - t v and eps^ = x + (1 - t) v,

    x_next ~ N((1 - t_next) x0^ + sqrt(t_next^2 - s^2) eps^, s^2 I),    s = t_next sin(eta pi / 2),

so the next state has exactly the path's coefficients ((1 - t_next) on the image, t_next on unit noise): no
excess noise is left in the image, the last step (t_next = 0) is deterministic, and a few-step model sees
states of the statistics its ODE gives it. eta = 0 is again the Euler step. Unlike the SDE it is a
few-step device: its fresh noise does not shrink with the step, so with an imperfect x0^ (a posterior
mean) many small steps of it contract the marginals.

Constants from Flow-GRPO's configuration (config/base.py and config/grpo.py's geneval_sd3 in their
repository): noise level eta 0.7, PPO clip range 1e-4, advantages clipped to [-5, 5], each reward minus its
prompt's mean over the batch's standard deviation, KL weight 0.04. Log-likelihoods are means over the
latent's elements (their choice: a sum over 1024 elements would make every ratio 0 or inf)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rectiflow.errors import ConfigError

ETA = 0.7  # Flow-GRPO's sample.noise_level (SDE)
CPS_ETA = 0.8  # Flow-GRPO's noise_level with sde_type "cps" (config/grpo.py, geneval_sd3_fast_nocfg)
STEP_KINDS = ("cps", "sde")
CLIP_RANGE = 1e-4  # Flow-GRPO's train.clip_range
ADVANTAGE_CLIP = 5.0  # Flow-GRPO's train.adv_clip_max


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def sde_step(x: Tensor, v: Tensor, t: float, t_next: float, eta: float,
             t_cap: float | None = None) -> tuple[Tensor, float]:
    """The mean [B, ...] and standard deviation (a float) of one step t -> t_next (t > t_next) of the
    marginal-preserving SDE above, given the velocity v at (x, t). `t_cap`: the time whose sigma is used
    when t = 1 (default t_next). eta = 0 gives the Euler step x + (t_next - t) v and std 0."""
    if not 0.0 <= t_next < t <= 1.0:
        raise ConfigError(f"an SDE step needs 0 <= t_next < t <= 1, got t={t}, t_next={t_next}")
    if eta < 0:
        raise ConfigError(f"the SDE's noise level eta must be >= 0, got {eta}")
    dt = t_next - t
    if eta == 0:
        return x + dt * v, 0.0
    denom = 1.0 - ((t_cap if t_cap is not None else t_next) if t >= 1.0 else t)
    sigma2 = eta * eta * t / denom
    drift = v + sigma2 / (2.0 * t) * (x + (1.0 - t) * v)
    return x + dt * drift, (sigma2 * -dt) ** 0.5


def cps_step(x: Tensor, v: Tensor, t: float, t_next: float, eta: float) -> tuple[Tensor, float]:
    """The mean and standard deviation of one coefficients-preserving step t -> t_next (module docstring)."""
    if not 0.0 <= t_next < t <= 1.0:
        raise ConfigError(f"a CPS step needs 0 <= t_next < t <= 1, got t={t}, t_next={t_next}")
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"the CPS noise level eta must be in [0, 1], got {eta}")
    std = t_next * math.sin(eta * math.pi / 2)
    x0, eps = x - t * v, x + (1.0 - t) * v
    return (1.0 - t_next) * x0 + math.sqrt(max(t_next * t_next - std * std, 0.0)) * eps, std


def policy_step(kind: str, x: Tensor, v: Tensor, t: float, t_next: float, eta: float,
                t_cap: float | None = None) -> tuple[Tensor, float]:
    """`cps_step` or `sde_step` by name (STEP_KINDS)."""
    if kind == "cps":
        return cps_step(x, v, t, t_next, eta)
    if kind == "sde":
        return sde_step(x, v, t, t_next, eta, t_cap)
    raise ConfigError(f"unknown stochastic step {kind!r}; choose one of {', '.join(STEP_KINDS)}")


def gaussian_logprob(sample: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(sample; mean, std^2 I) per row, averaged over the elements (not summed: module docstring)."""
    if std <= 0:
        raise ConfigError("a log-likelihood needs std > 0 (eta = 0 is the deterministic ODE step)")
    z = (sample.float() - mean.float()) / std
    return (-0.5 * z * z - torch.log(torch.tensor(std)) - 0.5 * torch.log(torch.tensor(2 * torch.pi))).mean(
        _dims(sample))


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: float) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per row, averaged over elements as the log-likelihood is."""
    return ((mean.float() - mean_ref.float()) ** 2).mean(_dims(mean)) / (2.0 * std * std)


def group_advantages(rewards: Tensor, group_size: int, clip: float = ADVANTAGE_CLIP,
                     global_std: bool = True) -> Tensor:
    """GRPO's advantages: each reward minus its group's mean, over a standard deviation (+1e-4), clipped to
    [-clip, clip]. Rows i * group_size ... (i + 1) * group_size - 1 form group i (one prompt). global_std:
    the deviation of all rewards of the batch (Flow-GRPO's GenEval setting, sample.global_std), else the
    group's own. A group whose rewards are all equal gets zeros: it says nothing about which sample was
    better."""
    if group_size < 2:
        raise ConfigError(f"GRPO needs groups of >= 2 samples per prompt, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    std = r.std() if global_std else r.std(1, keepdim=True)
    adv = (r - r.mean(1, keepdim=True)) / (std + 1e-4)
    return adv.clamp(-clip, clip).view(-1)


def clipped_surrogate(logp: Tensor, logp_old: Tensor, advantages: Tensor,
                      clip_range: float = CLIP_RANGE) -> Tensor:
    """PPO's clipped objective as a loss per row: -min(r A, clip(r, 1 - c, 1 + c) A), r = exp(logp - old).
    Its gradient at logp = logp_old is -A grad(logp): REINFORCE with the group baseline."""
    ratio = torch.exp(logp - logp_old)
    return -torch.minimum(ratio * advantages,
                          ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages)


def advantage_weighted_matching(v: Tensor, target: Tensor, advantages: Tensor) -> Tensor:
    """The flow-matching loss weighted by the advantage, per row: A * mean((v - target)^2), with v the model's
    velocity at a fresh interpolant x_t = (1 - t) x0 + t eps of its own sample x0 and target eps - x0
    (Advantage Weighted Matching, Xue et al. 2025, arXiv:2509.25050: the pretraining loss, reweighted, in
    place of a policy gradient through sampler likelihoods). Within a group the advantages sum to zero, so
    what every sample of the prompt shares cancels from the gradient: a sample better than its group pulls
    the velocity toward itself, a worse one pushes it away."""
    return advantages * ((v.float() - target.float()) ** 2).mean(_dims(v))

"""Distribution matching distillation (DMD): the gradient that moves a few-step generator's samples toward
a teacher's distribution.

DMD (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", arXiv:2311.18828; DMD2,
Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis", arXiv:2405.14867)
minimises the reverse KL divergence KL(p_fake || p_real) of the generator's samples from the data, averaged
over noise levels. Its gradient with respect to a sample x0 is the difference of two scores at a noised
copy x_t of it: the teacher's (real) and that of a second network trained online, by the ordinary
denoising loss, on the generator's own samples (fake). With our convention (t = 1 noise,
x_t = (1 - t) x0 + t eps, v = eps - x0) a velocity v gives the denoised estimate x0^ = x_t - t v and the
score -(x_t - (1 - t) x0^) / t^2, so

    s_fake - s_real = (1 - t) / t^2 (x0^_fake - x0^_real).

DMD drops the time factor and normalises per sample instead (DMD's eq. 8):

    grad = (x0^_fake - x0^_real) / mean |x0 - x0^_real|,

the mean over the sample's elements, and trains the generator on 0.5 ||x0 - sg(x0 - grad)||^2, whose
gradient with respect to x0 is grad (over the number of elements, as a mean). Descending moves x0 toward
where the teacher's denoiser points and away from where the generator's own distribution does: a sample
that the teacher finds likelier than the generator does gains probability, so the generator matches the
teacher's distribution rather than regressing onto the average of what it could draw (the blur of a
one-step student trained on MSE targets).

DMD2's noise levels: t uniform in [0.02, 0.98] (their min_step / max_step of 20 and 980 of 1000 DDPM steps);
the fake network updated several times per generator update (their two-time-scale rule, 5 updates)."""

from __future__ import annotations

import torch
from torch import Tensor

T_RANGE = (0.02, 0.98)  # DMD2's noise levels (min_step 20, max_step 980 of 1000), as flow times
FAKE_UPDATES = 5  # DMD2's two-time-scale update rule: fake-score updates per generator update
_NORM_FLOOR = 1e-6  # keeps DMD's normaliser finite where the teacher reproduces the sample exactly

__all__ = ["FAKE_UPDATES", "T_RANGE", "denoised", "distribution_matching_gradient",
           "distribution_matching_loss"]


def denoised(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """The denoised estimate x0^ = x_t - t v of rectified flow (t: a float, 0-d or [B], broadcast)."""
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    return x_t - t.reshape(t.shape + (1,) * (x_t.dim() - t.dim())) * v


def distribution_matching_gradient(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD's gradient of the reverse KL at the samples x0 [B, ...]: (x0_fake - x0_real) over the mean absolute
    distance of each sample from the teacher's denoised estimate (DMD's eq. 8). No graph."""
    with torch.no_grad():
        dims = tuple(range(1, x0.dim()))
        scale = (x0.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp_min(_NORM_FLOOR)
        return ((x0_fake.float() - x0_real.float()) / scale).to(x0.dtype)


def distribution_matching_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """0.5 mean (x0 - sg(x0 - grad))^2: a scalar whose gradient with respect to x0 is DMD's gradient over
    x0.numel(); its value is 0.5 mean grad^2, a measure of how far the two distributions still disagree."""
    grad = distribution_matching_gradient(x0, x0_real, x0_fake)
    return 0.5 * ((x0.float() - (x0 - grad).detach().float()) ** 2).mean()

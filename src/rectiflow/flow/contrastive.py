"""Contrastive flow matching: the flow-matching loss minus a weighted loss against a negative's target.

Stoica et al. 2025 ("Contrastive Flow Matching", arXiv:2506.05350, their eq. 6, lambda = 0.05 in their
experiments): per sample, ||v - u||^2 - lambda ||v - u~||^2, where u is the sample's own target and u~ the
target of another (image, noise) pair of the batch. For lambda < 1 this is a quadratic in v with minimiser
(u - lambda u~) / (1 - lambda) = u + k (u - u~), k = lambda / (1 - lambda): the target moved away from the
negative's, on average away from what every condition shares, i.e. a little guidance learned in training.

"counterfactual" (ours) uses a hard negative instead: the same noise and t with an image its caption is
false of (rectiflow.data.shapes.counterfactual_scene: one named shape replaced). On the rectified-flow path
u - u~ = x~0 - x0, so the minimiser moves the prediction away from exactly what tells the true image from
its counterfactual (the binding the plain loss barely rewards: docs/training.md). Rows whose caption was
dropped for CFG have no negative (the unconditional model has no caption to be false of), nor do rows whose
counterfactual is the image itself (`differs`)."""

from __future__ import annotations

from torch import Tensor

from rectiflow.errors import ConfigError

CONTRASTIVE = ("none", "batch", "counterfactual")


def check_contrastive(kind: str, weight: float) -> None:
    """Validate flow.contrastive and its weight (one line naming the problem)."""
    if kind not in CONTRASTIVE:
        raise ConfigError(f"unknown flow.contrastive {kind!r}; choose one of {', '.join(CONTRASTIVE)}")
    if not 0.0 <= float(weight) < 1.0:
        raise ConfigError(f"flow.contrastive_weight={weight}; use a value in [0, 1) (the loss has no minimum "
                          "at 1 or above)")
    if kind == "none" and weight != 0:
        raise ConfigError(f"flow.contrastive_weight={weight} but flow.contrastive is 'none'; set "
                          "flow.contrastive to 'batch' or 'counterfactual'")
    if kind != "none" and weight == 0:
        raise ConfigError(f"flow.contrastive={kind!r} needs flow.contrastive_weight > 0 (Delta-FM: 0.05)")


def batch_negatives(x0: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's negative pair (image, noise): the next sample's, cyclically (batches are shuffled, so
    this is a random other sample, as in Delta-FM)."""
    return x0.roll(1, dims=0), noise.roll(1, dims=0)


def differs(sample: Tensor, negative: Tensor, tol: float = 1e-3) -> Tensor:
    """[b] bool: rows whose negative differs from the sample by more than tol somewhere. A counterfactual
    folder keeps an image as itself where it has no counterfactual (`--counterfactual two-shape`); such a
    negative is no negative (the term would only scale the row's loss by 1 - w). tol absorbs encoder
    round-off between two cache builds; a changed shape moves latents by O(0.1)."""
    return (sample - negative).abs().flatten(1).amax(1) > tol


def contrastive_loss(per_sample: Tensor, negative: Tensor, weight: float, active: Tensor) -> Tensor:
    """per_sample - weight * negative on the active rows [b] (bool: those with a caption and a negative)."""
    return per_sample - float(weight) * negative * active.to(per_sample.dtype)


def optimum(target: Tensor, negative_target: Tensor, weight: float) -> Tensor:
    """The minimiser of ||v - u||^2 - w ||v - u~||^2 over v: (u - w u~) / (1 - w) (for tests and docs)."""
    return (target - weight * negative_target) / (1.0 - weight)


__all__ = ["CONTRASTIVE", "batch_negatives", "check_contrastive", "contrastive_loss", "differs", "optimum"]

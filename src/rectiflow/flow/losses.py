"""Per-sample regression losses between a model's output and its flow-matching target.

    mse            mean over elements of (out - target)^2                      (the RF / SD3 objective)
    pseudo_huber   sqrt(mean((out - target)^2) + c^2) - c                      (c default 0.00054)

pseudo_huber is the metric of Song & Dhariwal 2023 ("Improved Techniques for Training Consistency Models",
arXiv:2310.14189, sec. 3.3: sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d)), which Lee et al. 2024
("Improving the Training of Rectified Flows", arXiv:2405.20320, sec. 4.2) use for 2-rectified flows: an
L2 norm rather than its square, so each sample's gradient has about the same size and a few badly fitted
pairs do not dominate the batch. We apply it to the RMS error instead of the summed one, i.e. divide their
value by sqrt(d): the same minimiser and relative weighting, with c = 0.00054 independent of the latent
size, and a loss on the scale of an RMS error so that sizes compare (as rectiflow's straightness does).
Lee et al. add LPIPS in pixel space on top; in a latent space there is no LPIPS, so only the Huber part.
"""

from __future__ import annotations

from torch import Tensor

from rectiflow.errors import ConfigError

LOSSES = ("mse", "pseudo_huber")
_PSEUDO_HUBER_C = 0.00054  # Song & Dhariwal 2023, sec. 3.3 (per unit of sqrt(dimension))


def check_loss(name: str, params: dict) -> None:
    """Validate a loss name and its parameters (one line naming the problem)."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    allowed = {"mse": set(), "pseudo_huber": {"c"}}[name]
    extra = sorted(set(params) - allowed)
    if extra:
        raise ConfigError(f"bad parameters {extra} for loss {name!r}; it takes {sorted(allowed) or 'none'}")
    if name == "pseudo_huber" and not float(params.get("c", _PSEUDO_HUBER_C)) > 0:
        raise ConfigError(f"pseudo_huber needs c > 0, got c={params['c']}")


def per_sample_loss(name: str, out: Tensor, target: Tensor, dims: tuple[int, ...], **params) -> Tensor:
    """Loss of each sample [b], reduced over `dims` (every non-batch dimension of the sample)."""
    check_loss(name, params)
    mse = (out.float() - target.float()).pow(2).mean(dim=dims)
    if name == "mse":
        return mse
    c = float(params.get("c", _PSEUDO_HUBER_C))
    return mse / ((mse + c * c).sqrt() + c)  # = sqrt(mse + c^2) - c, without cancellation when mse << c^2

"""Per-sample losses: mse, and pseudo-Huber against Song & Dhariwal 2023's formula; errors."""

import math

import pytest
import torch

from rectiflow.errors import ConfigError
from rectiflow.flow import LOSSES, per_sample_loss
from rectiflow.flow.losses import check_loss


def _pair(seed=0, shape=(5, 16, 12)):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    return draw(), draw()


def test_mse_is_the_mean_square_per_sample():
    out, tgt = _pair()
    got = per_sample_loss("mse", out, tgt, (1, 2))
    assert got.shape == (5,)
    assert torch.allclose(got, ((out - tgt) ** 2).mean(dim=(1, 2)).float())


def test_pseudo_huber_is_song_and_dhariwals_metric_over_sqrt_d():
    out, tgt = _pair()
    d = 16 * 12
    c_song = 0.00054 * math.sqrt(d)  # their c for a d-dimensional sample
    song = ((out - tgt) ** 2).sum(dim=(1, 2)).add(c_song**2).sqrt() - c_song
    got = per_sample_loss("pseudo_huber", out, tgt, (1, 2))
    assert torch.allclose(got.double(), song / math.sqrt(d), rtol=1e-6)
    # an explicit c; near zero error it is quadratic (mse / 2c), far from it linear (rms)
    zero = torch.zeros_like(tgt)
    small = per_sample_loss("pseudo_huber", zero + 1e-4, zero, (1, 2), c=1.0)
    assert torch.allclose(small, torch.full((5,), 1e-8 / 2), rtol=1e-4, atol=0)
    big = per_sample_loss("pseudo_huber", zero + 100.0, zero, (1, 2), c=1e-3)
    assert torch.allclose(big, torch.full((5,), 100.0), rtol=1e-4, atol=0)


def test_pseudo_huber_gives_each_sample_a_gradient_of_the_same_size():
    """The reason to use it (Lee et al. 2024): a badly fitted sample does not dominate the batch."""
    tgt = torch.zeros(2, 64)
    out = torch.cat([torch.full((1, 64), 0.1), torch.full((1, 64), 10.0)]).requires_grad_()
    per_sample_loss("pseudo_huber", out, tgt, (1,)).sum().backward()
    norms = out.grad.norm(dim=1)
    assert torch.allclose(norms[0], norms[1], rtol=1e-3)  # the 100x larger error gets the same-size gradient
    out.grad = None
    per_sample_loss("mse", out, tgt, (1,)).sum().backward()
    assert out.grad.norm(dim=1)[1] > 50 * out.grad.norm(dim=1)[0]  # mse: 100x


def test_bad_loss_settings_one_line_each():
    assert LOSSES == ("mse", "pseudo_huber")
    with pytest.raises(ConfigError, match="unknown loss 'l1'; choose one of mse, pseudo_huber"):
        check_loss("l1", {})
    with pytest.raises(ConfigError, match=r"bad parameters \['c'\] for loss 'mse'"):
        check_loss("mse", {"c": 1.0})
    with pytest.raises(ConfigError, match="c > 0"):
        check_loss("pseudo_huber", {"c": 0.0})
    with pytest.raises(ConfigError, match=r"bad parameters \['delta'\]"):
        per_sample_loss("pseudo_huber", *_pair(), (1, 2), delta=1.0)

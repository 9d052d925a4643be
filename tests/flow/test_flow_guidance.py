"""Classifier-free guidance and the FLUX-dev guidance input."""

import pytest
import torch

from rectiflow.errors import ConfigError
from rectiflow.flow import (
    cfg_batch,
    cfg_combine,
    cfg_guide,
    cfg_velocity_fn,
    guidance_vector,
    linear_grid,
    solve,
)


def test_cfg_formula():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    assert torch.allclose(cfg_combine(c, u, 1.0), c) and torch.allclose(cfg_combine(c, u, 0.0), u)
    assert torch.allclose(cfg_combine(c, u, 4.0), u + 4.0 * (c - u))


def test_cfg_batch_and_guide_share_one_order():
    """cfg_batch puts the unconditional input first; cfg_guide reads the output in that order."""
    c, u = torch.full((2, 3), 1.0), torch.full((2, 3), -1.0)
    doubled = cfg_batch(c, u)  # [4, 3]
    assert torch.equal(doubled[:2], u) and torch.equal(doubled[2:], c)
    assert torch.equal(cfg_guide(doubled, 3.0), cfg_combine(c, u, 3.0))


def test_cfg_velocity_fn_batches_uncond_first():
    calls = []

    def model_fn(x2, t):  # uncond half returns -1, cond half +1 (times x)
        calls.append(x2.shape[0])
        sign = torch.cat([-torch.ones(x2.shape[0] // 2), torch.ones(x2.shape[0] // 2)]).view(-1, 1)
        return sign * x2

    x = torch.arange(6.0).view(3, 2)
    v = cfg_velocity_fn(model_fn, 3.0)(x, torch.tensor(1.0))
    assert calls == [6]
    assert torch.allclose(v, -x + 3.0 * (x - -x))  # uncond + s (cond - uncond)
    out = solve(cfg_velocity_fn(model_fn, 1.0), x, linear_grid(3))  # scale 1 = the conditional model
    assert out.shape == x.shape


def test_cfg_velocity_fn_rejects_wrong_batch():
    with pytest.raises(ConfigError, match="doubled batch"):
        cfg_velocity_fn(lambda x2, t: x2[:1], 2.0)(torch.ones(2, 3), torch.tensor(0.5))


def test_guidance_vector():
    g = guidance_vector(3.5, 4, "cpu", torch.bfloat16)
    assert g.shape == (4,) and g.dtype == torch.bfloat16 and (g == 3.5).all()  # raw scale, no x1000
    with pytest.raises(ConfigError, match="batch"):
        guidance_vector(3.5, 0, "cpu", torch.float32)


def test_cfg_interval_and_scale_at():
    from rectiflow.flow import cfg_scale_at, check_cfg_interval

    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert cfg_scale_at(t, 3.0, (0.5, 1.0)).tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]  # both ends inclusive
    assert cfg_scale_at(t, 3.0, None).tolist() == [3.0] * 5
    assert check_cfg_interval(None) is None and check_cfg_interval(["0.2", 1]) == (0.2, 1.0)
    for bad in ((0.8, 0.2), (-0.1, 0.5), (0.5, 1.5), (0.5,), "ab", 3):
        with pytest.raises(ConfigError, match="cfg interval"):
            check_cfg_interval(bad)

    calls = []

    def doubled(x2, t):  # [uncond; cond] = [-1; +1] times x
        calls.append("doubled")
        return torch.cat([-x2[: len(x2) // 2], x2[len(x2) // 2:]])

    def cond(x, t):
        calls.append("cond")
        return x

    v = cfg_velocity_fn(doubled, 3.0, (0.5, 1.0), cond)
    x = torch.ones(2, 3)
    assert torch.equal(v(x, torch.tensor(0.75)), x * 5.0)  # inside: u + s (c - u) = -1 + 3 * 2
    assert torch.equal(v(x, torch.tensor(0.25)), x)  # outside: the conditional model, one forward
    assert calls == ["doubled", "cond"]
    no_cond = cfg_velocity_fn(doubled, 3.0, (0.5, 1.0))
    assert torch.equal(no_cond(x, torch.tensor(0.25)), x)  # no cond_fn: the doubled batch's cond half

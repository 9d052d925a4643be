"""Normalisation layers of FLUX (BFL flux/modules/layers.py RMSNorm, QKNorm).

Parameter names follow BFL's checkpoints: `scale` (RMSNorm), `query_norm` / `key_norm` (QKNorm).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "QKNorm", "RMS_EPS", "LAYERNORM_EPS"]

# BFL layers.py RMSNorm: rsqrt(mean(x^2) + 1e-6); diffusers FluxAttention uses RMSNorm(eps=1e-6) too.
RMS_EPS = 1e-6
# BFL layers.py: nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6) before every modulation;
# diffusers AdaLayerNormZero / AdaLayerNormZeroSingle / norm_out use the same eps.
LAYERNORM_EPS = 1e-6


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * scale, with the statistics computed in float32 (as BFL does)."""
    xf = x.float()
    rrms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)  # [..., 1]
    return (xf * rrms).to(x.dtype) * scale


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-feature `scale` (init 1)."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class QKNorm(nn.Module):
    """RMSNorm of queries and keys over the head dimension (separate scales), cast to the value dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)

    def scales(self) -> torch.Tensor:
        """[2, D]: query then key scale (used by the fused rectiflow.nn.attention.qk_norm_rope)."""
        return torch.stack((self.query_norm.scale, self.key_norm.scale))

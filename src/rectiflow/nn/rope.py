"""Multi-axis rotary position embeddings (RoPE) as used by FLUX.

FLUX (BFL flux/math.py `rope`, layers.py `EmbedND`) splits each attention head's `D` features into groups,
one per position axis (`axes_dim`, e.g. (16, 56, 56) for (index, row, col) with D = 128). Within an axis of
`d` features, the feature pair (2i, 2i+1) is rotated by the angle pos * theta^(-2i/d):

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos

Instead of BFL's 2x2 rotation matrices or complex numbers, the tables are kept as real cos / sin tensors,
built once per forward: `cos` at full width D (cos_i repeated for both features of pair i) so that
`x * cos` is one contiguous multiply, and `sin` at half width D/2, applied to the even / odd feature views
with two in-place fused multiply-adds. Angles are computed in float64 (as BFL and diffusers do), the tables
are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["RopeTable", "EmbedND", "rope_angles", "apply_rope", "rotate"]


class RopeTable(NamedTuple):
    """cos [B, L, 1, 1, D] (interleaved: cos_i at features 2i and 2i+1) and sin [B, L, 1, 1, D/2], float32.

    The two singleton dimensions broadcast over (q/k, heads) in the [B, L, 2, H, D] layout of
    rectiflow.nn.attention; B may be 1 (ids shared by the batch).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def tokens(self, start: int, end: int | None = None) -> RopeTable:
        """The table restricted to token positions [start, end)."""
        return RopeTable(self.cos[:, start:end], self.sin[:, start:end])


def rope_angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles pos * theta^(-2i/dim) for one axis, float64. pos [B, L] (any real dtype) -> [B, L, dim/2]."""
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of features, got {dim}")
    # theta^(-2i/d), i = 0 .. d/2-1  (BFL math.py rope(): omega = 1 / theta**(arange(0, d, 2) / d))
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    return pos.to(torch.float64).unsqueeze(-1) * omega  # [B, L, dim/2]


class EmbedND(nn.Module):
    """RoPE tables for ids [B, L, n_axes] -> RopeTable. Built once per forward, shared by all blocks."""

    def __init__(self, dim: int, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        if sum(axes_dim) != dim:
            raise ValueError(f"sum(axes_dim)={sum(axes_dim)} must equal the head dim {dim}")
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> RopeTable:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids have {ids.shape[-1]} axes, RoPE expects {len(self.axes_dim)}")
        angles = torch.cat(
            [rope_angles(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-1
        )  # [B, L, D/2], float64
        angles = angles[:, :, None, None, :]  # [B, L, 1, 1, D/2]
        cos = angles.cos().float().repeat_interleave(2, dim=-1)  # [B, L, 1, 1, D]: (c0, c0, c1, c1, ...)
        return RopeTable(cos, angles.sin().float())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_odd: torch.Tensor, sin_even: torch.Tensor) -> torch.Tensor:
    """Pairwise rotation with per-feature factors already folded into the tables (float32 math):

        out[2i]   = x[2i] cos[2i]     - x[2i+1] sin_odd[i]
        out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin_even[i]

    x [..., D]; cos [..., D] and sin_* [..., D/2] broadcast against it. With cos = RopeTable.cos and
    sin_odd = sin_even = RopeTable.sin this is plain RoPE; rectiflow.nn.attention folds the QK-norm scales
    into the tables. Autograd-safe: the in-place updates touch only the fresh product `out`.
    """
    out = x * cos  # [..., D]
    out[..., 0::2].addcmul_(x[..., 1::2], sin_odd, value=-1.0)  # even features
    out[..., 1::2].addcmul_(x[..., 0::2], sin_even)  # odd features
    return out


def apply_rope(x: torch.Tensor, pe: RopeTable) -> torch.Tensor:
    """RoPE of x [B, L, ..., D] (BFL math.py apply_rope; diffusers apply_rotary_emb, use_real_unbind_dim=-1).

    pe broadcasts against x (for x [B, L, H, D] pass RopeTable(cos[:, :, 0], sin[:, :, 0])). Computed in
    float32 and cast back to x's dtype.
    """
    return rotate(x.float(), pe.cos, pe.sin, pe.sin).to(x.dtype)

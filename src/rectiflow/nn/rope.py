"""Multi-axis rotary position embeddings (RoPE) as used by FLUX.

FLUX (BFL flux/math.py `rope`, layers.py `EmbedND`) splits each attention head's `D` features into groups,
one per position axis (`axes_dim`, e.g. (16, 56, 56) for (index, row, col) with D = 128). Within an axis of
`d` features, feature pair i (features 2i, 2i+1) is rotated by the angle pos * theta^(-2i/d).

Instead of BFL's 2x2 rotation matrices (or diffusers' interleaved cos/sin of full width D), we keep one
`cos` and one `sin` table of width D/2 (one entry per rotated pair) and rotate the pairs in place of the
(even, odd) feature views. The angles are computed in float64, as in BFL and diffusers, then cast to float32.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmbedND", "rope_angles", "apply_rope"]


def rope_angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles pos * theta^(-2i/dim) for one axis, float64.

    pos [B, L] (any real dtype) -> [B, L, dim/2].
    """
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of features, got {dim}")
    # theta^(-2i/d), i = 0 .. d/2-1  (BFL math.py rope(): omega = 1 / theta**(arange(0, d, 2) / d))
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    return pos.to(torch.float64).unsqueeze(-1) * omega  # [B, L, dim/2]


class EmbedND(nn.Module):
    """RoPE tables for ids [B, L, n_axes]: returns (cos, sin), each float32 [B, L, 1, D/2].

    The singleton dimension broadcasts over heads in the [B, L, H, D/2] layout used by `apply_rope`.
    Built once per forward and shared by all blocks. Has no parameters.
    """

    def __init__(self, dim: int, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        if sum(axes_dim) != dim:
            raise ValueError(f"sum(axes_dim)={sum(axes_dim)} must equal the head dim {dim}")
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids have {ids.shape[-1]} axes, RoPE expects {len(self.axes_dim)}")
        angles = torch.cat(
            [rope_angles(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-1
        )  # [B, L, D/2], float64
        angles = angles.unsqueeze(2)  # [B, L, 1, D/2]
        return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (2i, 2i+1) of x [..., D] by the angles whose cos/sin are [..., D/2].

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos
    (BFL math.py apply_rope; diffusers apply_rotary_emb with use_real_unbind_dim=-1 computes the same.)
    Computed in float32 and cast back to x's dtype. cos/sin must broadcast against x[..., D/2].
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [..., D] -> [..., D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]  # each [..., D/2] (strided views)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [..., D/2, 2]
    return out.flatten(-2).to(x.dtype)  # [..., D]

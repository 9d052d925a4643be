"""Conditioning and position embeddings: sinusoidal timestep features, the MLP embedder, SD3 2D sin-cos.

Parameter names follow BFL's checkpoints (MLPEmbedder.in_layer / out_layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["timestep_embedding", "MLPEmbedder", "sincos_2d_embedding", "TIME_FACTOR"]

# The model takes t in [0, 1]; FLUX was trained with t scaled by 1000 inside the embedding (BFL layers.py
# timestep_embedding(t, dim, max_period=10000, time_factor=1000.0); diffusers multiplies by 1000 in
# FluxTransformer2DModel.forward). This is the only place in rectiflow where the 1000 appears.
TIME_FACTOR = 1000.0


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000, time_factor: float = TIME_FACTOR
) -> torch.Tensor:
    """Sinusoidal features of t [B] -> [B, dim]: [cos(a), sin(a)] with a = time_factor * t * f_i,
    f_i = max_period^(-i/half), i = 0 .. half-1 (BFL layers.py timestep_embedding; diffusers Timesteps with
    flip_sin_to_cos=True, downscale_freq_shift=0). Odd dims get one zero feature. Returned in t's dtype when t
    is floating point.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    )  # [half]
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [B, dim]
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (BFL layers.py MLPEmbedder; used for time_in, vector_in, guidance_in)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos [...] -> [..., dim]: [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-i/(dim/2)) (MAE, SD3)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]; 10000 from MAE get_1d_sincos_pos_embed_from_grid, used by SD3
    out = pos.to(torch.float64).unsqueeze(-1) * omega  # [..., dim/2]
    return torch.cat([out.sin(), out.cos()], dim=-1)  # [..., dim]


def sincos_2d_embedding(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """SD3-style absolute 2D sin-cos position embedding, float32.

    rows, cols [B, L] (token grid positions) -> [B, L, dim]. The first half of the features encodes the
    column (x), the second half the row (y), as in diffusers get_2d_sincos_pos_embed (meshgrid 'xy', w first).
    diffusers additionally rescales positions by base_size / grid_size / interpolation_scale; with
    base_size == grid_size and interpolation_scale == 1 (what we use: raw token positions) the two agree.
    """
    if dim % 4:
        raise ValueError(f"the 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    emb = torch.cat([_sincos_1d(cols, dim // 2), _sincos_1d(rows, dim // 2)], dim=-1)  # [B, L, dim]
    return emb.float()

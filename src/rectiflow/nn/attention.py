"""Attention for FLUX: fused QK RMSNorm + RoPE, SDPA, and the SelfAttention parameter container
(BFL flux/math.py attention / apply_rope, modules/layers.py SelfAttention, QKNorm).

Heads layout. A fused projection gives [B, L, 3 * H * D] = "B L (K H D)" with K = (q, k, v); we view it as
[B, L, 3, H, D] without copying. Queries and keys are normalised and rotated together as the [B, L, 2, H, D]
slice (one kernel per step for both), which yields a fresh contiguous tensor. SDPA receives [B, H, L, D]
transposed views and returns [B, H, L, D], which is flattened to [B, L, H * D] for the output projection.

QK norm + RoPE in few passes: with r = rsqrt(mean(x^2) + eps) per head vector and s the norm's scale,
RoPE(r * x * s) = r * x * (cos * s) -/+ r * x_swapped * (sin * s_swapped); the scales are folded into the
(small, per-token) RoPE tables so that the per-element work is: one reduction, one multiply by r, one
multiply by the table and two fused multiply-adds. Everything runs in float32 (BFL computes RMSNorm and RoPE
in float32 too) and is cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rectiflow.nn.norms import RMS_EPS, QKNorm
from rectiflow.nn.rope import RopeTable, rotate

__all__ = ["attention", "qk_norm_rope", "SelfAttention"]


def qk_norm_rope(qk: torch.Tensor, scale: torch.Tensor, pe: RopeTable | None) -> torch.Tensor:
    """RMSNorm (eps 1e-6, float32) then RoPE of queries and keys.

    qk [B, L, 2, H, D] (q then k; any strides), scale [2, D] (query_norm.scale, key_norm.scale),
    pe: tables for these L tokens or None (no RoPE). Returns a contiguous [B, L, 2, H, D] in qk's dtype.
    """
    x = qk.float()
    d = x.shape[-1]
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / d  # mean(x^2): [B, L, 2, H, 1]
    n = x * torch.rsqrt(ms + RMS_EPS)  # [B, L, 2, H, D]
    s = scale.float()[:, None, :]  # [2, 1, D], broadcasts over heads
    if pe is None:
        return (n * s).to(qk.dtype)
    # tables [B, L, 2, 1, D] and [B, L, 2, 1, D/2] with the scales folded in (small: no H factor)
    out = rotate(n, pe.cos * s, pe.sin * s[..., 1::2], pe.sin * s[..., 0::2])
    return out.to(qk.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over all L tokens; q, k, v [B, L, H, D] (any strides, RoPE already applied).

    Returns [B, L, H * D]. Scale 1/sqrt(D) (SDPA's default, as in BFL and diffusers).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D] views
    x = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
    return x.transpose(1, 2).flatten(2)  # [B, H, L, D] -> [B, L, H * D]


class SelfAttention(nn.Module):
    """Parameters of one stream's attention: fused `qkv`, QK RMSNorm `norm`, output `proj` (BFL names)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qk_v(self, x: torch.Tensor, pe: RopeTable | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> (normalised, rotated q and k [B, L, 2, H, D], v [B, L, H, D] view)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # "B L (K H D) -> B L K H D"
        qk = qk_norm_rope(qkv[:, :, :2], self.norm.scales(), pe)
        return qk, qkv[:, :, 2]

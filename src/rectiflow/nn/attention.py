"""Attention with RoPE, and FLUX's SelfAttention parameter container (BFL flux/math.py, modules/layers.py).

Heads layout: the fused projection gives [B, L, 3 * H * D] = "B L (K H D)" with K = (q, k, v). We keep queries
and keys token-major, [B, L, H, D], while normalising and rotating them (contiguous per head vector), and hand
SDPA the transposed views [B, H, L, D]; its output [B, H, L, D] is flattened to [B, L, H * D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rectiflow.nn.norms import QKNorm, rms_norm
from rectiflow.nn.rope import apply_rope

__all__ = ["attention", "split_qkv", "SelfAttention"]

Pe = tuple[torch.Tensor, torch.Tensor] | None


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3 * H * D] -> q, k, v, each a [B, L, H, D] view ("B L (K H D) -> K B L H D")."""
    qkv = qkv.unflatten(-1, (3, num_heads, -1))  # [B, L, 3, H, D]
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Pe) -> torch.Tensor:
    """Softmax attention over all L tokens; q, k, v [B, L, H, D]; pe = (cos, sin) [B, L, 1, D/2] or None.

    Returns [B, L, H * D]. Scale 1/sqrt(D) (SDPA's default, as in BFL and diffusers).
    """
    if pe is not None:
        q, k = apply_rope(q, *pe), apply_rope(k, *pe)
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

    def qkv_normed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> normalised q, k and v, each [B, L, H, D]."""
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q = rms_norm(q, self.norm.query_norm.scale).to(v)
        k = rms_norm(k, self.norm.key_norm.scale).to(v)
        return q, k, v

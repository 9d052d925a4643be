"""adaLN modulation (BFL flux/modules/layers.py Modulation / ModulationOut).

`lin` maps silu(vec) [B, hidden] to 3 (single-stream) or 6 (double-stream) vectors of width hidden, in the
order (shift, scale, gate)[, (shift, scale, gate)]. They are returned as [B, 1, hidden] to broadcast over
tokens. A modulated activation is (1 + scale) * LayerNorm(x) + shift; a gated residual is x + gate * f(.).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rectiflow.nn.norms import LAYERNORM_EPS

__all__ = ["ModulationOut", "Modulation", "modulate"]


class ModulationOut(NamedTuple):
    shift: torch.Tensor  # [B, 1, hidden]
    scale: torch.Tensor  # [B, 1, hidden]
    gate: torch.Tensor  # [B, 1, hidden]


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # m x [B, 1, hidden]
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift; LayerNorm without affine, eps 1e-6 (BFL img_norm1 / pre_norm /
    norm_final). x [B, L, hidden], shift and scale [B, 1, hidden].

    For a batch of one the modulation is an ordinary affine LayerNorm (weight 1 + scale, bias shift): one
    fused kernel and one output tensor instead of two (same arithmetic: normalise, multiply, add).
    """
    if x.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], (1 + scale).flatten(), shift.flatten(), eps=LAYERNORM_EPS)
    xn = F.layer_norm(x, x.shape[-1:], eps=LAYERNORM_EPS)
    return torch.addcmul(shift, xn, 1 + scale)

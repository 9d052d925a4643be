"""FLUX transformer blocks (BFL flux/modules/layers.py DoubleStreamBlock, SingleStreamBlock, LastLayer).

Parameter names equal BFL checkpoint keys. Computation order follows BFL so that fp32 results agree with BFL
and diffusers to rounding; the fused forms used here (torch.addcmul for "x + gate * f" and
"shift + (1 + scale) * norm", one cat of the two streams' q/k/v) do not change the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rectiflow.nn.attention import Pe, SelfAttention, attention, split_qkv
from rectiflow.nn.modulation import Modulation, ModulationOut, modulate
from rectiflow.nn.norms import LAYERNORM_EPS, QKNorm, rms_norm

__all__ = ["DoubleStreamBlock", "SingleStreamBlock", "LastLayer"]


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    # Linear -> GELU(tanh) -> Linear; BFL layers.py img_mlp / txt_mlp (keys .0 and .2), tanh approximation
    # as in BFL and diffusers FeedForward(activation_fn="gelu-approximate").
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


def _gated(x: torch.Tensor, mod: ModulationOut, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y in one kernel."""
    return torch.addcmul(x, mod.gate, y)


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over the sequence [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: Pe
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, L_img, hidden], txt [B, L_txt, hidden], vec [B, hidden] -> (img, txt), same shapes."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_normed(modulate(img, img_mod1))  # each [B, L_img, H, D]
        txt_q, txt_k, txt_v = self.txt_attn.qkv_normed(modulate(txt, txt_mod1))  # each [B, L_txt, H, D]
        q = torch.cat((txt_q, img_q), dim=1)  # [B, L, H, D], L = L_txt + L_img
        k = torch.cat((txt_k, img_k), dim=1)
        v = torch.cat((txt_v, img_v), dim=1)
        attn = attention(q, k, v, pe)  # [B, L, hidden]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = _gated(img, img_mod1, self.img_attn.proj(img_attn))
        img = _gated(img, img_mod2, self.img_mlp(modulate(img, img_mod2)))
        txt = _gated(txt, txt_mod1, self.txt_attn.proj(txt_attn))
        txt = _gated(txt, txt_mod2, self.txt_mlp(modulate(txt, txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence (ViT-22B style): one fused input projection `linear1`
    (q, k, v, mlp) and one output projection `linear2` over [attn, gelu(mlp)]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv + mlp in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # attn + mlp out
        self.norm = QKNorm(hidden_size // num_heads)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: Pe) -> torch.Tensor:
        """x [B, L, hidden], vec [B, hidden] -> [B, L, hidden]."""
        mod, _ = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, mod)).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )  # [B, L, 3 * hidden], [B, L, mlp_hidden]
        q, k, v = split_qkv(qkv, self.num_heads)  # each [B, L, H, D]
        q = rms_norm(q, self.norm.query_norm.scale).to(v)
        k = rms_norm(k, self.norm.key_norm.scale).to(v)
        attn = attention(q, k, v, pe)  # [B, L, hidden]
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))  # [B, L, hidden]
        return _gated(x, mod, out)


class LastLayer(nn.Module):
    """adaLN (shift, scale) + linear projection to the output channels (BFL layers.py LastLayer)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """x [B, L, hidden], vec [B, hidden] -> [B, L, out_channels]."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift, scale
        xn = F.layer_norm(x, x.shape[-1:], eps=LAYERNORM_EPS)
        return self.linear(torch.addcmul(shift, xn, 1 + scale))

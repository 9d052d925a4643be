"""FLUX transformer blocks (BFL flux/modules/layers.py DoubleStreamBlock, SingleStreamBlock, LastLayer).

Parameter names equal BFL checkpoint keys and the computation is BFL's; fp32 results agree with BFL /
diffusers to rounding. Differences of form, for speed on CPU: QK norm and RoPE fused
(rectiflow.nn.attention.qk_norm_rope), "x + gate * f" as one torch.addcmul, adaLN as one affine LayerNorm
for a batch of one (rectiflow.nn.modulation.modulate). Every in-place update touches only a fresh
intermediate that autograd has not saved, so the blocks train. Every nn.Linear is called as a module, so
functions that swap or wrap linears (LoRA, int8) apply to all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from rectiflow.nn.attention import SelfAttention, attention, qk_norm_rope
from rectiflow.nn.modulation import Modulation, ModulationOut, modulate
from rectiflow.nn.norms import QKNorm
from rectiflow.nn.rope import RopeTable

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
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: RopeTable | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, L_img, hidden], txt [B, L_txt, hidden], vec [B, hidden] -> (img, txt), same shapes;
        pe covers the joint sequence [txt; img]."""
        l_txt = txt.shape[1]
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        pe_txt, pe_img = (None, None) if pe is None else (pe.tokens(0, l_txt), pe.tokens(l_txt))
        img_qk, img_v = self.img_attn.qk_v(modulate(img, img_mod1.shift, img_mod1.scale), pe_img)
        txt_qk, txt_v = self.txt_attn.qk_v(modulate(txt, txt_mod1.shift, txt_mod1.scale), pe_txt)
        qk = torch.cat((txt_qk, img_qk), dim=1)  # [B, L, 2, H, D], L = L_txt + L_img
        v = torch.cat((txt_v, img_v), dim=1)  # [B, L, H, D]
        attn = attention(qk[:, :, 0], qk[:, :, 1], v)  # [B, L, hidden]
        txt_attn, img_attn = attn[:, :l_txt], attn[:, l_txt:]

        img = _gated(img, img_mod1, self.img_attn.proj(img_attn))
        img = _gated(img, img_mod2, self.img_mlp(modulate(img, img_mod2.shift, img_mod2.scale)))
        txt = _gated(txt, txt_mod1, self.txt_attn.proj(txt_attn))
        txt = _gated(txt, txt_mod2, self.txt_mlp(modulate(txt, txt_mod2.shift, txt_mod2.scale)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence (ViT-22B style): one fused input projection `linear1`
    (q, k, v, mlp-in) and one output projection `linear2` over [attn, gelu(mlp)]."""

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

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: RopeTable | None) -> torch.Tensor:
        """x [B, L, hidden], vec [B, hidden] -> [B, L, hidden]."""
        h = self.hidden_size
        mod, _ = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, mod.shift, mod.scale)).split([3 * h, self.mlp_hidden_dim], dim=-1)
        qkv = qkv.unflatten(-1, (3, self.num_heads, -1))  # "B L (K H D) -> B L K H D"
        qk = qk_norm_rope(qkv[:, :, :2], self.norm.scales(), pe)  # [B, L, 2, H, D]
        attn = attention(qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2])  # [B, L, hidden]
        # Call the module (never read linear2.weight here): LoRA / int8 work by swapping nn.Linear modules.
        # (Splitting this matmul in two to skip the concat measured no faster on CPU.)
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
        return self.linear(modulate(x, shift, scale))

"""SD3 / SD3.5 MM-DiT blocks (Stability-AI/sd3.5 mmditx.py: SelfAttention, DismantledBlock, JointBlock).

Parameter names equal Stability's reference checkpoint keys (`attn.qkv`, `attn.proj`, `attn.ln_q.weight`,
`attn2.*`, `mlp.fc1`, `mlp.fc2`, `adaLN_modulation.1`), so SD3 / SD3.5 single files load with strict=True.
The math is shared with the FLUX blocks: LayerNorm-then-modulate (rectiflow.nn.modulation.modulate, eps
1e-6 as mmditx.py's norm1 / norm2), RMS QK-norm (rectiflow.nn.attention.qk_norm_rope without RoPE: SD3 has
no RoPE), SDPA attention over the joint sequence [context; x] (context first, as mmditx.py block_mixing).

A JointBlock holds two DismantledBlock-like streams: `context_block` (text tokens) and `x_block` (image
tokens). The last block of the model has a "pre-only" context stream: it contributes keys and values to the
joint attention but has no output projection, no MLP and only (shift, scale) modulation, since its output
would be discarded. SD3.5 Medium (MMDiT-X) adds, in its first blocks, a second attention `attn2` over the
image tokens alone, with its own (shift, scale, gate): 9 modulation vectors instead of 6.
"""

from __future__ import annotations

import torch
from torch import nn

from rectiflow.nn.attention import attention, qk_norm_rope
from rectiflow.nn.modulation import modulate
from rectiflow.nn.norms import RMS_EPS

__all__ = ["Mlp", "StreamAttention", "StreamBlock", "JointBlock", "PatchEmbed", "VectorEmbedder"]


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (Stability other_impls.py Mlp with act_layer=GELU(approximate="tanh");
    diffusers FeedForward(activation_fn="gelu-approximate"))."""

    def __init__(self, hidden_size: int, mlp_hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_dim, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamAttention(nn.Module):
    """One stream's attention parameters: fused `qkv`, optional RMS QK-norm `ln_q` / `ln_k` (SD3.5; weights
    only, eps 1e-6 as mmditx.py RMSNorm), output `proj` (absent when pre-only)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.ln_q = nn.RMSNorm(head_dim, eps=RMS_EPS) if qk_norm else None
        self.ln_k = nn.RMSNorm(head_dim, eps=RMS_EPS) if qk_norm else None
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qk_v(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> (q and k [B, L, 2, H, D], v [B, L, H, D])."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # "B L (K H D) -> B L K H D"
        qk = qkv[:, :, :2]
        if self.ln_q is not None:
            qk = qk_norm_rope(qk, torch.stack((self.ln_q.weight, self.ln_k.weight)), None)
        return qk, qkv[:, :, 2]


class StreamBlock(nn.Module):
    """One stream of a joint block with adaLN-Zero conditioning (mmditx.py DismantledBlock, LayerNorm
    variant: rmsnorm, scale_mod_only and swiglu are off in every published SD3 / SD3.5 model).

    Modulation order (mmditx.py pre_attention / pre_attention_x): shift, scale, gate for attention, the
    same for the MLP, then for attn2 (dual attention); pre-only: shift, scale.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_norm: bool,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        if pre_only and dual_attention:
            raise ValueError("a pre-only stream cannot have dual attention (mmditx.py asserts the same)")
        self.pre_only = pre_only
        self.attn = StreamAttention(hidden_size, num_heads, qkv_bias, qk_norm, pre_only=pre_only)
        self.attn2 = StreamAttention(hidden_size, num_heads, qkv_bias, qk_norm) if dual_attention else None
        self.mlp = None if pre_only else Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mods = 2 if pre_only else (9 if dual_attention else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size))

    def modulation(self, c: torch.Tensor) -> list[torch.Tensor]:
        """c [B, hidden] -> the 2, 6 or 9 modulation vectors, each [B, 1, hidden]."""
        n = self.adaLN_modulation[1].out_features // self.adaLN_modulation[1].in_features
        return list(self.adaLN_modulation(c)[:, None, :].chunk(n, dim=-1))

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mods: list[torch.Tensor],
               attn2: torch.Tensor | None = None) -> torch.Tensor:
        """The residual updates after attention (mmditx.py post_attention / post_attention_x)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = torch.addcmul(x, gate_msa, self.attn.proj(attn))
        if attn2 is not None:
            x = torch.addcmul(x, mods[8], self.attn2.proj(attn2))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(x, shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """Joint attention of a context stream and an image stream (mmditx.py JointBlock / block_mixing)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_norm: bool,
                 context_pre_only: bool, dual_attention: bool):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, qk_norm,
                                         pre_only=context_pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, qk_norm,
                                   dual_attention=dual_attention)

    def forward(self, context: torch.Tensor, x: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """context [B, L_ctx, hidden], x [B, L_x, hidden], c [B, hidden] -> (context or None when the
        context stream is pre-only, x), same shapes."""
        ctx_mods = self.context_block.modulation(c)
        x_mods = self.x_block.modulation(c)
        ctx_qk, ctx_v = self.context_block.attn.qk_v(modulate(context, ctx_mods[0], ctx_mods[1]))
        x_qk, x_v = self.x_block.attn.qk_v(modulate(x, x_mods[0], x_mods[1]))
        qk = torch.cat((ctx_qk, x_qk), dim=1)  # [B, L, 2, H, D], L = L_ctx + L_x, context first
        v = torch.cat((ctx_v, x_v), dim=1)  # [B, L, H, D]
        attn = attention(qk[:, :, 0], qk[:, :, 1], v)  # [B, L, hidden]
        l_ctx = context.shape[1]
        attn2 = None
        if self.x_block.attn2 is not None:  # MMDiT-X: image-only self-attention from its own modulation
            qk2, v2 = self.x_block.attn2.qk_v(modulate(x, x_mods[6], x_mods[7]))
            attn2 = attention(qk2[:, :, 0], qk2[:, :, 1], v2)  # [B, L_x, hidden]
        x = self.x_block.finish(x, attn[:, l_ctx:], x_mods, attn2)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.finish(context, attn[:, :l_ctx], ctx_mods), x


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a latent [B, C, H, W] -> tokens [B, (H/p)(W/p), hidden], row-major
    (mmditx.py PatchEmbed: a strided conv `proj`, flattened NCHW -> NLC)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, hidden, h, w] -> [B, h*w, hidden]


class VectorEmbedder(nn.Module):
    """Linear -> SiLU -> Linear under Stability's names `mlp.0` / `mlp.2` (mmditx.py TimestepEmbedder's and
    VectorEmbedder's MLP; the same math as rectiflow.nn.embeddings.MLPEmbedder under BFL's names)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

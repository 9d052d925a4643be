"""The SD3 / SD3.5 MM-DiT (Stability-AI/sd3.5 mmditx.py MMDiTX), its config and presets.

Parameter names equal Stability's single-file keys (under `model.diffusion_model.`): `x_embedder.proj`,
`pos_embed`, `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`, `context_embedder`,
`joint_blocks.N.{context_block,x_block}.*`, `final_layer.*`, so the official files load with strict=True.

Call contract: model(x, t, y=pooled, context=tokens) with x the latents [B, C, H, W], t [B] in [0, 1] (our
time: 0 data, 1 noise; the reference and diffusers take 1000 t, the x1000 lives in
rectiflow.nn.embeddings.timestep_embedding), y [B, vec_in_dim] the pooled text vector, context [B, L,
context_in_dim] the text tokens. Returns the velocity [B, C, H, W] = eps - x0, our convention, which is
also SD3's (its sampler steps x + (sigma_next - sigma) * v).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.models.presets import resolve_params
from rectiflow.nn.blocks import LastLayer
from rectiflow.nn.embeddings import sincos_2d_embedding, timestep_embedding
from rectiflow.nn.mmdit import JointBlock, PatchEmbed, VectorEmbedder

__all__ = ["SD3Params", "MMDiT", "SD3_PRESETS", "sd3_params", "is_sd3_config", "TIME_EMBED_DIM"]

# mmditx.py MMDiTX(mlp_ratio=4.0, qkv_bias=True); diffusers' JointTransformerBlock fixes the same.
MLP_RATIO, QKV_BIAS = 4.0, True
# Width of the sinusoidal timestep features (mmditx.py TimestepEmbedder(frequency_embedding_size=256)).
TIME_EMBED_DIM = 256


@dataclass(frozen=True)
class SD3Params:
    """The dimensions of an MM-DiT. Fields mirror diffusers' SD3Transformer2DModel config (sample_size,
    pos_embed_max_size, dual_attention_layers, qk_norm) in our vocabulary. The MLP ratio (4) and the qkv
    biases are fixed (MLP_RATIO; mmditx.py MMDiTX defaults, diffusers hard-codes both).

    `sample_size` (latent pixels) only sets the scale of the freshly initialised sin-cos grid: positions are
    token_index / (pos_embed_max_size / (sample_size / patch_size)) (diffusers PatchEmbed base_size); loaded
    checkpoints carry their own `pos_embed` table.
    """

    hidden_size: int
    num_heads: int
    depth: int
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    context_in_dim: int = 4096
    vec_in_dim: int = 2048
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()
    pos_embed_max_size: int = 192
    sample_size: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        for name in ("hidden_size", "num_heads", "depth", "in_channels", "out_channels", "patch_size",
                     "context_in_dim", "vec_in_dim", "pos_embed_max_size", "sample_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"SD3Params.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"SD3Params.hidden_size {self.hidden_size} is not divisible by num_heads "
                              f"{self.num_heads}; pick hidden_size = num_heads * head_dim")
        if self.hidden_size % 4:
            raise ConfigError("SD3Params.hidden_size must be divisible by 4 (the 2D sin-cos embedding)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth - 1]
        if bad:
            raise ConfigError(f"SD3Params.dual_attention_layers {bad} must lie in 0..{self.depth - 2} (the "
                              "last block cannot have dual attention)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def guidance_embed(self) -> bool:
        """No SD3 / SD3.5 model is guidance-distilled (FluxParams has the field; generic code reads it)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


def _cpu_preset(hidden: int, heads: int, depth: int, dual: tuple[int, ...] = (), qk_norm: bool = False):
    # CPU presets: 16-channel latents, 384-d text features and pooled vector (the offline default text
    # encoder all-MiniLM-L6-v2 has width 384, as the FLUX CPU presets), head dim 64. A 32 x 32 token grid
    # covers 512-px images; sample_size 64 makes the grid's positions the plain token indices.
    return SD3Params(hidden_size=hidden, num_heads=heads, depth=depth, context_in_dim=384, vec_in_dim=384,
                     qk_norm=qk_norm, dual_attention_layers=dual, pos_embed_max_size=32, sample_size=64)


SD3_PRESETS: dict[str, SD3Params] = {
    # Published sizes (diffusers configs of stabilityai/stable-diffusion-3-medium-diffusers,
    # stable-diffusion-3.5-large and stable-diffusion-3.5-medium; Stability's MMDiTX sets hidden = 64 * depth
    # and heads = depth). 3.5 Large / Medium add RMS QK-norm; 3.5 Medium adds dual attention in blocks 0..12
    # and a 384 x 384 position grid.
    # Sizes: parameters + the stored position table = tensor elements in the file (the published "2B",
    # "8.1B" and "2.5B" count the table too).
    "sd3-medium": SD3Params(hidden_size=1536, num_heads=24, depth=24),  # 2.028B + 0.057B
    "sd3.5-large": SD3Params(hidden_size=2432, num_heads=38, depth=38, qk_norm=True),  # 8.057B + 0.090B
    "sd3.5-medium": SD3Params(hidden_size=1536, num_heads=24, depth=24, qk_norm=True,
                              dual_attention_layers=tuple(range(13)),
                              pos_embed_max_size=384),  # 2.243B + 0.226B
    "sd3-micro": _cpu_preset(hidden=64, heads=1, depth=2),  # unit tests
    "sd3-tiny": _cpu_preset(hidden=256, heads=4, depth=6),  # 13.9M, the size of the bundled FLUX model
    "sd3.5-tiny": _cpu_preset(hidden=256, heads=4, depth=6, dual=(0, 1, 2), qk_norm=True),  # 15.3M
}


def sd3_params(spec: str | SD3Params | dict[str, Any]) -> SD3Params:
    """A preset name, an SD3Params or a dict of SD3Params fields -> SD3Params."""
    return resolve_params(spec, SD3Params, SD3_PRESETS, "SD3 transformer")


def is_sd3_config(spec: Any) -> bool:
    """Whether a config (preset name, SD3Params or dict of fields) names an SD3 model (else: FLUX)."""
    if isinstance(spec, SD3Params):
        return True
    if isinstance(spec, str):
        return spec in SD3_PRESETS
    if isinstance(spec, dict):
        fields = {f.name for f in dataclasses.fields(SD3Params)}
        return "depth_single_blocks" not in spec and set(spec) <= fields
    return False


def position_table(params: SD3Params) -> torch.Tensor:
    """The fresh sin-cos table [1, max * max, hidden] (diffusers PatchEmbed with pos_embed_max_size:
    positions arange(max) / (max / base_size), base_size = sample_size / patch_size, float32; column
    features first, as mmditx.py get_2d_sincos_pos_embed)."""
    n = params.pos_embed_max_size
    base_size = params.sample_size // params.patch_size
    pos = torch.arange(n, dtype=torch.float32) / (n / base_size)  # [n]
    rows = pos[:, None].expand(n, n).reshape(1, -1)  # [1, n*n], row-major grid
    cols = pos[None, :].expand(n, n).reshape(1, -1)
    return sincos_2d_embedding(rows, cols, params.hidden_size)  # [1, n*n, hidden]


class MMDiT(nn.Module):
    """SD3 / SD3.5 MM-DiT: patch embedding + cropped sin-cos positions, adaLN conditioning from timestep +
    pooled text, `depth` joint blocks (the last one's context stream pre-only), final layer.
    Plain nn.Module."""

    def __init__(self, params: SD3Params | str | dict[str, Any]):
        super().__init__()
        params = sd3_params(params)
        self.params = params
        h = params.hidden_size
        self.x_embedder = PatchEmbed(params.in_channels, h, params.patch_size)
        # A persistent buffer: the checkpoints store the table (key `pos_embed`), and loaders must find it.
        self.register_buffer("pos_embed", position_table(params), persistent=True)
        self.t_embedder = VectorEmbedder(TIME_EMBED_DIM, h)
        self.y_embedder = VectorEmbedder(params.vec_in_dim, h)
        self.context_embedder = nn.Linear(params.context_in_dim, h)
        self.joint_blocks = nn.ModuleList(
            JointBlock(h, params.num_heads, MLP_RATIO, QKV_BIAS, params.qk_norm,
                       context_pre_only=i == params.depth - 1,
                       dual_attention=i in params.dual_attention_layers)
            for i in range(params.depth)
        )
        # mmditx.py FinalLayer = BFL's LastLayer: adaLN (shift, scale) + linear, same names.
        self.final_layer = LastLayer(h, params.patch_size**2 * params.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor,
                skip_layers: Collection[int] = ()) -> torch.Tensor:
        """x [B, in_channels, H, W] latents, t [B] in [0, 1], y [B, vec_in_dim], context [B, L,
        context_in_dim] -> velocity [B, out_channels, H, W]. `skip_layers`: joint blocks to skip (skip-layer
        guidance; mmditx.py forward(layer_drops=...), diffusers forward(skip_layers=...))."""
        self._check_inputs(x, t, y, context)
        p = self.params.patch_size
        height, width = x.shape[-2] // p, x.shape[-1] // p
        img = self.x_embedder(x) + self.cropped_pos_embed(height, width).to(x.dtype)  # [B, h*w, hidden]
        c = self.t_embedder(timestep_embedding(t.float(), TIME_EMBED_DIM).to(img.dtype))  # [B, hidden]
        c = c + self.y_embedder(y)
        ctx = self.context_embedder(context)  # [B, L, hidden]
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:
                ctx, img = block(ctx, img, c)
        out = self.final_layer(img, c)  # [B, h*w, p*p*C]
        # mmditx.py unpatchify: "b (h w) (p q c) -> b c (h p) (w q)"
        out = out.view(out.shape[0], height, width, p, p, self.params.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(out.shape[0], -1, height * p, width * p)

    def cropped_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The centre height x width window of the position grid -> [1, height * width, hidden]
        (mmditx.py cropped_pos_embed)."""
        n = self.params.pos_embed_max_size
        top, left = (n - height) // 2, (n - width) // 2
        grid = self.pos_embed.view(1, n, n, -1)  # [1, n, n, hidden]
        grid = grid[:, top : top + height, left : left + width]  # [1, h, w, hidden]
        return grid.reshape(1, height * width, -1)

    def _check_inputs(self, x, t, y, context) -> None:
        p = self.params
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise RectiflowError(f"x must be latents [B, {p.in_channels}, H, W], got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        if h % p.patch_size or w % p.patch_size:
            raise RectiflowError(f"latent size {h}x{w} is not divisible by {p.patch_size}; use image sizes "
                                 "divisible by 16")
        limit = p.pos_embed_max_size * p.patch_size
        if h > limit or w > limit:
            raise RectiflowError(f"latent size {h}x{w} exceeds this model's position grid ({limit}x{limit} "
                                 f"latents, {limit * 8} px); use a smaller image")
        if context.ndim != 3 or context.shape[-1] != p.context_in_dim:
            raise RectiflowError(f"context must be text tokens [B, L, {p.context_in_dim}], got shape "
                                 f"{tuple(context.shape)}")
        if y.ndim != 2 or y.shape[-1] != p.vec_in_dim:
            raise RectiflowError(f"y must be the pooled text vector [B, {p.vec_in_dim}], got shape "
                                 f"{tuple(y.shape)}")
        if t.ndim != 1:
            raise RectiflowError(f"t must be [B] in [0, 1], got shape {tuple(t.shape)}")
        for name, v in (("context", context), ("y", y), ("t", t)):
            if v.shape[0] != b:
                raise RectiflowError(f"{name} has batch size {v.shape[0]} but x has {b}; pass one per image")

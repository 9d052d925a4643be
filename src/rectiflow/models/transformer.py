"""The FLUX.1 transformer (BFL flux/model.py Flux), its config, presets and token helpers.

Parameter names equal the keys of BFL's flux1-schnell / flux1-dev safetensors files, so the official
checkpoints load with strict=True (776 and 780 tensors). Conventions (docs/design.md section 1): t in
[0, 1] with t = 0 data and t = 1 noise, the network predicts v = eps - x0; the x1000 time scale lives only in
rectiflow.nn.embeddings.timestep_embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.models.presets import resolve_params
from rectiflow.nn.blocks import DoubleStreamBlock, LastLayer, SingleStreamBlock
from rectiflow.nn.embeddings import MLPEmbedder, sincos_2d_embedding, timestep_embedding
from rectiflow.nn.rope import EmbedND

__all__ = [
    "FluxParams", "Flux", "TRANSFORMER_PRESETS", "transformer_params",
    "pack", "unpack", "image_ids", "text_ids", "PATCH_SIZE", "TIME_EMBED_DIM",
]

# FLUX packs 2x2 latent patches into one token
# (BFL sampling.py prepare(): "b c (h ph) (w pw) -> b (h w) (c ph pw)"); `FluxParams.patch_size` changes it
# (a rectiflow-only ablation: 1 gives a token per latent pixel, 4x the tokens).
PATCH_SIZE = 2
# Width of the sinusoidal timestep / guidance features (BFL model.py: MLPEmbedder(in_dim=256, ...)).
TIME_EMBED_DIM = 256
POS_EMBEDS = ("rope", "sincos")
# Text-token RoPE ids: "none" = all zero (FLUX prepare()); "index" = the token's index on axis 0, so joint
# attention sees relative word order (a rectiflow-only ablation: FLUX checkpoints cannot record it).
TEXT_POS = ("none", "index")


@dataclass(frozen=True)
class FluxParams:
    """BFL's FluxParams (flux/model.py) plus three ablations that FLUX checkpoints cannot record: `pos_embed`,
    "rope" (FLUX) or "sincos" (SD3-style absolute 2D sin-cos added to the image tokens, no RoPE);
    `text_pos`, "none" (FLUX: text ids all zero) or "index" (text token i gets RoPE id (i, 0, 0)); and
    `pooled_text`, True (FLUX: the pooled text vector y joins the adaLN conditioning through vector_in) or
    False (no vector_in: adaLN sees the timestep (and guidance) only, and the text reaches the image through
    joint attention alone; y is still passed, checked for shape, and ignored); and `patch_size`, the side of
    the latent patch one token packs (FLUX: 2, so in_channels = 4 x 16 latent channels; 1: a token per latent
    pixel, in_channels = 16); and `text_refiner`, the number of single-stream blocks that run over the text
    tokens alone (after txt_in, before the joint blocks, adaLN-conditioned on the same vector): a small
    trainable transformer over a frozen encoder's token states, the "token refiner" idea of HunyuanVideo
    (Kong et al. 2024, arXiv:2412.03603); FLUX: 0."""

    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    pos_embed: str = "rope"
    text_pos: str = "none"
    pooled_text: bool = True
    patch_size: int = PATCH_SIZE
    text_refiner: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        positive = ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"FluxParams.{name} must be a positive integer, got {getattr(self, name)}")
        if self.depth < 0 or self.depth_single_blocks < 0 or self.text_refiner < 0:
            raise ConfigError("FluxParams.depth, depth_single_blocks and text_refiner must be >= 0")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"FluxParams.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"FluxParams.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick hidden_size = num_heads * head_dim"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ConfigError(
                f"FluxParams.axes_dim {self.axes_dim} sums to {sum(self.axes_dim)} but the head dim is "
                f"{self.head_dim} (hidden_size / num_heads); make them equal"
            )
        if any(a <= 0 or a % 2 for a in self.axes_dim):
            raise ConfigError(
                f"FluxParams.axes_dim {self.axes_dim}: every RoPE axis needs a positive even width"
            )
        if self.theta <= 0:
            raise ConfigError(f"FluxParams.theta must be > 0, got {self.theta}")
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"FluxParams.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.text_pos not in TEXT_POS:
            raise ConfigError(f"FluxParams.text_pos must be one of {TEXT_POS}, got {self.text_pos!r}")
        if self.text_pos != "none" and self.pos_embed != "rope":
            raise ConfigError(f"FluxParams.text_pos={self.text_pos!r} needs pos_embed='rope'")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ConfigError("FluxParams.pos_embed='sincos' needs hidden_size divisible by 4")
        area = int(self.patch_size) ** 2
        if int(self.patch_size) < 1 or self.in_channels % area or self.out_channels % area:
            raise ConfigError(
                f"FluxParams.patch_size {self.patch_size}: in_channels and out_channels must be latent "
                f"channels x patch_size^2 (got {self.in_channels} and {self.out_channels}); for 16-channel "
                f"latents set in_channels = out_channels = {16 * max(1, int(self.patch_size)) ** 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent (in_channels / patch area)."""
        return self.in_channels // (self.patch_size * self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


def _flux_12b(guidance_embed: bool) -> FluxParams:
    # Published FLUX.1 [schnell] / [dev] dimensions
    # (BFL flux/util.py configs["flux-schnell"/"flux-dev"].params).
    return FluxParams(
        in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
        num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True,
        guidance_embed=guidance_embed,
    )


def _cpu_preset(hidden: int, heads: int, depth: int, single: int, axes=(8, 28, 28)) -> FluxParams:
    # CPU presets: 16-channel latents (64 packed), 384-d text features and pooled vector (the offline default
    # text encoder all-MiniLM-L6-v2 has width 384), head dim 64 split (8, 28, 28) in FLUX's proportions.
    return FluxParams(
        in_channels=64, out_channels=64, vec_in_dim=384, context_in_dim=384, hidden_size=hidden,
        mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=axes,
        theta=10_000, qkv_bias=True, guidance_embed=False,
    )


TRANSFORMER_PRESETS: dict[str, FluxParams] = {
    "flux-schnell": _flux_12b(guidance_embed=False),  # 11.9B parameters
    "flux-dev": _flux_12b(guidance_embed=True),  # 11.9B parameters
    "micro": _cpu_preset(hidden=64, heads=1, depth=1, single=1),  # ~0.2M, unit tests
    "tiny": _cpu_preset(hidden=256, heads=4, depth=2, single=4),  # ~9.3M
    "small": _cpu_preset(hidden=768, heads=6, depth=4, single=8, axes=(16, 56, 56)),  # ~159M
}


def transformer_params(spec: str | FluxParams | dict[str, Any]) -> FluxParams:
    """A preset name, a FluxParams or a dict of FluxParams fields -> FluxParams."""
    return resolve_params(spec, FluxParams, TRANSFORMER_PRESETS, "transformer")


class Flux(nn.Module):
    """FLUX.1 transformer: double-stream blocks, then single-stream blocks over [txt; img], adaLN from
    timestep + pooled text vector (+ guidance for guidance-distilled models). Plain nn.Module."""

    def __init__(self, params: FluxParams | str | dict[str, Any]):
        super().__init__()
        params = transformer_params(params)
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=params.hidden_size)
        # pooled_text=False: no module at all (an unused one would trip DDP's unused-parameter check)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size) if params.pooled_text else None
        self.guidance_in = (
            MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=params.hidden_size)
            if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        # text_refiner = 0 (FLUX): an empty list, so no extra state-dict keys
        self.txt_refiner = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.text_refiner)
        )
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, params.out_channels)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img [B, L_img, in_channels] packed latents, img_ids [B or 1, L_img, n_axes], txt [B, L_txt,
        context_in_dim], txt_ids [B or 1, L_txt, n_axes], timesteps [B] in [0, 1], y [B, vec_in_dim],
        guidance [B] (guidance-distilled models only) -> velocity [B, L_img, out_channels]."""
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img = self.img_in(img)  # [B, L_img, hidden]
        vec = self.time_in(timestep_embedding(timesteps.float(), TIME_EMBED_DIM).to(img.dtype))  # [B, hidden]
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance.float(), TIME_EMBED_DIM).to(img.dtype))
        if self.vector_in is not None:
            vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)  # [B, L_txt, hidden]
        if self.params.text_pos == "index":
            order = torch.arange(txt_ids.shape[1], device=txt_ids.device, dtype=txt_ids.dtype)
            txt_ids = txt_ids + F.pad(order[:, None], (0, txt_ids.shape[-1] - 1))  # (i, 0, 0) added per token
        if self.params.pos_embed == "rope":
            n = max(txt_ids.shape[0], img_ids.shape[0])  # ids may be shared ([1, ...]) or per image
            ids = torch.cat((txt_ids.expand(n, -1, -1), img_ids.expand(n, -1, -1)), dim=1)
            pe = self.pe_embedder(ids)  # RoPE tables for [txt; img]
        else:  # SD3-style absolute position of the image tokens (row, col), no RoPE
            img = img + sincos_2d_embedding(img_ids[..., 1], img_ids[..., 2], self.hidden_size).to(img.dtype)
            pe = None
        # the text's own positions only: the first L_txt rows of the [txt; img] RoPE tables
        pe_txt = None if pe is None else pe.tokens(0, txt.shape[1])
        for block in self.txt_refiner:
            txt = block(txt, vec, pe_txt)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)  # [B, L_txt + L_img, hidden]
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)  # [B, L_img, out_channels]

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
        p = self.params
        n_axes = len(p.axes_dim)
        _check_shape("img", img, 3, p.in_channels, "[B, L_img, in_channels] packed latents (see pack())")
        batch = img.shape[0]
        _check_shape("txt", txt, 3, p.context_in_dim, "[B, L_txt, context_in_dim] text features")
        _check_shape("y", y, 2, p.vec_in_dim, "[B, vec_in_dim] pooled text vector")
        _check_shape("img_ids", img_ids, 3, n_axes, "[B, L_img, n_axes] position ids (see image_ids())")
        _check_shape("txt_ids", txt_ids, 3, n_axes, "[B, L_txt, n_axes] position ids (see text_ids())")
        if timesteps.ndim != 1:
            raise RectiflowError(f"timesteps must be [B] in [0, 1], got shape {tuple(timesteps.shape)}")
        for name, t in (("txt", txt), ("y", y), ("timesteps", timesteps)):
            if t.shape[0] != batch:
                raise RectiflowError(
                    f"{name} has batch size {t.shape[0]} but img has {batch}; pass one per image"
                )
        for name, ids, tokens in (("img_ids", img_ids, img), ("txt_ids", txt_ids, txt)):
            if ids.shape[1] != tokens.shape[1]:
                raise RectiflowError(
                    f"{name} has {ids.shape[1]} positions but there are {tokens.shape[1]} tokens; "
                    "build the ids for the same size"
                )
            if ids.shape[0] not in (1, batch):
                raise RectiflowError(f"{name} has batch size {ids.shape[0]}; use 1 (shared) or {batch}")
        if p.guidance_embed:
            if guidance is None:
                raise RectiflowError(
                    "this model is guidance-distilled (guidance_embed=True): pass guidance [B]"
                )
            if guidance.shape != (batch,):
                raise RectiflowError(f"guidance must have shape [{batch}], got {tuple(guidance.shape)}")


def _check_shape(name: str, t: torch.Tensor, ndim: int, last: int, what: str) -> None:
    if t.ndim != ndim:
        raise RectiflowError(f"{name} must be {what}, got a {t.ndim}-d tensor of shape {tuple(t.shape)}")
    if t.shape[-1] != last:
        raise RectiflowError(f"{name} must be {what}: last dimension {t.shape[-1]} should be {last}")


def _odd_size(h: int, w: int, patch: int) -> RectiflowError:
    return RectiflowError(
        f"latent size {h}x{w} is not divisible by {patch}; use image sizes divisible by {8 * patch}"
    )


def pack(latents: torch.Tensor, patch: int = PATCH_SIZE) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/p)(W/p), p*p*C] tokens, "b c (h ph) (w pw) -> b (h w) (c ph pw)"
    (FLUX, p = 2)."""
    if latents.ndim != 4:
        raise RectiflowError(f"pack expects latents [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise _odd_size(h, w, patch)
    x = latents.view(b, c, h // patch, patch, w // patch, patch)  # b c h ph w pw
    x = x.permute(0, 2, 4, 1, 3, 5)  # b h w c ph pw
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)  # b (h w) (c ph pw)


def unpack(tokens: torch.Tensor, h: int, w: int, patch: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of pack: [B, (h/p)(w/p), p*p*C] -> [B, C, h, w]; h, w are the LATENT height and width."""
    if h % patch or w % patch:
        raise _odd_size(h, w, patch)
    area, n = patch * patch, (h // patch) * (w // patch)
    if tokens.ndim != 3 or tokens.shape[1] != n or tokens.shape[2] % area:
        raise RectiflowError(
            f"unpack: tokens of shape {tuple(tokens.shape)} do not fit a {h}x{w} latent "
            f"(expected [B, {n}, {area}C])"
        )
    b, _, f = tokens.shape
    x = tokens.view(b, h // patch, w // patch, f // area, patch, patch)  # b h w c ph pw
    x = x.permute(0, 3, 1, 4, 2, 5)  # b c h ph w pw
    return x.reshape(b, f // area, h, w)  # b c (h ph) (w pw)


def image_ids(b: int, h: int, w: int, device: torch.device | str = "cpu",
              patch: int = PATCH_SIZE) -> torch.Tensor:
    """Position ids [b, (h/p)(w/p), 3] = (0, row, col) of the packed tokens of an h x w LATENT
    (FLUX prepare(), p = 2)."""
    if h % patch or w % patch:
        raise _odd_size(h, w, patch)
    ids = torch.zeros(h // patch, w // patch, 3, device=device)  # [h/p, w/p, 3]
    ids[..., 1] = torch.arange(h // patch, device=device)[:, None]
    ids[..., 2] = torch.arange(w // patch, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(b, -1, -1).contiguous()  # [b, (h/p)(w/p), 3]


def text_ids(b: int, l: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Text position ids [b, l, 3], all zero (FLUX prepare())."""
    return torch.zeros(b, l, 3, device=device)

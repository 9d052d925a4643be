"""FLUX's autoencoder: a convolutional VAE with 16 latent channels and 8x downsampling.

Architecture and parameter names follow BFL's flux/modules/autoencoder.py (so `ae.safetensors` loads with
strict=True and no renaming): ResNet blocks with GroupNorm + SiLU, one single-head self-attention block in
the middle of encoder and decoder, strided-conv downsampling with (0, 1, 0, 1) padding, nearest-neighbour
upsampling + conv. The encoder outputs a diagonal Gaussian (mean, log-variance); `encode` returns the
normalised mean scale_factor * (mean - shift_factor) and `decode` inverts the normalisation first.

Shapes: x [B, 3, H, W] in [-1, 1] with H, W divisible by 2 ** (len(ch_mult) - 1); z [B, z_channels, H/f, W/f].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rectiflow.errors import ConfigError
from rectiflow.models.presets import resolve_params

__all__ = ["AutoEncoderParams", "AutoEncoder", "AE_PRESETS", "autoencoder_params"]


@dataclass(frozen=True)
class AutoEncoderParams:
    """Field names as BFL's AutoEncoderParams, plus norm_groups (GroupNorm groups; BFL hard-codes 32)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ConfigError(f"ch_mult {self.ch_mult} must be a non-empty tuple of positive integers")
        for name in ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"AutoEncoderParams.{name} must be >= 1, got {getattr(self, name)}")
        widths = {self.ch * m for m in self.ch_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ConfigError(f"channel widths {bad} are not divisible by norm_groups={self.norm_groups}; "
                              "change ch, ch_mult or norm_groups")
        if self.scale_factor == 0:
            raise ConfigError("scale_factor must be non-zero")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d


AE_PRESETS: dict[str, AutoEncoderParams] = {
    # Published FLUX.1 autoencoder (BFL flux/util.py ae_params: resolution 256, ch 128, ch_mult [1, 2, 4, 4],
    # num_res_blocks 2, z_channels 16, scale_factor 0.3611, shift_factor 0.1159): 84M parameters.
    "flux": AutoEncoderParams(),
    # SD3 / SD3.5's autoencoder: FLUX's architecture with its own latent normalisation (diffusers
    # stable-diffusion-3-medium vae/config.json scaling_factor 1.5305, shift_factor 0.0609; Stability
    # sd3_impls.py SD3LatentFormat the same).
    "sd3": AutoEncoderParams(scale_factor=1.5305, shift_factor=0.0609),
    # CPU sizes with FLUX's latent interface (16 channels, 8x down). "small": ~1.27M parameters.
    "small": AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=16),
    # "tiny": ~0.1M parameters, for tests.
    "tiny": AutoEncoderParams(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4),
}


def autoencoder_params(spec: str | AutoEncoderParams | dict[str, Any]) -> AutoEncoderParams:
    """A preset name, an AutoEncoderParams or a dict of its fields -> AutoEncoderParams."""
    return resolve_params(spec, AutoEncoderParams, AE_PRESETS, "autoencoder")


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)  # eps 1e-6 as BFL / diffusers AutoencoderKL


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 convs for q, k, v and the output)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, HW, C]
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(a.transpose(-1, -2).reshape(b, c, h, w))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding as BFL / LDM: [H, W] -> [H/2, W/2]


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        g = p.norm_groups
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = p.ch
        for i, mult in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            cout = p.ch * mult
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, g))
                cin = cout
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = _Mid(cin, g)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2 z, H/f, W/f]: mean and log-variance


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        g = p.norm_groups
        cin = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, g)
        up = []
        for i in reversed(range(len(p.ch_mult))):  # built deepest first, stored shallowest first (BFL order)
            level = nn.Module()
            level.block = nn.ModuleList()
            cout = p.ch * p.ch_mult[i]
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout, g))
                cin = cout
            if i != 0:
                level.upsample = Upsample(cin)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """encode: images [-1, 1] -> normalised latents; decode: normalised latents -> images (about [-1, 1])."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def _check(self, x: torch.Tensor, channels: int, what: str, f: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ConfigError(f"{what} must be [B, {channels}, H, W], got {list(x.shape)}")
        if f > 1 and (x.shape[-2] % f or x.shape[-1] % f):
            raise ConfigError(f"image size {x.shape[-2]}x{x.shape[-1]} is not divisible by {f}; "
                              f"resize or crop to a multiple of {f}")

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised (mean, logvar) of the posterior, each [B, z, H/f, W/f]; logvar clamped as BFL."""
        self._check(x, self.params.in_channels, "images", self.params.downsample)
        mean, logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Normalised latents scale * (z - shift), z the posterior mean (or a sample with `sample=True`)."""
        mean, logvar = self.encode_moments(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device="cpu" if generator is None
                              else generator.device, dtype=torch.float32).to(mean)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.params.z_channels, "latents", 1)
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

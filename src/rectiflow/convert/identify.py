"""What is in a checkpoint, judged from its key names and shapes alone (no tensor data is read).

- `find_prefix(keys, anchors)`: the prefix under which a model's keys live (e.g. ComfyUI's
  `model.diffusion_model.`), or None.
- `guess_checkpoint(keys)`: a human description of what a non-matching file probably is ("a FLUX
  autoencoder (ae.safetensors)", "an SD3 / SD3.5 MMDiT", "an SD 1.x / SDXL UNet", a LoRA, a text encoder,
  a quantized file), or None.
- `flux_dims(shapes, layout)`: the FLUX transformer dimensions that the shapes determine, for the BFL layout
  ("bfl": flux1-dev.safetensors keys) or the diffusers layout ("diffusers": FluxTransformer2DModel keys).
- `flux_variant(dims)`: "flux-schnell", "flux-dev", "flux-dev-fill", "flux-dev-canny/depth" or "custom".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

# Where each FLUX dimension can be read, as (key, axis) in the BFL layout and in diffusers' layout
# (diffusers/models/transformers/transformer_flux.py: FluxTransformer2DModel).
_FLUX_SHAPE_KEYS: dict[str, dict[str, tuple[str, int]]] = {
    "bfl": {
        "hidden_size": ("img_in.weight", 0),
        "in_channels": ("img_in.weight", 1),
        "out_channels": ("final_layer.linear.weight", 0),
        "context_in_dim": ("txt_in.weight", 1),
        "vec_in_dim": ("vector_in.in_layer.weight", 1),
        "double_head_dim": ("double_blocks.0.img_attn.norm.query_norm.scale", 0),
        "single_head_dim": ("single_blocks.0.norm.query_norm.scale", 0),
        "double_mlp": ("double_blocks.0.img_mlp.0.weight", 0),
        "single_in": ("single_blocks.0.linear1.weight", 0),  # 3 * hidden + mlp_hidden
    },
    "diffusers": {
        "hidden_size": ("x_embedder.weight", 0),
        "in_channels": ("x_embedder.weight", 1),
        "out_channels": ("proj_out.weight", 0),
        "context_in_dim": ("context_embedder.weight", 1),
        "vec_in_dim": ("time_text_embed.text_embedder.linear_1.weight", 1),
        "double_head_dim": ("transformer_blocks.0.attn.norm_q.weight", 0),
        "single_head_dim": ("single_transformer_blocks.0.attn.norm_q.weight", 0),
        "double_mlp": ("transformer_blocks.0.ff.net.0.proj.weight", 0),
        "single_mlp": ("single_transformer_blocks.0.proj_mlp.weight", 0),
    },
}
_BLOCK_RE = {
    "bfl": (re.compile(r"double_blocks\.(\d+)\."), re.compile(r"single_blocks\.(\d+)\.")),
    "diffusers": (re.compile(r"transformer_blocks\.(\d+)\."),
                  re.compile(r"single_transformer_blocks\.(\d+)\.")),
}
_GUIDANCE_KEY = {"bfl": "guidance_in.in_layer.weight",
                 "diffusers": "time_text_embed.guidance_embedder.linear_1.weight"}
_QKV_BIAS_KEY = {"bfl": "double_blocks.0.img_attn.qkv.bias",
                 "diffusers": "transformer_blocks.0.attn.to_q.bias"}
_PLAIN_DIMS = ("hidden_size", "in_channels", "out_channels", "context_in_dim", "vec_in_dim")
ANCHORS = {"bfl": "img_in.weight", "diffusers": "x_embedder.weight"}

# Published FLUX.1 12B dimensions and the image-input widths of its variants (BFL flux/util.py configs:
# flux-dev / flux-schnell in_channels=64, flux-dev-canny and flux-dev-depth 128, flux-dev-fill 384; all with
# out_channels=64, hidden 3072, 19 double + 38 single blocks, context 4096, vec 768).
_FLUX_12B = {"hidden_size": 3072, "depth": 19, "depth_single_blocks": 38, "context_in_dim": 4096,
             "vec_in_dim": 768, "out_channels": 64}
VARIANT_IN_CHANNELS = {64: None, 128: "flux-dev-canny/depth", 384: "flux-dev-fill"}


def find_prefix(keys: Iterable[str], anchors: Collection[str]) -> str | None:
    """The shortest prefix p such that p + anchor is a key, for any anchor; None if no anchor occurs."""
    best = None
    for k in keys:
        for a in anchors:
            if k.endswith(a) and (best is None or len(k) - len(a) < len(best)):
                best = k[: len(k) - len(a)]
    return best


def _count(keys: Iterable[str], pattern: re.Pattern) -> int:
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(idx) + 1 if idx else 0


def flux_dims(shapes: Mapping[str, tuple[int, ...]], layout: str) -> dict[str, object]:
    """Everything about a FLUX transformer that its shapes determine (missing keys simply omit a field)."""
    raw = {name: int(shapes[key][axis]) for name, (key, axis) in _FLUX_SHAPE_KEYS[layout].items()
           if key in shapes and len(shapes[key]) > axis}
    dims: dict[str, object] = {k: raw[k] for k in _PLAIN_DIMS if k in raw}
    double_re, single_re = _BLOCK_RE[layout]  # re.match anchors at the start: "single_transformer_blocks"
    dims["depth"] = _count(shapes, double_re)  # does not count as "transformer_blocks"
    dims["depth_single_blocks"] = _count(shapes, single_re)
    dims["guidance_embed"] = _GUIDANCE_KEY[layout] in shapes
    if dims["depth"]:  # BFL single blocks always carry biases, only double blocks show qkv_bias
        dims["qkv_bias"] = _QKV_BIAS_KEY[layout] in shapes
    head_dim = raw.get("double_head_dim") or raw.get("single_head_dim")  # QK-norm scale has head_dim entries
    if head_dim:
        dims["head_dim"] = head_dim
    hidden = raw.get("hidden_size")
    mlp = raw.get("double_mlp") or raw.get("single_mlp")
    if not mlp and hidden and "single_in" in raw:
        mlp = raw["single_in"] - 3 * hidden  # linear1 rows: q, k, v (hidden each) + mlp_hidden
    if mlp and hidden:
        dims["mlp_ratio"] = mlp / hidden
    return dims


def flux_variant(dims: Mapping[str, object]) -> str:
    """Name the published FLUX.1 variant these dimensions belong to, or "custom"."""
    if any(dims.get(k) != v for k, v in _FLUX_12B.items()):
        return "custom"
    in_ch = dims.get("in_channels")
    if in_ch == 64:
        return "flux-dev" if dims.get("guidance_embed") else "flux-schnell"
    return VARIANT_IN_CHANNELS.get(in_ch) or "custom"


def _any(keys: Collection[str], *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def guess_checkpoint(keys: Collection[str]) -> str | None:
    """What a checkpoint that is not a FLUX transformer most likely is, from its key names."""
    ks = list(keys)
    if _any(ks, "lora_A", "lora_B", "lora_up", "lora_down", ".lora.", "lora_unet_", "lora_te"):
        return "a LoRA adapter, not a full transformer: load the base model, then apply the LoRA"
    if _any(ks, ".absmax", ".quant_map", "bitsandbytes__", ".qweight", ".scales"):
        return ("a quantized (bitsandbytes / GPTQ-style) checkpoint, which rectiflow cannot read: "
                "use the bf16 file")
    if _any(ks, "first_stage_model.") and not _any(ks, "diffusion_model."):
        return "an autoencoder from a full SD checkpoint, not a transformer"
    if _any(ks, "encoder.conv_in.", "decoder.conv_out."):
        if _any(ks, "down_blocks.", "up_blocks."):
            return "a diffusers AutoencoderKL (vae/ folder), not a transformer: load it with load_autoencoder"
        return "a FLUX autoencoder (ae.safetensors), not a transformer: load it with load_autoencoder"
    if _any(ks, "joint_blocks."):
        return "an SD3 / SD3.5 MMDiT checkpoint, not FLUX"
    if _any(ks, "pos_embed.proj.") and _any(ks, "transformer_blocks."):
        return "a diffusers SD3Transformer2DModel, not FLUX"
    if _any(ks, "input_blocks.", "middle_block."):
        kind = "SDXL" if _any(ks, "label_emb.") else "SD 1.x / 2.x"
        return f"an {kind} UNet checkpoint, not FLUX"
    if _any(ks, "down_blocks.") and _any(ks, "mid_block."):
        kind = "SDXL" if _any(ks, "add_embedding.") else "SD 1.x / 2.x"
        return f"a diffusers {kind} UNet2DConditionModel, not FLUX"
    if _any(ks, "text_model.encoder.layers."):
        return "a CLIP text encoder, not a transformer"
    if _any(ks, "SelfAttention.q.", "shared.weight"):
        return "a T5 text encoder, not a transformer"
    return None


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A transformer checkpoint as found on disk, before any tensor data is read: the file (or diffusers
    transformer/ folder), its format, its tensors by native key name (prefix stripped) and the params its
    metadata / config.json records, if any. Each family subclasses it with its `layout` names."""

    path: Path
    format: str
    tensors: dict  # native key -> rectiflow.io.safetensors_io.TensorInfo
    params: Any  # the family's params dataclass, or None when the file does not record them
    prefix: str = ""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    @property
    def layout(self) -> str:
        """The key-name layout: "diffusers", or the family's native one."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

"""Exact state-dict conversion between BFL's FLUX layout (= rectiflow's parameter names) and diffusers'
FluxTransformer2DModel layout. Pure functions on dicts of tensors; no I/O.

Differences handled (reference: diffusers loaders/single_file_utils.py
convert_flux_transformer_checkpoint_to_diffusers, read for the key names):
- double blocks: fused `img_attn.qkv` / `txt_attn.qkv` ([3 * hidden, hidden], rows q, k, v) vs separate
  `attn.to_q/to_k/to_v` and `attn.add_q_proj/add_k_proj/add_v_proj`;
- single blocks: fused `linear1` (rows q, k, v, mlp-in) vs `attn.to_q/to_k/to_v` + `proj_mlp`; `linear2` vs
  `proj_out`;
- final layer: BFL's adaLN output is (shift, scale), diffusers' AdaLayerNormContinuous expects (scale, shift);
- renames of embedders, modulations and QK-norm scales (`scale` vs `weight`).
BFL models built with qkv_bias=False have no qkv biases while diffusers always has them: zeros are written
going to diffusers, and they must be zero coming back. Split tensors are cloned so that no two outputs share
storage (safetensors refuses shared tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from rectiflow.errors import FormatError
from rectiflow.models.transformer import FluxParams, transformer_params

__all__ = ["bfl_to_diffusers", "diffusers_to_bfl", "linear_module_map"]

StateDict = dict[str, torch.Tensor]

# One-to-one renames, BFL name -> diffusers name (both without the .weight / .bias suffix).
_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_GUIDANCE = {
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
_DOUBLE = {  # per block: double_blocks.{i}.X -> transformer_blocks.{i}.Y
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {  # .scale -> .weight
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
# per block: single_blocks.{i}.X -> single_transformer_blocks.{i}.Y
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
_QKV_IMG = ("attn.to_q", "attn.to_k", "attn.to_v")
_QKV_TXT = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: BFL's (shift, scale) <-> diffusers' (scale, shift); an involution."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class _Converter:
    """Moves tensors from `src` (a private copy) to `out`, so leftovers and gaps can be reported."""

    def __init__(self, sd: Mapping[str, torch.Tensor], direction: str, model: str = "FLUX transformer"):
        self.src = dict(sd)
        self.out: StateDict = {}
        self.direction = direction
        self.model = model  # named in errors

    def take(self, key: str) -> torch.Tensor:
        if key not in self.src:
            raise FormatError(
                f"{self.direction}: missing key {key!r}; is this a {self.model} of the given config?"
            )
        return self.src.pop(key)

    def rename(self, a: str, b: str, suffixes=(".weight", ".bias"), fn: Callable | None = None) -> None:
        for s in suffixes:
            t = self.take(a + s)
            self.out[b + s] = fn(t) if fn else t

    def split(self, a: str, bs: tuple[str, ...], sizes: list[int], bias: bool = True) -> None:
        for s in (".weight", ".bias") if bias else (".weight",):
            for b, part in zip(bs, self.take(a + s).split(sizes, dim=0)):
                self.out[b + s] = part.clone()

    def merge(self, as_: tuple[str, ...], b: str, bias: bool = True) -> None:
        self.out[b + ".weight"] = torch.cat([self.take(a + ".weight") for a in as_], dim=0)
        biases = [self.take(a + ".bias") for a in as_]
        if bias:
            self.out[b + ".bias"] = torch.cat(biases, dim=0)
        elif any(bool(x.any()) for x in biases):
            raise FormatError(
                f"{self.direction}: {as_[0]}.bias is non-zero but the config has qkv_bias=False; "
                "use a config with qkv_bias=True"
            )

    def finish(self) -> StateDict:
        if self.src:
            extra = sorted(self.src)
            raise FormatError(
                f"{self.direction}: {len(extra)} unexpected key(s), e.g. {extra[:5]}; the state dict does "
                f"not match the given config or is not a {self.model}"
            )
        return self.out


def _sizes(p: FluxParams) -> tuple[int, int]:
    return p.hidden_size, int(p.hidden_size * p.mlp_ratio)


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor], params: FluxParams | str | dict) -> StateDict:
    """BFL / rectiflow state dict -> diffusers FluxTransformer2DModel state dict (exact; input untouched)."""
    p = transformer_params(params)
    h, mlp = _sizes(p)
    c = _Converter(sd, "bfl_to_diffusers")
    for a, b in {**_GLOBAL, **(_GUIDANCE if p.guidance_embed else {})}.items():
        c.rename(a, b)
    c.rename("final_layer.adaLN_modulation.1", "norm_out.linear", fn=_swap_halves)
    for i in range(p.depth):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for a, b in _DOUBLE.items():
            c.rename(src + a, dst + b)
        for a, b in _DOUBLE_NORMS.items():
            c.out[dst + b + ".weight"] = c.take(src + a + ".scale")
        for stream, names in (("img_attn", _QKV_IMG), ("txt_attn", _QKV_TXT)):
            c.split(src + stream + ".qkv", tuple(dst + n for n in names), [h, h, h], bias=p.qkv_bias)
            if not p.qkv_bias:  # diffusers always has q/k/v biases: exact zeros reproduce bias-free BFL
                w = c.out[dst + names[0] + ".weight"]
                for n in names:
                    c.out[dst + n + ".bias"] = torch.zeros(h, dtype=w.dtype, device=w.device)
    for i in range(p.depth_single_blocks):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for a, b in _SINGLE.items():
            c.rename(src + a, dst + b)
        for a, b in _SINGLE_NORMS.items():
            c.out[dst + b + ".weight"] = c.take(src + a + ".scale")
        c.split(src + "linear1", tuple(dst + n for n in _LINEAR1), [h, h, h, mlp])
    return c.finish()


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor], params: FluxParams | str | dict) -> StateDict:
    """diffusers FluxTransformer2DModel state dict -> BFL / rectiflow state dict (exact; input untouched)."""
    p = transformer_params(params)
    c = _Converter(sd, "diffusers_to_bfl")
    for a, b in {**_GLOBAL, **(_GUIDANCE if p.guidance_embed else {})}.items():
        c.rename(b, a)
    c.rename("norm_out.linear", "final_layer.adaLN_modulation.1", fn=_swap_halves)
    for i in range(p.depth):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for a, b in _DOUBLE.items():
            c.rename(src + b, dst + a)
        for a, b in _DOUBLE_NORMS.items():
            c.out[dst + a + ".scale"] = c.take(src + b + ".weight")
        for stream, names in (("img_attn", _QKV_IMG), ("txt_attn", _QKV_TXT)):
            c.merge(tuple(src + n for n in names), dst + stream + ".qkv", bias=p.qkv_bias)
    for i in range(p.depth_single_blocks):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for a, b in _SINGLE.items():
            c.rename(src + b, dst + a)
        for a, b in _SINGLE_NORMS.items():
            c.out[dst + a + ".scale"] = c.take(src + b + ".weight")
        c.merge(tuple(src + n for n in _LINEAR1), dst + "linear1")
    return c.finish()


def linear_module_map(params: FluxParams | str | dict) -> dict[str, tuple[str, int, int, bool]]:
    """Every linear layer's diffusers module name -> (BFL module name, first row, end row, halves swapped):
    the rows of the BFL weight it is (a slice of a fused qkv / linear1, or all of it), and whether its rows
    are BFL's with the two halves swapped (norm_out.linear). For LoRA files, whose keys name modules."""
    p = transformer_params(params)
    h, mlp = _sizes(p)
    out: dict[str, tuple[str, int, int, bool]] = {}
    for a, b in {**_GLOBAL, **(_GUIDANCE if p.guidance_embed else {})}.items():
        if a.startswith("vector_in") and not p.pooled_text:
            continue
        rows = {"img_in": h, "txt_in": h, "final_layer.linear": p.out_channels}.get(a, h)
        out[b] = (a, 0, rows, False)
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", 0, 2 * h, True)
    for i in range(p.depth):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for a, b in _DOUBLE.items():
            rows = {"img_mod.lin": 6 * h, "txt_mod.lin": 6 * h, "img_mlp.0": mlp, "txt_mlp.0": mlp}.get(a, h)
            out[dst + b] = (src + a, 0, rows, False)
        for stream, names in (("img_attn", _QKV_IMG), ("txt_attn", _QKV_TXT)):
            for k, n in enumerate(names):
                out[dst + n] = (src + stream + ".qkv", k * h, (k + 1) * h, False)
    for i in range(p.depth_single_blocks):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out[dst + "norm.linear"] = (src + "modulation.lin", 0, 3 * h, False)
        out[dst + "proj_out"] = (src + "linear2", 0, h, False)
        for k, n in enumerate(_LINEAR1):
            out[dst + n] = (src + "linear1", k * h, (k + 1) * h if k < 3 else 3 * h + mlp, False)
    return out

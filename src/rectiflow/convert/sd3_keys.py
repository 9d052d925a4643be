"""Exact state-dict conversion between Stability's SD3 / SD3.5 layout (= rectiflow's MMDiT parameter names)
and diffusers' SD3Transformer2DModel layout. Pure functions on dicts of tensors; no I/O.

Differences handled (reference: diffusers loaders/single_file_utils.py
convert_sd3_transformer_checkpoint_to_diffusers, read for the key names):
- fused `attn.qkv` ([3 * hidden, hidden], rows q, k, v) vs `to_q/to_k/to_v` (image stream),
  `add_q_proj/add_k_proj/add_v_proj` (context stream) and `attn2.to_q/to_k/to_v` (dual attention);
- the final layer's and the last (pre-only) context block's adaLN output is (shift, scale) in Stability's
  layout and (scale, shift) in diffusers' AdaLayerNormContinuous; the 6- and 9-vector modulations agree;
- renames of embedders, norms, MLPs and output projections.
"""

from __future__ import annotations

from collections.abc import Mapping

from rectiflow.convert.flux_keys import StateDict, _Converter, _swap_halves
from rectiflow.models.sd3 import SD3Params, sd3_params

__all__ = ["stability_to_diffusers", "diffusers_to_stability"]

_MODEL = "SD3 / SD3.5 transformer"
# One-to-one renames, Stability name -> diffusers name (without .weight / .bias).
_GLOBAL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
# per block: joint_blocks.{i}.X -> transformer_blocks.{i}.Y
_X_BLOCK = {
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
}
_CONTEXT_BLOCK = {  # all but the last block (whose context stream is pre-only)
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
_QK_NORMS = {  # weights only
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
}
_DUAL = {"x_block.attn2.proj": "attn2.to_out.0"}
_DUAL_NORMS = {"x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_QKV_DUAL = {"x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _block_tables(p: SD3Params, i: int):
    """(renames, qk-norm renames, fused qkv) of joint block i, Stability name -> diffusers name(s)."""
    last, dual = i == p.depth - 1, i in p.dual_attention_layers
    renames = {**_X_BLOCK, **({} if last else _CONTEXT_BLOCK), **(_DUAL if dual else {})}
    norms = {**_QK_NORMS, **(_DUAL_NORMS if dual else {})} if p.qk_norm else {}
    qkv = {**_QKV, **(_QKV_DUAL if dual else {})}
    return renames, norms, qkv


def stability_to_diffusers(sd: Mapping, params: SD3Params | str | dict) -> StateDict:
    """Stability / rectiflow MMDiT state dict -> diffusers SD3Transformer2DModel state dict (exact)."""
    p = sd3_params(params)
    h = p.hidden_size
    c = _Converter(sd, "stability_to_diffusers", _MODEL)
    c.out["pos_embed.pos_embed"] = c.take("pos_embed")
    for a, b in _GLOBAL.items():
        c.rename(a, b)
    c.rename("final_layer.adaLN_modulation.1", "norm_out.linear", fn=_swap_halves)
    for i in range(p.depth):
        src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        renames, norms, qkv = _block_tables(p, i)
        for a, b in renames.items():
            c.rename(src + a, dst + b)
        if i == p.depth - 1:  # pre-only context stream: AdaLayerNormContinuous, (scale, shift)
            c.rename(src + "context_block.adaLN_modulation.1", dst + "norm1_context.linear", fn=_swap_halves)
        for a, b in norms.items():
            c.out[dst + b + ".weight"] = c.take(src + a + ".weight")
        for a, bs in qkv.items():
            c.split(src + a, tuple(dst + b for b in bs), [h, h, h], bias=True)
    return c.finish()


def diffusers_to_stability(sd: Mapping, params: SD3Params | str | dict) -> StateDict:
    """diffusers SD3Transformer2DModel state dict -> Stability / rectiflow MMDiT state dict (exact)."""
    p = sd3_params(params)
    c = _Converter(sd, "diffusers_to_stability", _MODEL)
    c.out["pos_embed"] = c.take("pos_embed.pos_embed")
    for a, b in _GLOBAL.items():
        c.rename(b, a)
    c.rename("norm_out.linear", "final_layer.adaLN_modulation.1", fn=_swap_halves)
    for i in range(p.depth):
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        renames, norms, qkv = _block_tables(p, i)
        for a, b in renames.items():
            c.rename(src + b, dst + a)
        if i == p.depth - 1:
            c.rename(src + "norm1_context.linear", dst + "context_block.adaLN_modulation.1", fn=_swap_halves)
        for a, b in norms.items():
            c.out[dst + a + ".weight"] = c.take(src + b + ".weight")
        for a, bs in qkv.items():
            c.merge(tuple(src + b for b in bs), dst + a, bias=True)
    return c.finish()

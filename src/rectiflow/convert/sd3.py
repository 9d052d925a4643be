"""SD3 / SD3.5 transformer checkpoints: identify, infer the config, load, save.

Formats (rectiflow.convert.transformer dispatches here when a file or config is SD3's)
- "stability": one safetensors file with Stability's keys under `model.diffusion_model.`
  (sd3_medium.safetensors, sd3.5_large.safetensors, sd3.5_medium.safetensors; the all-in-one files that also
  hold `text_encoders.clip_l.*`, `clip_g.*`, `t5xxl.*` and `first_stage_model.*` are read too: tensors outside
  the transformer's prefix are ignored). Read with any prefix, or none; written with `model.diffusion_model.`.
- "diffusers": a `transformer/` folder of SD3Transformer2DModel (config.json + weights, sharded or not), or
  the pipeline folder holding one. Keys converted exactly by rectiflow.convert.sd3_keys.
- "rectiflow": Stability's keys without prefix, the config in the metadata (`rectiflow.model` =
  "sd3-transformer", `rectiflow.config` = SD3Params fields).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rectiflow.convert.identify import CheckpointSource, find_prefix
from rectiflow.errors import ConfigError, FormatError
from rectiflow.io.atomic import atomic_dir
from rectiflow.io.metadata import (
    FORMAT_VERSION,
    META_CONFIG,
    META_MODEL,
    META_VERSION,
    SD3_TRANSFORMER_KIND,
    rectiflow_header,
)
from rectiflow.io.safetensors_io import (
    check_save_path,
    iter_tensors,
    read_diffusers_weights,
    read_header,
    save_safetensors,
    save_sharded,
    state_dict_mismatch,
)
from rectiflow.models.sd3 import MLP_RATIO, SD3_PRESETS, MMDiT, SD3Params, is_sd3_config, sd3_params

__all__ = ["SD3_FORMATS", "inspect_sd3", "infer_sd3_params", "describe_sd3", "load_sd3",
           "save_sd3", "sd3_diffusers_config", "sd3_params_from_diffusers_config", "is_sd3_config"]

log = logging.getLogger(__name__)

SD3_FORMATS = ("rectiflow", "stability", "diffusers")
DIFFUSERS_CLASS = "SD3Transformer2DModel"
SINGLE_FILE_PREFIX = "model.diffusion_model."  # Stability's single files (and ComfyUI's)
ANCHORS = {"stability": "x_embedder.proj.weight", "diffusers": "pos_embed.proj.weight"}
_JOINT = {"stability": re.compile(r"joint_blocks\.(\d+)\."),
          "diffusers": re.compile(r"transformer_blocks\.(\d+)\.")}
_DUAL = {"stability": "joint_blocks.{}.x_block.attn2.qkv.weight",
         "diffusers": "transformer_blocks.{}.attn2.to_q.weight"}
_QK_NORM = {"stability": "joint_blocks.0.x_block.attn.ln_q.weight",
            "diffusers": "transformer_blocks.0.attn.norm_q.weight"}
_SHAPE_KEYS = {  # name -> (key, axis) per layout
    "stability": {"hidden_size": ("x_embedder.proj.weight", 0), "in_channels": ("x_embedder.proj.weight", 1),
                  "patch_size": ("x_embedder.proj.weight", 2), "final": ("final_layer.linear.weight", 0),
                  "context_in_dim": ("context_embedder.weight", 1),
                  "vec_in_dim": ("y_embedder.mlp.0.weight", 1),
                  "positions": ("pos_embed", 1)},
    "diffusers": {"hidden_size": ("pos_embed.proj.weight", 0), "in_channels": ("pos_embed.proj.weight", 1),
                  "patch_size": ("pos_embed.proj.weight", 2), "final": ("proj_out.weight", 0),
                  "context_in_dim": ("context_embedder.weight", 1),
                  "vec_in_dim": ("time_text_embed.text_embedder.linear_1.weight", 1),
                  "positions": ("pos_embed.pos_embed", 1)},
}
# Stability's MMDiTX fixes the head width at 64 (mmditx.py: "hidden_size = 64 * depth; num_heads = depth");
# without QK-norm weights (whose length is the head dim) nothing in the file says otherwise.
HEAD_DIM = 64
# diffusers SD3Transformer2DModel defaults for fields a config.json omits (diffusers 0.42).
_DIFFUSERS_DEFAULTS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18,
                       "attention_head_dim": 64, "num_attention_heads": 18, "joint_attention_dim": 4096,
                       "caption_projection_dim": 1152, "pooled_projection_dim": 2048, "out_channels": 16,
                       "pos_embed_max_size": 96, "dual_attention_layers": (), "qk_norm": None}


@dataclasses.dataclass(frozen=True)
class SD3Source(CheckpointSource):
    """An SD3 transformer checkpoint as found on disk, before any tensor data is read."""

    # format: "rectiflow" | "stability" | "diffusers"; params: SD3Params or None

    @property
    def layout(self) -> str:
        return "diffusers" if self.format == "diffusers" else "stability"


# ----------------------------------------------------------------------------------------------- inspect


def inspect_sd3(path: str | Path) -> SD3Source | None:
    """The SD3 checkpoint at `path` (file or folder), or None if it is not one (e.g. FLUX)."""
    p = Path(path)
    if p.is_dir():
        d = p / "transformer" if not (p / "config.json").is_file() and (p / "transformer").is_dir() else p
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            return None
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise FormatError(f"{cfg_path} is not valid JSON ({e}); re-download it") from e
        if cfg.get("_class_name") != DIFFUSERS_CLASS:
            return None
        infos, _ = read_diffusers_weights(d)
        return SD3Source(d, "diffusers", infos, sd3_params_from_diffusers_config(cfg, cfg_path))
    header = read_header(p)
    meta = header.metadata
    if META_VERSION in meta:
        if meta.get(META_MODEL) != SD3_TRANSFORMER_KIND:
            return None
        if meta[META_VERSION] != FORMAT_VERSION:
            raise FormatError(f"{p} uses rectiflow format version {meta[META_VERSION]}, this rectiflow reads "
                              f"version {FORMAT_VERSION}: upgrade rectiflow")
        try:
            params = sd3_params(json.loads(meta[META_CONFIG]))
        except (KeyError, ValueError, TypeError, ConfigError) as e:
            raise FormatError(f"{p}: unreadable rectiflow.config metadata ({e}); re-save the file") from e
        return SD3Source(p, "rectiflow", header.tensors, params)
    for layout in ("stability", "diffusers"):
        prefix = find_prefix(header.tensors, [ANCHORS[layout]])
        if prefix is None:
            continue
        kept = {k[len(prefix):]: dataclasses.replace(t, name=k[len(prefix):])
                for k, t in header.tensors.items() if k.startswith(prefix)}
        if not any(_JOINT[layout].match(k) for k in kept):
            continue
        if len(kept) < len(header.tensors):
            log.info("%s: using the %d tensors under %r, ignoring %d others (text encoders, autoencoder)", p,
                     len(kept), prefix, len(header.tensors) - len(kept))
        return SD3Source(p, "stability" if layout == "stability" else "diffusers", kept, None, prefix)
    return None


def infer_sd3_params(shapes: Mapping[str, tuple[int, ...]], layout: str = "stability") -> SD3Params:
    """SD3Params from checkpoint shapes: depth from the block count, the head dim from the QK-norm weights
    (else 64, Stability's), dual attention from the blocks that have attn2, the grid from pos_embed."""
    raw = {n: int(shapes[k][a]) for n, (k, a) in _SHAPE_KEYS[layout].items()
           if k in shapes and len(shapes[k]) > a}
    missing = [n for n in _SHAPE_KEYS[layout] if n not in raw]
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := _JOINT[layout].match(k))), default=-1)
    if missing or not depth:
        raise FormatError(f"cannot infer the SD3 transformer config: no tensor gives {missing or ['depth']}; "
                          "the checkpoint is incomplete (pass config= if it is a custom layout)")
    qk_key = _QK_NORM[layout]
    head_dim = int(shapes[qk_key][0]) if qk_key in shapes else HEAD_DIM
    grid = math.isqrt(raw["positions"])
    base = dict(hidden_size=raw["hidden_size"], num_heads=raw["hidden_size"] // head_dim, depth=depth,
                in_channels=raw["in_channels"], out_channels=raw["final"] // raw["patch_size"] ** 2,
                patch_size=raw["patch_size"], context_in_dim=raw["context_in_dim"],
                vec_in_dim=raw["vec_in_dim"],
                qk_norm=qk_key in shapes, pos_embed_max_size=grid,
                dual_attention_layers=tuple(i for i in range(depth) if _DUAL[layout].format(i) in shapes))
    for name, preset in SD3_PRESETS.items():
        if all(getattr(preset, k) == v for k, v in base.items()):
            log.info("checkpoint shapes match preset %r", name)
            return preset
    try:
        return SD3Params(**base)
    except ConfigError as e:
        raise FormatError(f"the checkpoint's shapes give an invalid SD3 config: {e}") from e


def describe_sd3(params: SD3Params) -> str:
    """The preset `params` equals; else the published variant whose architecture it shares; else a summary."""
    for name, preset in SD3_PRESETS.items():
        if preset == params:
            return name
    for name in ("sd3-medium", "sd3.5-large", "sd3.5-medium"):
        if dataclasses.replace(SD3_PRESETS[name], sample_size=params.sample_size) == params:
            return name
    layers = list(params.dual_attention_layers)
    dual = f", dual attention in blocks {layers}" if layers else ""
    return (f"a custom SD3 transformer (hidden {params.hidden_size}, {params.depth} blocks"
            f"{', QK-norm' if params.qk_norm else ''}{dual})")


# ----------------------------------------------------------------------------------------------- load


def _expected_shapes(params: SD3Params, layout: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        sd = MMDiT(params).state_dict()
    if layout == "diffusers":
        from rectiflow.convert.sd3_keys import stability_to_diffusers

        sd = stability_to_diffusers(sd, params)
    return {k: tuple(v.shape) for k, v in sd.items()}


def load_sd3(src: SD3Source, config: Any = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = torch.float32) -> MMDiT:
    """Load the SD3 checkpoint `src` (strict; `config` overrides what the file records or its shapes
    imply)."""
    if config is not None:
        params = sd3_params(config)
    else:
        params = src.params or infer_sd3_params(src.shapes(), src.layout)
    mismatch = state_dict_mismatch(_expected_shapes(params, src.layout), src.shapes())
    if mismatch:
        what = repr(config) if isinstance(config, str) else f"({describe_sd3(params)})"
        try:
            found = infer_sd3_params(src.shapes(), src.layout)
        except FormatError:
            found = None
        hint = ""
        if found is not None and found.dual_attention_layers != params.dual_attention_layers:
            hint = (f"MMDiT-X dual attention in blocks {list(found.dual_attention_layers) or 'none'} in the "
                    f"file, {list(params.dual_attention_layers) or 'none'} in the config; ")
        msg = f"{src.path} does not match the config {what}: {hint}{mismatch.summary()}"
        if config is not None and found is not None:
            msg += f"; the file is {describe_sd3(found)}: drop the config to infer it"
        raise FormatError(msg)
    with torch.device("meta"):
        model = MMDiT(params)
    sd = dict(iter_tensors(src.tensors.values(), device, dtype))
    if src.layout == "diffusers":
        from rectiflow.convert.sd3_keys import diffusers_to_stability

        sd = diffusers_to_stability(sd, params)
    model.load_state_dict(sd, strict=True, assign=True)
    log.info("loaded %s (%s, %s, %d tensors)", src.path, src.format, describe_sd3(params), len(sd))
    return model


# ----------------------------------------------------------------------------------------------- save


def sd3_params_from_diffusers_config(cfg: Mapping[str, Any], where: Any = "config") -> SD3Params:
    """SD3Params from a diffusers SD3Transformer2DModel config.json (omitted fields take its defaults)."""
    c = {**_DIFFUSERS_DEFAULTS, **cfg}
    hidden = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    if c["caption_projection_dim"] != hidden:
        raise FormatError(f"{where}: caption_projection_dim {c['caption_projection_dim']} differs from the "
                          f"hidden size {hidden}, which no SD3 model does")
    if c["qk_norm"] not in (None, "rms_norm"):
        raise FormatError(f"{where}: qk_norm {c['qk_norm']!r} is not supported (SD3.5 uses 'rms_norm')")
    try:
        return SD3Params(hidden_size=hidden, num_heads=c["num_attention_heads"], depth=c["num_layers"],
                         in_channels=c["in_channels"], out_channels=c["out_channels"] or c["in_channels"],
                         patch_size=c["patch_size"], context_in_dim=c["joint_attention_dim"],
                         vec_in_dim=c["pooled_projection_dim"], qk_norm=c["qk_norm"] == "rms_norm",
                         dual_attention_layers=tuple(c["dual_attention_layers"] or ()),
                         pos_embed_max_size=c["pos_embed_max_size"], sample_size=c["sample_size"])
    except ConfigError as e:
        raise FormatError(f"{where}: {e}") from e


def sd3_diffusers_config(params: SD3Params) -> dict[str, Any]:
    """The config.json of diffusers' SD3Transformer2DModel for `params`."""
    assert MLP_RATIO == 4.0  # diffusers' JointTransformerBlock fixes it
    return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.31.0",  # first with SD3.5 Medium
            "sample_size": params.sample_size, "patch_size": params.patch_size,
            "in_channels": params.in_channels, "num_layers": params.depth,
            "attention_head_dim": params.head_dim,
            "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
            "caption_projection_dim": params.hidden_size, "pooled_projection_dim": params.vec_in_dim,
            "out_channels": params.out_channels, "pos_embed_max_size": params.pos_embed_max_size,
            "dual_attention_layers": list(params.dual_attention_layers),
            "qk_norm": "rms_norm" if params.qk_norm else None}


def save_sd3(model: MMDiT, path: str | Path, format: str, metadata: Mapping[str, str],
             max_shard_bytes: int) -> Path:
    """Save an MMDiT as "rectiflow", "stability" or "diffusers" (atomic writes)."""
    if format not in SD3_FORMATS:
        hint = " (bfl is FLUX's single-file format; SD3's is stability)" if format == "bfl" else ""
        raise FormatError(f"format {format!r} does not hold an SD3 transformer{hint}: choose one of "
                          f"{', '.join(SD3_FORMATS)}")
    p, params, meta = Path(path), model.params, dict(metadata)
    check_save_path(p, format, folder=format == "diffusers")
    sd = model.state_dict()
    if format == "rectiflow":
        meta.update(rectiflow_header(SD3_TRANSFORMER_KIND, params.to_dict()))
        return save_safetensors(sd, p, meta)
    meta.setdefault("format", "pt")
    if format == "stability":
        return save_safetensors({SINGLE_FILE_PREFIX + k: v for k, v in sd.items()}, p, meta)
    from rectiflow.convert.sd3_keys import stability_to_diffusers

    with atomic_dir(p) as tmp:
        (tmp / "config.json").write_text(json.dumps(sd3_diffusers_config(params), indent=2) + "\n")
        save_sharded(stability_to_diffusers(sd, params), tmp, max_shard_bytes=max_shard_bytes, metadata=meta)
    return p

"""FLUX autoencoder checkpoints: build, load (BFL ae.safetensors / diffusers AutoencoderKL / ours), save.

Formats
- "bfl": one safetensors file with BFL keys (`ae.safetensors` of the FLUX.1 repos: encoder.*, decoder.*).
  Any key prefix is accepted (e.g. `vae.` / `first_stage_model.` in all-in-one files).
- "diffusers": an AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), or the pipeline
  folder holding it as vae/. Keys convert exactly: renamed, and the attention's 1x1 convs <-> linears.
- "rectiflow": BFL keys with the config in the metadata (`rectiflow.model` = "flux-autoencoder").

Without a config, the architecture is read from the shapes; norm_groups and the latent scale/shift are not in
BFL's weights, so FLUX's values (32, 0.3611, 0.1159) are assumed and logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from rectiflow.convert.identify import find_prefix, guess_checkpoint
from rectiflow.errors import FormatError
from rectiflow.io.atomic import atomic_dir
from rectiflow.io.metadata import (
    AUTOENCODER_KIND,
    FORMAT_VERSION,
    META_CONFIG,
    META_MODEL,
    META_VERSION,
    rectiflow_header,
)
from rectiflow.io.safetensors_io import (
    check_save_path,
    iter_tensors,
    read_diffusers_weights,
    read_header,
    save_safetensors,
    state_dict_mismatch,
)
from rectiflow.models.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderParams, autoencoder_params

__all__ = ["build_autoencoder", "load_autoencoder", "save_autoencoder", "bfl_to_diffusers_ae",
           "diffusers_to_bfl_ae", "infer_ae_params", "diffusers_ae_config"]

log = logging.getLogger(__name__)

FORMATS = ("rectiflow", "bfl", "diffusers")
ANCHOR = "encoder.conv_in.weight"


# ----------------------------------------------------------------------------------------------- key maps


def _bfl_to_diffusers_name(k: str, levels: int) -> str:
    """One BFL key -> diffusers AutoencoderKL key (diffusers/models/autoencoders/vae.py Encoder/Decoder)."""
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(.*)", k)
    if m:
        part, kind, i, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "up":
            i = levels - 1 - i  # BFL stores decoder levels shallowest first, diffusers deepest first
        rest = re.sub(r"^block\.(\d+)\.", r"resnets.\1.", rest)
        rest = re.sub(r"^(downsample|upsample)\.", lambda r: r.group(1) + "rs.0.", rest)
        k = f"{part}.{kind}_blocks.{i}.{rest}"
    k = re.sub(r"\.mid\.block_(\d)\.", lambda r: f".mid_block.resnets.{int(r.group(1)) - 1}.", k)
    k = k.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    k = re.sub(r"attentions\.0\.(q|k|v)\.", r"attentions.0.to_\1.", k)
    k = k.replace("attentions.0.proj_out.", "attentions.0.to_out.0.").replace("attentions.0.norm.",
                                                                              "attentions.0.group_norm.")
    k = k.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
    return k


def _is_attn_linear(k: str) -> bool:
    return bool(re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", k))


def bfl_to_diffusers_ae(sd: dict[str, torch.Tensor], params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        nk = _bfl_to_diffusers_name(k, len(params.ch_mult))
        out[nk] = v.reshape(v.shape[:2]) if _is_attn_linear(nk) else v  # [C, C, 1, 1] -> [C, C]
    return out


def diffusers_to_bfl_ae(sd: dict[str, torch.Tensor], params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    names = {_bfl_to_diffusers_name(k, len(params.ch_mult)): k for k in _meta_sd(params)}
    out = {}
    for k, v in sd.items():
        if k not in names:
            raise FormatError(f"unexpected diffusers autoencoder tensor {k!r}")
        out[names[k]] = v.reshape(*v.shape, 1, 1) if _is_attn_linear(k) else v  # [C, C] -> [C, C, 1, 1]
    return out


def _meta_sd(params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AutoEncoder(params).state_dict()


# ----------------------------------------------------------------------------------------------- params


def infer_ae_params(shapes: dict[str, tuple[int, ...]]) -> AutoEncoderParams:
    """AutoEncoderParams from BFL-layout shapes (norm_groups / scale / shift: a matching preset or FLUX's)."""
    try:
        ch, cin = shapes["encoder.conv_in.weight"][:2]
        z = shapes["encoder.conv_out.weight"][0] // 2
        out_ch = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise FormatError(f"cannot infer the autoencoder config: tensor {e} is missing") from None
    levels = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    nrb = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    base = dict(in_channels=cin, ch=ch, out_ch=out_ch, ch_mult=mult, num_res_blocks=nrb, z_channels=z)
    for name, p in AE_PRESETS.items():
        if all(getattr(p, k) == v for k, v in base.items()):
            log.info("autoencoder shapes match preset %r", name)
            return p
    log.info("autoencoder config inferred from shapes; assuming FLUX's norm_groups 32, scale_factor 0.3611 "
             "and shift_factor 0.1159 (not in the weights)")
    return AutoEncoderParams(**base)


def params_from_diffusers_ae_config(cfg: dict[str, Any], where: Any = "config") -> AutoEncoderParams:
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise FormatError(f"{where} is a diffusers {cfg.get('_class_name')}, not an AutoencoderKL")
    if cfg.get("use_quant_conv", True) or cfg.get("use_post_quant_conv", True):
        raise FormatError(f"{where}: an AutoencoderKL with quant_conv layers (SD 1.x / SDXL style) is not "
                          "FLUX's autoencoder; FLUX's sets use_quant_conv=false")
    boc = list(cfg.get("block_out_channels", [64]))
    ch = boc[0]
    if any(c % ch for c in boc):
        raise FormatError(f"{where}: block_out_channels {boc} are not multiples of the first")
    sf = cfg.get("shift_factor")
    return AutoEncoderParams(
        resolution=int(cfg.get("sample_size", 256)), in_channels=int(cfg.get("in_channels", 3)), ch=ch,
        out_ch=int(cfg.get("out_channels", 3)), ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=int(cfg.get("layers_per_block", 1)), z_channels=int(cfg.get("latent_channels", 4)),
        scale_factor=float(cfg.get("scaling_factor", 0.18215)), shift_factor=float(sf or 0.0),
        norm_groups=int(cfg.get("norm_num_groups", 32)))


def diffusers_ae_config(p: AutoEncoderParams) -> dict[str, Any]:
    n = len(p.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": p.in_channels, "out_channels": p.out_ch,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [p.ch * m for m in p.ch_mult], "layers_per_block": p.num_res_blocks,
            "act_fn": "silu", "latent_channels": p.z_channels, "norm_num_groups": p.norm_groups,
            "sample_size": p.resolution, "scaling_factor": p.scale_factor, "shift_factor": p.shift_factor,
            "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": True}


# ----------------------------------------------------------------------------------------------- build / load


def build_autoencoder(preset_or_config: str | AutoEncoderParams | dict[str, Any] = "flux",
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """A FLUX-style autoencoder with freshly initialised weights (no data on device "meta")."""
    params = autoencoder_params(preset_or_config)
    with torch.device(device):
        model = AutoEncoder(params)
    return model.to(dtype)


def _inspect(path: Path):
    """(layout, tensors, params or None, where) of a BFL / rectiflow file or a diffusers folder."""
    if not path.exists():
        raise FormatError(f"{path} does not exist: check the path")
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae").is_dir():
            path = path / "vae"
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FormatError(f"{path} has no config.json: not a diffusers AutoencoderKL folder")
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise FormatError(f"{cfg_file} is not valid JSON ({e})") from e
        params = params_from_diffusers_ae_config(cfg, cfg_file)
        infos, _ = read_diffusers_weights(path)
        return "diffusers", infos, params, path
    header = read_header(path)  # refuses pickles and truncated files
    meta = header.metadata
    if META_VERSION in meta:
        if meta.get(META_MODEL) != AUTOENCODER_KIND:
            raise FormatError(f"{path} holds a rectiflow {meta.get(META_MODEL)}, not an autoencoder")
        if meta[META_VERSION] != FORMAT_VERSION:
            raise FormatError(f"{path} uses rectiflow format version {meta[META_VERSION]}; this rectiflow "
                              f"reads {FORMAT_VERSION}: upgrade rectiflow")
        try:
            params = autoencoder_params(json.loads(meta[META_CONFIG]))
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"{path}: unreadable {META_CONFIG} metadata ({e}); re-save the file") from e
        return "rectiflow", header.tensors, params, path  # BFL keys + our config metadata
    prefix = find_prefix(header.tensors, [ANCHOR])
    if prefix is None or f"{prefix}decoder.conv_in.weight" not in header.tensors:
        guess = guess_checkpoint(header.tensors)
        hint = f": this looks like {guess}" if guess and "autoencoder" not in guess else ""
        raise FormatError(f"{path} is not a FLUX autoencoder checkpoint (no encoder.conv_in / "
                          f"decoder.conv_in tensors){hint}")
    infos = {k[len(prefix):]: t for k, t in header.tensors.items() if k.startswith(prefix)}
    layout = "diffusers" if any(".down_blocks." in k for k in infos) else "bfl"
    # Stability's all-in-one SD3 files (`first_stage_model.*` beside `model.diffusion_model.joint_blocks.*`):
    # the shapes are FLUX's, the latent normalisation is SD3's
    sd3 = AE_PRESETS["sd3"] if any(".joint_blocks." in k for k in header.tensors) else None
    return layout, infos, sd3, path


def load_autoencoder(path: str | Path, config: str | AutoEncoderParams | dict[str, Any] | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
                     ) -> AutoEncoder:
    """Load a FLUX autoencoder from ae.safetensors, a diffusers AutoencoderKL folder or our file.

    `config` (preset name, AutoEncoderParams or dict of its fields) overrides what the file implies.
    Strict: a mismatch raises FormatError naming missing / unexpected / mis-shaped keys.
    """
    layout, infos, params, where = _inspect(Path(path))
    shapes = {k: t.shape for k, t in infos.items()}
    if config is not None:
        params = autoencoder_params(config)
    elif params is None:
        params = infer_ae_params(shapes if layout == "bfl" else {_bfl_name(k): s for k, s in shapes.items()})
    expected = {k: tuple(v.shape) for k, v in _meta_sd(params).items()}
    if layout == "diffusers":
        expected = {k: tuple(v.shape) for k, v in bfl_to_diffusers_ae(_meta_sd(params), params).items()}
    mismatch = state_dict_mismatch(expected, shapes)
    if mismatch:
        raise FormatError(f"{where} does not match the autoencoder config {params}: {mismatch.summary()}")
    sd = dict(iter_tensors(_renamed(infos), device, dtype))
    if layout == "diffusers":
        sd = diffusers_to_bfl_ae(sd, params)
    with torch.device("meta"):
        model = AutoEncoder(params)
    model.load_state_dict(sd, strict=True, assign=True)
    log.info("loaded autoencoder %s (%s layout, %d tensors)", where, layout, len(sd))
    return model


def _renamed(infos: dict[str, Any]) -> list:
    return [t if t.name == k else dataclasses.replace(t, name=k) for k, t in infos.items()]


def _bfl_name(diffusers_key: str) -> str:
    """Approximate inverse name map used only for shape inference (level order irrelevant there)."""
    k = diffusers_key
    k = re.sub(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.\2.\3.block.\4.", k)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
    return k


# ----------------------------------------------------------------------------------------------- save


def save_autoencoder(model: AutoEncoder, path: str | Path, format: str = "rectiflow",
                     metadata: dict[str, Any] | None = None) -> Path:
    """Save as "rectiflow" (one file, config in metadata), "bfl" (ae.safetensors) or "diffusers" (folder)."""
    params = getattr(model, "params", None)
    if not isinstance(params, AutoEncoderParams):
        raise FormatError(f"save_autoencoder needs a rectiflow AutoEncoder, got {type(model).__name__}")
    if format not in FORMATS:
        raise FormatError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    p = Path(path)
    check_save_path(p, format, folder=format == "diffusers")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if format == "rectiflow":
        meta.update(rectiflow_header(AUTOENCODER_KIND, params.to_dict()))
        return save_safetensors(sd, p, meta)
    meta.setdefault("format", "pt")
    if format == "bfl":
        return save_safetensors(sd, p, meta)
    with atomic_dir(p) as tmp:
        save_safetensors({k: v.contiguous() for k, v in bfl_to_diffusers_ae(sd, params).items()},
                         tmp / "diffusion_pytorch_model.safetensors", meta)
        (tmp / "config.json").write_text(json.dumps(diffusers_ae_config(params), indent=2) + "\n")
    return p

"""SD3 / SD3.5 bundles (rectiflow.convert.bundle dispatches here) and their published sampling defaults.

- "diffusers": a StableDiffusion3Pipeline folder: `model_index.json`, `transformer/`, `vae/`,
  `text_encoder/` (CLIP-L) + `tokenizer/`, `text_encoder_2/` (CLIP-G) + `tokenizer_2/`, optionally
  `text_encoder_3/` (T5-XXL) + `tokenizer_3/` (without them T5's tokens are zeros, as diffusers allows) and
  `scheduler/scheduler_config.json` (its `shift`).
- "single": a Stability single file (`sd3*.safetensors`, the transformer, and in the all-in-one files the
  autoencoder too) next to the diffusers text-encoder folders above; the autoencoder comes from the file
  (`first_stage_model.*`) or from `vae/`.
- "rectiflow" bundles need nothing here: their card records the transformer file, the autoencoder and an
  "sd3" text-encoder spec.

Published defaults (1024 x 1024, Euler on SD3's static shift 3.0 = the scheduler_config.json `shift` of
every SD3 / SD3.5 diffusers repo): SD3 Medium 28 steps, CFG 7.0; SD3.5 Large 28 steps, CFG 4.5; SD3.5
Large Turbo 4 steps, no CFG; SD3.5 Medium 40 steps, CFG 4.5 (skip-layer guidance is optional: see
rectiflow.sample.slg).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from rectiflow.convert.autoencoder import load_autoencoder
from rectiflow.convert.bundle_types import Bundle, SamplingDefaults, read_json, weight_files, weights_hash
from rectiflow.convert.transformer import load_transformer
from rectiflow.errors import FormatError
from rectiflow.models.sd3 import SD3Params
from rectiflow.models.sd3_text import SD3_T5_MAX_LENGTH
from rectiflow.models.text import load_text_encoder

__all__ = ["sd3_defaults", "load_sd3_diffusers", "load_sd3_single", "sd3_single_file", "DIFFUSERS_CLASS"]

DIFFUSERS_CLASS = "StableDiffusion3Pipeline"
SD3_SHIFT = 3.0  # scheduler_config.json "shift" of the SD3 / SD3.5 diffusers repos
SD3_SIZE = 1024
# (steps, cfg) per variant, from the models' published usage (issue 21's table)
SD3_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO, SD35_MEDIUM = (28, 7.0), (28, 4.5), (4, 1.0), (40, 4.5)
TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def sd3_defaults(params: SD3Params, name: str = "", scheduler: dict[str, Any] | None = None
                 ) -> SamplingDefaults:
    """The published defaults of the variant `params` (and the folder `name`, for "turbo") belong to."""
    if "turbo" in name.lower():
        steps, cfg = SD35_LARGE_TURBO
    elif params.dual_attention_layers:
        steps, cfg = SD35_MEDIUM
    elif params.qk_norm:
        steps, cfg = SD35_LARGE
    else:
        steps, cfg = SD3_MEDIUM
    shift = float((scheduler or {}).get("shift", SD3_SHIFT))
    d = SamplingDefaults(steps=steps, shift=None if shift == 1.0 else shift, cfg_scale=cfg, width=SD3_SIZE,
                         height=SD3_SIZE)
    return dataclasses.replace(d, sampler="euler")


def _text_encoder(root: Path, device: torch.device, dtype: torch.dtype, t5_dim: int):
    missing = [f for f in TEXT_FOLDERS if not (root / f).is_dir()]
    if missing:
        raise FormatError(f"{root} lacks the text-encoder folder(s) {', '.join(missing)}: an SD3 bundle "
                          "needs text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G) and their tokenizer/ "
                          "folders; text_encoder_3/ (T5) is optional")
    spec: dict[str, Any] = {"kind": "sd3", "clip_l_path": str(root / "text_encoder"),
                            "clip_g_path": str(root / "text_encoder_2"),
                            "clip_l_tokenizer_path": str(root / "tokenizer"),
                            "clip_g_tokenizer_path": str(root / "tokenizer_2"),
                            "max_length": SD3_T5_MAX_LENGTH}
    if (root / "text_encoder_3").is_dir() and (root / "tokenizer_3").is_dir():
        spec |= {"t5_path": str(root / "text_encoder_3"), "t5_tokenizer_path": str(root / "tokenizer_3")}
    else:
        spec["t5_dim"] = t5_dim  # zeros as wide as the transformer's context input
    return load_text_encoder(spec, device=device, dtype=dtype)


def load_sd3_diffusers(root: Path, device: torch.device, dtype: torch.dtype, with_text: bool = True
                       ) -> Bundle:
    for sub in ("transformer", "vae"):
        if not (root / sub).is_dir():
            raise FormatError(f"{root} lacks the {sub}/ folder of a diffusers {DIFFUSERS_CLASS}")
    transformer = load_transformer(root / "transformer", device=device, dtype=dtype)
    if not isinstance(transformer.params, SD3Params):
        raise FormatError(f"{root} is a {DIFFUSERS_CLASS} whose transformer/ is not an SD3 transformer")
    autoencoder = load_autoencoder(root / "vae", device=device, dtype=dtype)
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json(sched_file) if sched_file.is_file() else None
    width = transformer.params.context_in_dim
    text_encoder = _text_encoder(root, device, dtype, width) if with_text else None
    files = weight_files(root / "transformer") + weight_files(root / "vae")
    defaults = sd3_defaults(transformer.params, root.name, scheduler)
    return Bundle(transformer, autoencoder, text_encoder, defaults, root.name, weights_hash(files),
                  "diffusers", root)


def sd3_single_file(root: Path) -> Path | None:
    """The one Stability single file (`sd3*.safetensors`) of a folder, or None."""
    files = sorted(root.glob("sd3*.safetensors"))
    if len(files) > 1:
        raise FormatError(f"{root} holds several SD3 single files ({', '.join(f.name for f in files)}); "
                          "keep one")
    return files[0] if files else None


def load_sd3_single(root: Path, device: torch.device, dtype: torch.dtype, with_text: bool = True) -> Bundle:
    tfile = sd3_single_file(root)
    transformer = load_transformer(tfile, device=device, dtype=dtype)
    try:  # all-in-one files carry the autoencoder (first_stage_model.*)
        autoencoder = load_autoencoder(tfile, device=device, dtype=dtype)
        ae_files = [tfile]
    except FormatError:
        if not (root / "vae").is_dir():
            raise FormatError(f"{tfile} holds no autoencoder and {root} has no vae/ folder: add the SD3 "
                              "autoencoder (vae/ of the diffusers repo)") from None
        autoencoder = load_autoencoder(root / "vae", device=device, dtype=dtype)
        ae_files = weight_files(root / "vae")
    width = transformer.params.context_in_dim
    text_encoder = _text_encoder(root, device, dtype, width) if with_text else None
    return Bundle(transformer, autoencoder, text_encoder, sd3_defaults(transformer.params, tfile.stem),
                  tfile.stem, weights_hash(sorted({tfile, *ae_files})), "single", root)

"""Exports at the end of training: the final weights in our / BFL / diffusers layouts, and a bundle.

    out_dir/export/transformer.safetensors          format "rectiflow" (config in the metadata)
    out_dir/export/transformer-bfl.safetensors      BFL key layout (flux1-dev.safetensors style)
    out_dir/export/transformer-diffusers/           diffusers FluxTransformer2DModel folder
    out_dir/export/bundle/                          model.json + transformer + autoencoder (`rectiflow
                                                    generate --model` loads it), when model.autoencoder is set
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rectiflow.convert.transformer import build_transformer, save_transformer
from rectiflow.flow import get_path
from rectiflow.io.metadata import META_TRAIN_CONFIG

log = logging.getLogger(__name__)

__all__ = ["export_weights", "EXPORT_NAMES", "bundle_cfg_scale", "GUIDED_CFG_DEFAULT"]

EXPORT_NAMES = {"rectiflow": "transformer.safetensors", "bfl": "transformer-bfl.safetensors",
                "diffusers": "transformer-diffusers"}


# The CFG default of a bundle from a model trained with caption dropout whose validation did not set one
# above 1: the scale at which the issue-25 icon model (configs/tiny.toml) drew its icons, inside the range
# SD3 / FLUX users guide with (SD3's StableDiffusion3Pipeline default is 7.0; the shapes recipe uses 3).
# Without guidance such a model draws blobs: the conditional velocity alone is too weakly conditioned.
GUIDED_CFG_DEFAULT = 4.0


def bundle_cfg_scale(cfg, guidance_embed: bool = False) -> tuple[float, str]:
    """(cfg_scale, why) for the bundle's sampling defaults: a model trained with caption dropout has an
    unconditional input and samples guided by default; the card records why."""
    v = cfg.validation.cfg_scale
    if guidance_embed:
        return v, (f"validation.cfg_scale: a guidance-embedding model takes its guidance "
                   f"({cfg.model.guidance:g}) as an input, one forward per step")
    if cfg.distill.teacher and cfg.distill.teacher_cfg > 1:
        return v, (f"validation.cfg_scale: the teacher's CFG {cfg.distill.teacher_cfg:g} is distilled into "
                   "the model, which samples with one forward per step")
    if cfg.data.caption_dropout <= 0:
        return v, "validation.cfg_scale: trained without caption dropout (no unconditional input)"
    if v > 1:
        return v, f"validation.cfg_scale (trained with caption dropout {cfg.data.caption_dropout:g})"
    return GUIDED_CFG_DEFAULT, (f"the guided default {GUIDED_CFG_DEFAULT:g}: trained with caption dropout "
                                f"{cfg.data.caption_dropout:g}, validation.cfg_scale not above 1")


def export_weights(state_dict: dict[str, torch.Tensor], params, out: str | Path, cfg,
                   cache_manifest: dict | None = None) -> list[Path]:
    """Write `state_dict` (of the model that `params`, FluxParams or SD3Params, describe) in each of
    cfg.export.formats under `out`, plus a bundle when cfg.export.bundle and cfg.model.autoencoder are set
    (text encoder and image size: those recorded in the latent cache's manifest, `cache_manifest`)."""
    from rectiflow.train.config import config_to_dict

    out = Path(out)
    model = build_transformer(params, device="meta")
    model.load_state_dict(state_dict, strict=True, assign=True)
    meta = {META_TRAIN_CONFIG: json.dumps(config_to_dict(cfg), sort_keys=True)}
    paths = []
    for fmt in cfg.export.formats:
        paths.append(save_transformer(model, out / EXPORT_NAMES[fmt], format=fmt,
                                      metadata=meta if fmt != "diffusers" else None))
        log.info("exported %s weights to %s", fmt, paths[-1])
    if cfg.export.bundle:
        if not cfg.model.autoencoder:
            log.info("no bundle exported: set model.autoencoder to include an autoencoder")
        elif cache_manifest is None:
            log.info("no bundle exported: the text encoder is unknown without a cache")
        else:
            paths.append(_bundle(model, out / "bundle", cfg, cache_manifest, meta))
    return paths


def _bundle(model, path: Path, cfg, manifest: dict, metadata: dict[str, str] | None = None) -> Path:
    from rectiflow.convert.autoencoder import load_autoencoder
    from rectiflow.convert.bundle import SamplingDefaults, save_bundle

    ae = load_autoencoder(cfg.model.autoencoder)
    spec = manifest["text_encoder"]["spec"]
    # sampling defaults of what was trained: the cache's image size and the validation sampler settings
    shards = manifest.get("shards") or [{"size": [1024, 1024]}]
    width, height = (int(v) for v in shards[0]["size"])
    v = cfg.validation
    cfg_scale, why = bundle_cfg_scale(cfg, model.params.guidance_embed)
    defaults = SamplingDefaults(steps=v.sample_steps, sampler=v.sampler, shift=v.shift,
                                cfg_scale=cfg_scale, width=width, height=height,
                                guidance=cfg.model.guidance if model.params.guidance_embed else None)
    # the card records the flow path (the pipeline converts the network output with it) and the weights
    # carry the run config, as the checkpoint's do
    training = {"steps": cfg.train.steps, "cache": str(cfg.data.cache),
                "caption_dropout": cfg.data.caption_dropout, "cfg_scale_default": why}
    p = save_bundle(path, model, ae, spec, defaults, card_extra={"training": training},
                    flow_path=get_path(cfg.flow.path), transformer_metadata=metadata,
                    name=cfg.export.name or Path(cfg.train.out_dir).resolve().name)
    log.info("exported bundle %s", p)
    return p

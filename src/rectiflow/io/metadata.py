"""The safetensors metadata of rectiflow-format weight files: what a file says about itself.

A rectiflow file keeps the key names of its family's reference code (BFL's for FLUX, Stability's for SD3)
and adds, in its safetensors header metadata:
    rectiflow.format_version  FORMAT_VERSION
    rectiflow.model           what it holds: one of the *_KIND values below
    rectiflow.config          JSON of the model's params (FluxParams / SD3Params / AutoencoderParams fields)
    rectiflow.train_config    (trained weights and checkpoints) the resolved run config, JSON

One owner for these names: the transformer, SD3 and autoencoder converters, the checkpoints, the exports and
the model families all read them from here.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["FORMAT_VERSION", "META_VERSION", "META_MODEL", "META_CONFIG", "META_TRAIN_CONFIG",
           "FLUX_TRANSFORMER_KIND", "SD3_TRANSFORMER_KIND", "AUTOENCODER_KIND", "rectiflow_header"]

FORMAT_VERSION = "1"
META_VERSION = "rectiflow.format_version"
META_MODEL = "rectiflow.model"
META_CONFIG = "rectiflow.config"
META_TRAIN_CONFIG = "rectiflow.train_config"

FLUX_TRANSFORMER_KIND = "flux-transformer"
SD3_TRANSFORMER_KIND = "sd3-transformer"
AUTOENCODER_KIND = "flux-autoencoder"


def rectiflow_header(kind: str, params: dict[str, Any]) -> dict[str, str]:
    """The metadata that makes a safetensors file a rectiflow-format file of `kind` with these params."""
    return {META_VERSION: FORMAT_VERSION, META_MODEL: kind, META_CONFIG: json.dumps(params, sort_keys=True)}

"""rectiflow.models: the FLUX transformer, autoencoder and text encoders.

Names are resolved lazily so that importing one model module does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    name: "rectiflow.models.transformer"
    for name in (
        "Flux", "FluxParams", "TRANSFORMER_PRESETS", "transformer_params",
        "pack", "unpack", "image_ids", "text_ids",
    )
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rectiflow.models' has no attribute {name!r}")

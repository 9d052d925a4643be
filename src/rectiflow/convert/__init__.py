"""rectiflow.convert: checkpoint formats (safetensors only, through rectiflow.io.safetensors_io; never
pickles).

- convert.identify: what a checkpoint is, from key names and shapes.
- convert.transformer: FLUX transformer build / load / save in the rectiflow, BFL and diffusers formats.
- convert.flux_keys: exact BFL <-> diffusers state-dict key conversion.

Names are exported lazily so that importing one submodule does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_transformer": "rectiflow.convert.transformer",
    "load_transformer": "rectiflow.convert.transformer",
    "save_transformer": "rectiflow.convert.transformer",
    "inspect_transformer": "rectiflow.convert.transformer",
    "infer_params": "rectiflow.convert.transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rectiflow.convert' has no attribute {name!r}")

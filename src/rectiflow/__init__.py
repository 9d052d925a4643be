"""rectiflow: rectified-flow transformers for text-to-image (FLUX.1 / SD3).

The public entry points are imported lazily so that `import rectiflow` stays cheap and does nothing at
import time (no device probing, no file system access).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RectiflowError": "rectiflow.errors",
    "build_transformer": "rectiflow.convert.transformer",
    "load_transformer": "rectiflow.convert.transformer",
    "save_transformer": "rectiflow.convert.transformer",
    "build_autoencoder": "rectiflow.convert.autoencoder",
    "load_autoencoder": "rectiflow.convert.autoencoder",
    "load_lora": "rectiflow.convert.lora",
    "save_lora": "rectiflow.convert.lora",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rectiflow' has no attribute {name!r}")

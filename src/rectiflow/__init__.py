"""rectiflow: rectified-flow transformers for text-to-image (FLUX.1 / SD3).

The public entry points are imported lazily so that `import rectiflow` stays cheap and does nothing at
import time (no device probing, no file system access).
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
__getattr__, __all__ = lazy_exports(__name__, {
    "RectiflowError": ".errors",
    "build_transformer": ".convert.transformer",
    "load_transformer": ".convert.transformer",
    "save_transformer": ".convert.transformer",
    "build_autoencoder": ".convert.autoencoder",
    "load_autoencoder": ".convert.autoencoder",
    "load_lora": ".convert.lora",
    "save_lora": ".convert.lora",
})
__all__ = [*__all__, "__version__"]

"""rectiflow.models: the FLUX transformer, autoencoder and text encoders.

Names are resolved lazily so that importing one model module does not import the others.
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, dict.fromkeys(
    ("Flux", "FluxParams", "TRANSFORMER_PRESETS", "transformer_params", "pack", "unpack", "image_ids",
     "text_ids"), ".transformer"))

"""rectiflow.models: the FLUX and SD3 / SD3.5 transformers, autoencoder and text encoders.

Names are resolved lazily so that importing one model module does not import the others.
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, dict.fromkeys(
    ("Flux", "FluxParams", "TRANSFORMER_PRESETS", "transformer_params", "pack", "unpack", "image_ids",
     "text_ids"), ".transformer") | dict.fromkeys(
    ("MMDiT", "SD3Params", "SD3_PRESETS", "sd3_params"), ".sd3"))

"""rectiflow.convert: checkpoint formats (safetensors only, through rectiflow.io.safetensors_io; never
pickles).

- convert.identify: what a checkpoint is, from key names and shapes.
- convert.transformer: FLUX transformer build / load / save in the rectiflow, BFL and diffusers formats.
- convert.flux_keys: exact BFL <-> diffusers state-dict key conversion.

Names are exported lazily so that importing one submodule does not import the others.
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, dict.fromkeys(
    ("build_transformer", "load_transformer", "save_transformer", "inspect_transformer", "infer_params"),
    ".transformer"))

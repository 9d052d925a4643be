"""Bundles with random weights, for tests, benchmarks and trying the command line without a trained model.

    random_bundle(tmp / "model", transformer="micro", autoencoder="tiny", text_encoder="minilm", seed=0)

Images from such a model are noise-like; only the plumbing, the speed and the numerics are meaningful.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rectiflow.convert.autoencoder import build_autoencoder
from rectiflow.convert.bundle import SamplingDefaults, save_bundle
from rectiflow.convert.transformer import build_transformer
from rectiflow.errors import ConfigError
from rectiflow.models.text import load_text_encoder

__all__ = ["random_bundle"]


def random_bundle(path: str | os.PathLike, *, transformer: Any = "micro", autoencoder: Any = "tiny",
                  text_encoder: Any = "minilm", seed: int = 0, defaults: SamplingDefaults | None = None,
                  name: str | None = None, weight_scale: float = 1.0) -> Path:
    """Save a "rectiflow" bundle with freshly initialised weights (torch.manual_seed(seed) first).

    transformer / autoencoder: preset names, params objects or dicts; text_encoder: a name or spec for
    `load_text_encoder` (its dims must match the transformer's context_in_dim / vec_in_dim).
    `weight_scale` multiplies every transformer weight (large values provoke fp16 overflow in tests).
    """
    torch.manual_seed(seed)
    t = build_transformer(transformer)
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in t.parameters():
                p.mul_(weight_scale)
    ae = build_autoencoder(autoencoder)
    enc = load_text_encoder(text_encoder, device="cpu", dtype=torch.float32)
    if (getattr(enc, "txt_dim", None), getattr(enc, "vec_dim", None)) != (t.params.context_in_dim,
                                                                          t.params.vec_in_dim):
        raise ConfigError(f"text encoder {text_encoder!r} does not fit transformer {transformer!r} "
                          f"(context {t.params.context_in_dim}, pooled {t.params.vec_in_dim})")
    defaults = defaults or SamplingDefaults(steps=4, width=64, height=64)
    return save_bundle(path, t, ae, enc, defaults, {"description": f"random weights (seed {seed})"},
                       name=name or f"random-{transformer}" if isinstance(transformer, str) else "random")

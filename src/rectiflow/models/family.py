"""Model families behind one small adapter, so that the trainer, validation, distillation and the pipeline
drive FLUX and SD3 / SD3.5 transformers with the same code and never branch on the family.

A family says how latents [B, C, H, W] become the model's input ("model space": FLUX's packed 2x2 tokens
[B, L, 4C], or p x p ones for a FLUX model with another `patch_size`; SD3's latents themselves, since its
patch embedding is inside the model) and back, and how to call the network with the conditioning it
needs (FLUX: position ids, guidance for guidance-distilled models; SD3: the pooled vector and the text
tokens, optionally skipping blocks). Flow math is elementwise, so it runs
unchanged in either model space; per-sample reductions use `sample_dims`.

    family = family_of(model.params)
    x = family.pack(latents)                                  # model space
    v = family.forward(model, x, t, txt, vec, h, w)           # velocity, model space
    latents = family.unpack(x, h, w)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from rectiflow.errors import RectiflowError
from rectiflow.io.metadata import FLUX_TRANSFORMER_KIND, SD3_TRANSFORMER_KIND
from rectiflow.models.sd3 import SD3Params, is_sd3_config, sd3_params
from rectiflow.models.transformer import (
    PATCH_SIZE,
    FluxParams,
    image_ids,
    pack,
    text_ids,
    transformer_params,
    unpack,
)

__all__ = ["ModelFamily", "FluxFamily", "SD3Family", "FLUX", "SD3", "family_of", "sample_dims",
           "model_params"]


class ModelFamily:
    """The interface (and the identity packing): subclasses implement `forward`."""

    name = "?"
    kind = "?"

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] -> the model's input layout."""
        return latents

    def unpack(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The model's layout -> latents [B, C, h, w] (h, w: latent size)."""
        return x

    def describe(self, params) -> str:
        """The model's shape in a few words, for logs: width and blocks."""
        raise NotImplementedError

    def image_tokens(self, h: int, w: int, params=None) -> int:
        """Image tokens for an h x w latent of a model with `params` (SD3: its patch_size, 2 without params;
        FLUX: the family's patch): FLUX's shift reads this length."""
        return (h // 2) * (w // 2)

    def forward(self, model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                h: int, w: int, guidance: torch.Tensor | None = None,
                skip_layers: Collection[int] = ()) -> torch.Tensor:
        """The network's output for x (model space) at t [B], text tokens txt [B, L, D], pooled vec [B, Dv];
        h, w: the latent size; guidance [B]: guidance-distilled models only; skip_layers: blocks to skip."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class FluxFamily(ModelFamily):
    """FLUX.1: latents packed into 2x2 tokens (`patch`: the model's patch_size), (0, row, col) image ids,
    all-zero text ids (BFL prepare()), the guidance embedding input for guidance-distilled models. No
    skip-layer guidance."""

    name = "flux"
    kind = FLUX_TRANSFORMER_KIND  # the rectiflow.model metadata of its rectiflow-format files

    def __init__(self, patch: int = PATCH_SIZE):
        self.patch = patch

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents, self.patch)  # [B, (h/p)(w/p), p*p*C]

    def unpack(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return unpack(x, h, w, self.patch)

    def image_tokens(self, h: int, w: int, params=None) -> int:
        return (h // self.patch) * (w // self.patch)

    def describe(self, params) -> str:
        refiner = f", {params.text_refiner} text-refiner blocks" if params.text_refiner else ""
        return f"hidden {params.hidden_size}, {params.depth} + {params.depth_single_blocks} blocks{refiner}"

    def forward(self, model, x, t, txt, vec, h, w, guidance=None, skip_layers=()):
        if skip_layers:
            raise RectiflowError("skip-layer guidance is an SD3.5 option; FLUX models do not support it")
        dev = x.device
        # ids shared over the batch ([1, L, 3]): the RoPE tables are built once and broadcast
        return model(img=x, img_ids=image_ids(1, h, w, dev, self.patch), txt=txt,
                     txt_ids=text_ids(1, txt.shape[1], dev), timesteps=t, y=vec, guidance=guidance)


class SD3Family(ModelFamily):
    """SD3 / SD3.5: latents in, velocity out (the patch embedding and unpatchify are the model's); no
    guidance embedding (a guidance value is refused, as no SD3 model is guidance-distilled)."""

    name = "sd3"
    kind = SD3_TRANSFORMER_KIND

    def describe(self, params) -> str:
        dual = len(params.dual_attention_layers)
        return f"hidden {params.hidden_size}, {params.depth} joint blocks" + \
            (f" ({dual} with dual attention)" if dual else "")

    def image_tokens(self, h: int, w: int, params=None) -> int:
        p = params.patch_size if params is not None else 2
        return (h // p) * (w // p)

    def forward(self, model, x, t, txt, vec, h, w, guidance=None, skip_layers=()):
        if guidance is not None:
            raise RectiflowError("SD3 models have no guidance embedding; use classifier-free guidance")
        return model(x, t, y=vec, context=txt, skip_layers=skip_layers)


FLUX, SD3 = FluxFamily(), SD3Family()


def family_of(params_or_model: Any) -> ModelFamily:
    """The family of a model (or a wrapped model exposing `.params`), its params, or a dict of them."""
    params = getattr(params_or_model, "params", params_or_model)
    if isinstance(params, SD3Params) or is_sd3_config(params):
        return SD3
    patch = params.get("patch_size", PATCH_SIZE) if isinstance(params, dict) else \
        params.patch_size if isinstance(params, FluxParams) else PATCH_SIZE
    return FLUX if patch == PATCH_SIZE else FluxFamily(int(patch))


def sample_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The non-batch dims of a model-space tensor, for per-sample means (FLUX: (1, 2); SD3: (1, 2, 3))."""
    return tuple(range(1, x.ndim))


def model_params(spec: Any, overrides: dict[str, Any] | None = None):
    """A preset name, params object or dict of fields -> FluxParams or SD3Params (SD3 for SD3 presets and
    dicts of SD3Params fields), then `overrides` (fields of the same family) applied."""
    resolve = sd3_params if is_sd3_config(spec) else transformer_params
    params = resolve(spec)
    return resolve({**params.to_dict(), **overrides}) if overrides else params

"""Skip-layer guidance (SLG), the sampling option SD3.5 Medium was released with.

At the grid times of steps i with N * start < i < N * stop (N steps), the guided velocity is pushed away
from the conditional model with some joint blocks skipped:

    v = v_guided + scale * (v_cond - v_cond_skipping_layers)

(diffusers StableDiffusion3Pipeline.__call__ with skip_guidance_layers; Stability sd3_impls.py
SkipLayerCFGDenoiser). Defaults: layers 7, 8, 9 (both), scale 2.8, start 0.01, stop 0.2 (diffusers';
Stability's sd3_infer.py uses scale 2.5 with CFG 4.0). It needs a model whose family can skip blocks (SD3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rectiflow.errors import ConfigError

__all__ = ["SkipLayerGuidance"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if not self.layers or bad:
            raise ConfigError(f"skip-layer guidance needs block indices >= 0, got {list(self.layers)}")
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ConfigError(f"skip-layer guidance start {self.start} / stop {self.stop}: need 0 <= start < "
                              "stop <= 1 (fractions of the steps)")
        if self.scale < 0:
            raise ConfigError(f"skip-layer guidance scale must be >= 0, got {self.scale}")

    def active_times(self, ts: Tensor) -> list[float]:
        """The grid times (of `ts`, [N + 1]) at which the guidance applies."""
        n = len(ts) - 1
        return [float(ts[i]) for i in range(n) if n * self.start < i < n * self.stop]

    def velocity_fn(self, guided: VelocityFn, conditional: VelocityFn, skipping: VelocityFn,
                    ts: Tensor | Sequence[float]) -> VelocityFn:
        """Wrap the guided velocity; `conditional` / `skipping`: the conditional model without / with the
        blocks skipped. Times are matched in the dtype the solver passes them in."""
        active = self.active_times(torch.as_tensor(ts, dtype=torch.float64))

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            v = guided(x, t)
            if any(bool(torch.tensor(a, dtype=t.dtype) == t) for a in active):
                v = v + self.scale * (conditional(x, t) - skipping(x, t))
            return v

        return velocity

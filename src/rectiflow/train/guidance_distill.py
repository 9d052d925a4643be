"""Guidance distillation (cfg.guidance_distill): a student with a guidance embedding learns its teacher's
classifier-free-guided velocity, so that it samples guided at one forward per step.

The first stage of Meng et al. 2023 ("On Distillation of Guided Diffusion Models", sec. 4.1: a w-conditioned
student matches the teacher's guided output for w drawn from a range) and the recipe FLUX.1 [dev] ships (its
`guidance_in` embedding of the raw scale; BFL have not published the training procedure): at each training
step every sample gets a scale g ~ U[scale_min, scale_max], the student sees x_t, t, the caption and g
(through guidance_in, FLUX's timestep-style embedding of the raw scale) and regresses onto
    v_u + g (v_c - v_u)        (Ho & Salimans 2022, on velocities; rectiflow.flow.cfg_combine)
of the frozen teacher at the same (x_t, t), v_u with the data's "" embedding. `generate --guidance G` then
steers the student; its exported bundle defaults to model.guidance and CFG 1.
The student starts as the teacher: model.init loads the teacher's weights, guidance_in (absent from a
teacher without guidance embedding) starts with a zero output layer, so v_student = v_teacher(cond) at step 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from rectiflow.convert.transformer import build_transformer, load_transformer
from rectiflow.errors import FormatError
from rectiflow.train.distill import Teacher

log = logging.getLogger(__name__)

__all__ = ["GuidanceDistiller", "init_guidance_embedding", "load_student"]


class GuidanceDistiller:
    """The teacher and the student's targets; the Trainer owns one when guidance_distill.teacher is set."""

    def __init__(self, cfg, cache, device: torch.device, autocast: Callable[[], AbstractContextManager]):
        g = cfg.guidance_distill
        self.scale_min, self.scale_max = g.scale_min, g.scale_max
        self.teacher = Teacher(g.teacher, cache.text(cache.empty_caption_index), device, autocast)
        if self.teacher.model.params.guidance_embed:
            log.warning("the guidance-distillation teacher %s has a guidance embedding itself; it is fed the "
                        "same g as the student", g.teacher)
        log.info("guidance distillation of %s, g ~ U[%g, %g]", g.teacher, g.scale_min, g.scale_max)

    def scales(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """g [n] ~ U[scale_min, scale_max] from the trainer's generator."""
        return self.scale_min + (self.scale_max - self.scale_min) * torch.rand(n, generator=generator)

    def target(self, x_t, t, txt, vec, h: int, w: int, scale: torch.Tensor) -> torch.Tensor:
        """The teacher's guided velocity v_u + g (v_c - v_u) at (x_t [b, L, C], t [b]), g = scale [b]."""
        teacher_g = scale if self.teacher.model.params.guidance_embed else None
        return self.teacher.velocity(x_t, t, txt, vec, h, w, teacher_g, scale)


def load_student(init: str, params, device: torch.device) -> torch.nn.Module:
    """A student with guidance embedding (params.guidance_embed) from a teacher file without one: the
    teacher's weights, and guidance_in initialised to add nothing (init_guidance_embedding)."""
    base = load_transformer(init, config=dataclasses.replace(params, guidance_embed=False), device=device,
                            dtype=torch.float32)
    model = build_transformer(params, device=device, dtype=torch.float32)
    # strict=False because exactly the new embedding's keys (guidance_in.*) may be missing; checked next
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or not all(k.startswith("guidance_in.") for k in missing):
        raise FormatError(f"{init} does not fit the student beyond its guidance embedding (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); use the teacher's architecture")
    init_guidance_embedding(model)
    log.info("student initialised from %s with a new guidance embedding", init)
    return model


@torch.no_grad()
def init_guidance_embedding(model: torch.nn.Module) -> None:
    """Zero guidance_in's output layer: the embedding adds nothing to vec until training moves it."""
    out = model.guidance_in.out_layer
    out.weight.zero_()
    out.bias.zero_()

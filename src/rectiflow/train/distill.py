"""Few-step distillation (cfg.distill): the frozen teacher and the student's targets.

Progressive distillation (Salimans & Ho 2022) on a rectified flow: a student sampled with `student_steps`
Euler steps learns, at each time t of its grid, the velocity of one step t -> t' that does what k Euler
steps of the teacher (guided at `teacher_cfg`; k = `teacher_substeps`, 2 in progressive distillation) do on
the k * student_steps grid. With `shift` = alpha != 1 both grids are SD3's shifted ones
(`rectiflow.flow.sd3_shift`), as `generate --shift alpha` samples.
The Trainer owns one Distiller when cfg.distill.teacher is set; the student itself is the Trainer's model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from rectiflow.convert.transformer import load_transformer
from rectiflow.data.cache_reader import LatentCache
from rectiflow.errors import ConfigError
from rectiflow.flow import cfg_batch, cfg_guide, cfg_scale_at, sd3_shift
from rectiflow.models.family import family_of
from rectiflow.train.config import RunConfig

log = logging.getLogger(__name__)

__all__ = ["Distiller", "Teacher"]


class Teacher:
    """A frozen fp32 teacher transformer (any file load_transformer reads) and the unconditional text input
    of its CFG (the data's "" embedding, `uncond` = (txt [L, D], vec [Dv])). `autocast()` is the Trainer's
    precision context."""

    def __init__(self, path: str, uncond: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                 autocast: Callable[[], AbstractContextManager]):
        self.device, self.autocast = device, autocast
        self.model = load_transformer(path, device=device, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.family = family_of(self.model)  # how to call it (FLUX or SD3)
        self._uncond = (uncond[0].to(device, torch.float32), uncond[1].to(device, torch.float32))

    @torch.no_grad()
    def velocity(self, x, t, txt, vec, h: int, w: int, guidance, scale) -> torch.Tensor:
        """The teacher's velocity at (x [b, ...] in model space, t [b]) with CFG at `scale`: a float (1 = no
        CFG, one forward) or a tensor [b] of per-sample scales; `guidance`: the teacher's own guidance input
        or None."""
        b = x.shape[0]
        plain = not torch.is_tensor(scale) and scale == 1.0
        if not plain:
            txt0, vec0 = self._uncond
            x, t = cfg_batch(x, x), cfg_batch(t, t)
            txt = cfg_batch(txt, txt0.expand(b, *txt0.shape))  # [2b, L, D]
            vec = cfg_batch(vec, vec0.expand(b, *vec0.shape))  # [2b, Dv]
            guidance = None if guidance is None else cfg_batch(guidance, guidance)
        with self.autocast():
            v = self.family.forward(self.model, x, t, txt, vec, h, w, guidance).float()
        if plain:
            return v
        if torch.is_tensor(scale):
            scale = scale.to(v).view(-1, *(1,) * (v.ndim - 1))  # [b] -> [b, 1, ...]
        return cfg_guide(v, scale)  # CFG (Ho & Salimans 2022): v_u + scale (v_c - v_u)


class Distiller:
    """The teacher (fp32, frozen), the unconditional text input for its CFG (the cache's "" embedding), and
    the student's grid and targets. `autocast()` is the Trainer's precision context."""

    def __init__(self, cfg: RunConfig, cache: LatentCache, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]):
        if cfg.flow.path != "rectified_flow":
            raise ConfigError(f"distill.teacher needs flow.path = 'rectified_flow' (got {cfg.flow.path!r}): "
                              "the targets are Euler steps of the rectified-flow ODE")
        d = cfg.distill
        self.steps, self.cfg_scale, self.shift = d.student_steps, d.teacher_cfg, d.alpha
        self.cfg_interval = None if d.teacher_cfg_interval is None else tuple(d.teacher_cfg_interval)
        self.substeps = d.teacher_substeps
        self.device, self.autocast = device, autocast
        self._teacher = Teacher(d.teacher, cache.text(cache.empty_caption_index), device, autocast)
        self.teacher = self._teacher.model
        where = "" if self.cfg_interval is None else f" at t in {list(self.cfg_interval)}"
        log.info("distilling %s (CFG %g%s, %d steps per student step) into %d-step Euler (time shift %g)",
                 d.teacher, d.teacher_cfg, where, d.teacher_substeps, d.student_steps, d.alpha)

    def _shifted(self, u: torch.Tensor) -> torch.Tensor:
        """u (linear-grid times) -> the student grid's times under the shift (identity at 1)."""
        return u if self.shift == 1.0 else sd3_shift(u, self.shift)

    def grid(self) -> torch.Tensor:
        """The student's sampling times [steps]: 1, 1 - dt, ..., dt (dt = 1 / steps), shifted."""
        return self._shifted(1.0 - torch.arange(self.steps, dtype=torch.float32) / self.steps)

    def times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """t [n] drawn uniformly from the student's grid."""
        return self.grid()[torch.randint(self.steps, (n,), generator=generator)]

    def velocity(self, x, t, txt, vec, h: int, w: int, guidance) -> torch.Tensor:
        """The teacher's velocity at (x [b, L, C], t [b]), CFG at teacher_cfg (inside teacher_cfg_interval
        only, when set: then a per-sample scale)."""
        scale = self.cfg_scale
        if self.cfg_interval is not None:
            scale = cfg_scale_at(t, self.cfg_scale, self.cfg_interval)
        return self._teacher.velocity(x, t, txt, vec, h, w, guidance, scale)

    def target(self, x_t, t, txt, vec, h: int, w: int, guidance=None) -> torch.Tensor:
        """Target velocity of one student Euler step from t to the grid's next time t' (t - dt unshifted):
        k = teacher_substeps teacher Euler steps t -> ... -> t' on the k * steps grid, giving
        (x_t - x_t') / (t - t'): the mean of their velocities weighted by step size. x_t [b, L, C], t [b] on
        the grid -> [b, L, C]."""
        k, alpha = self.substeps, self.shift
        sub = 1.0 / (k * self.steps)  # one teacher step on the linear grid
        v1 = self.velocity(x_t, t, txt, vec, h, w, guidance)
        if alpha == 1.0 and k == 2:  # kept as its own branch: the bundled student's exact arithmetic
            x_mid = x_t - sub * v1  # t decreases towards the data: x_{t-d} = x_t - d * v
            v2 = self.velocity(x_mid, t - sub, txt, vec, h, w, guidance)
            return 0.5 * (v1 + v2)
        u = t if alpha == 1.0 else t / (alpha - (alpha - 1.0) * t)  # inverse sd3_shift: t on the linear grid
        per_sample = (-1,) + (1,) * (x_t.ndim - 1)  # [b] -> [b, 1, ...] to broadcast over model space
        x, t_cur, v = x_t, t, v1
        for i in range(1, k + 1):
            t_next = self._shifted(u - i * sub)
            x = x - (t_cur - t_next).view(per_sample) * v
            t_cur = t_next
            if i < k:
                v = self.velocity(x, t_cur, txt, vec, h, w, guidance)
        return (x_t - x) / (t - t_cur).view(per_sample)

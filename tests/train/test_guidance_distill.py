"""Guidance distillation (cfg.guidance_distill): the student's target is its teacher's CFG velocity."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_TOML, overrides
from rectiflow.convert.transformer import build_transformer, save_transformer
from rectiflow.errors import ConfigError
from rectiflow.models.transformer import image_ids, pack, text_ids
from rectiflow.train.config import load_config
from rectiflow.train.trainer import Trainer


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(3)
    model = build_transformer("micro")
    with torch.no_grad():  # larger output weights than the zero-ish init, so guidance changes the target
        for p in model.final_layer.parameters():
            p.normal_(0, 0.2)
    return save_transformer(model, tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


def _trainer(cache, out, teacher, *extra):
    return Trainer(load_config(TINY_TOML, overrides(
        cache, out, "model.preset=micro", "checkpoint.every=0", f'guidance_distill.teacher="{teacher}"',
        f'model.init="{teacher}"', *extra)))


def test_target_is_the_teachers_cfg_velocity_and_the_student_starts_as_the_teacher(tiny_cache, tmp_path,
                                                                                   teacher_file):
    tr = _trainer(tiny_cache, tmp_path, teacher_file, "guidance_distill.scale_min=1.5",
                  "guidance_distill.scale_max=4.0")
    assert tr.params.guidance_embed
    batch = tr.load_batch([0, 1, 2, 3])
    lat = batch["latents"].float()
    b, _, h, w = lat.shape
    eps_lat = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    x0, eps = pack(lat), pack(eps_lat)
    t = torch.tensor([0.9, 0.6, 0.4, 0.1])
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    g = tr.guidance_distiller.scales(4, torch.Generator().manual_seed(1))
    assert ((g >= 1.5) & (g <= 4.0)).all() and g.std() > 0
    txt, vec = batch["txt"].float(), batch["vec"].float()
    got = tr.guidance_distiller.target(x_t, t, txt, vec, h, w, g)

    teacher = tr.guidance_distiller.teacher.model
    txt0, vec0 = tr.cache.text(0)
    ids = image_ids(b, h, w), text_ids(b, txt.shape[1])
    with torch.no_grad():
        v_c = teacher(x_t, ids[0], txt, ids[1], t, vec, None)
        v_u = teacher(x_t, ids[0], txt0.expand(b, *txt0.shape), ids[1], t, vec0.expand(b, *vec0.shape), None)
        want = v_u + g[:, None, None] * (v_c - v_u)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (want - v_c).abs().max() > 1e-3  # the guidance matters for this teacher
        # the student (guidance embedding added, zero output layer) is the teacher at step 0, for any g
        student = tr.model(x_t, ids[0], txt, ids[1], t, vec, g)
        torch.testing.assert_close(student, v_c, rtol=1e-5, atol=1e-6)
        # and the trainer's loss is the student's squared error against that target
        loss = tr.forward_loss(batch, t, eps_lat, g)
        torch.testing.assert_close(loss, ((student - want) ** 2).mean(), rtol=1e-5, atol=1e-7)


def test_both_distillations_at_once_refused(tiny_cache, tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="guidance first"):
        load_config(TINY_TOML, overrides(tiny_cache, tmp_path, f'distill.teacher="{teacher_file}"',
                                         f'guidance_distill.teacher="{teacher_file}"'))
    with pytest.raises(ConfigError, match="scale_min <= scale_max"):
        load_config(TINY_TOML, overrides(tiny_cache, tmp_path, "guidance_distill.scale_min=3",
                                         "guidance_distill.scale_max=2"))

"""Few-step distillation (cfg.distill): the target is two guided Euler half-steps of the teacher."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TOML, cli_train, overrides
from rectiflow.convert.transformer import build_transformer, save_transformer
from rectiflow.errors import ConfigError
from rectiflow.flow import timestep_grid
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
    return Trainer(load_config(TINY_TOML, overrides(cache, out, "model.preset=micro", "checkpoint.every=0",
                                                    f'distill.teacher="{teacher}"', *extra)))


def _four_points(tr):
    """Cache rows 0-3 on their forward paths at t = 1, 0.75, 0.5, 0.25: the batch and target() arguments."""
    batch = tr.load_batch([0, 1, 2, 3])
    lat = batch["latents"].float()
    _, _, h, w = lat.shape
    x0, eps = pack(lat), pack(torch.randn(lat.shape, generator=torch.Generator().manual_seed(0)))
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    return batch, (x_t, t, batch["txt"].float(), batch["vec"].float(), h, w)


def test_target_is_two_guided_teacher_half_steps(tiny_cache, tmp_path, teacher_file):
    tr = _trainer(tiny_cache, tmp_path, teacher_file, "distill.student_steps=4", "distill.teacher_cfg=2.5")
    batch, args = _four_points(tr)
    x_t, t, _, _, h, w = args
    b = x_t.shape[0]
    got = tr.distiller.target(*args)

    txt0, vec0 = tr.cache.text(0)
    teacher = tr.distiller.teacher

    def v(x, tt, txt, vec):
        return teacher(x, image_ids(b, h, w), txt, text_ids(b, txt.shape[1]), tt, vec, None)

    def guided(x, tt):
        vc = v(x, tt, batch["txt"].float(), batch["vec"].float())
        vu = v(x, tt, txt0.expand(b, *txt0.shape), vec0.expand(b, *vec0.shape))
        return vu + 2.5 * (vc - vu)

    with torch.no_grad():
        dt = 0.25
        x_mid = x_t - dt / 2 * guided(x_t, t)
        x_end = x_mid - dt / 2 * guided(x_mid, t - dt / 2)
    torch.testing.assert_close(got, (x_t - x_end) / dt, rtol=1e-5, atol=1e-5)
    # guidance matters here: an unguided target differs
    tr1 = _trainer(tiny_cache, tmp_path / "cfg1", teacher_file, "distill.teacher_cfg=1.0")
    unguided = tr1.distiller.target(*args)
    assert not torch.allclose(unguided, got, atol=1e-4)


def test_teacher_cfg_interval_guides_only_the_samples_inside(tiny_cache, tmp_path, teacher_file):
    """t = 1, 0.75 (both half steps inside [0.6, 1]) take the guided teacher's target; t = 0.5, 0.25 (both
    outside) the unguided one's, sample by sample in one batch."""
    tr = _trainer(tiny_cache, tmp_path / "a", teacher_file, "distill.teacher_cfg=2.5",
                  "distill.teacher_cfg_interval=[0.6, 1.0]")
    assert tr.cfg.distill.teacher_cfg_interval == [0.6, 1.0]
    guided = _trainer(tiny_cache, tmp_path / "b", teacher_file, "distill.teacher_cfg=2.5")
    plain = _trainer(tiny_cache, tmp_path / "c", teacher_file, "distill.teacher_cfg=1.0")
    _, args = _four_points(tr)
    got = tr.distiller.target(*args)
    want_in, want_out = guided.distiller.target(*args), plain.distiller.target(*args)
    torch.testing.assert_close(got[:2], want_in[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2:], want_out[2:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want_in[2:], want_out[2:], atol=1e-4)  # the interval decided something


def test_student_times_are_the_sampling_grid(tiny_cache, tmp_path, teacher_file):
    tr = _trainer(tiny_cache, tmp_path, teacher_file, "distill.student_steps=4")
    t = tr.distiller.times(400, tr.generator)
    assert set(t.tolist()) == {1.0, 0.75, 0.5, 0.25}


def test_shifted_grid_target_is_two_teacher_steps_of_the_samplers_grid(tiny_cache, tmp_path, teacher_file):
    """distill.shift = alpha: the student's times are the sampler's shifted 4-step grid (timestep_grid, as
    `generate --shift alpha` uses), and the target spans two Euler steps of the shifted 8-step grid."""
    tr = _trainer(tiny_cache, tmp_path, teacher_file, "distill.student_steps=4", "distill.shift=3.0",
                  'validation.shift="3"')
    g4, g8 = timestep_grid(4, shift=3.0), timestep_grid(8, shift=3.0)
    torch.testing.assert_close(tr.distiller.grid(), g4[:-1].float())
    assert set(tr.distiller.times(400, tr.generator).tolist()) == set(g4[:-1].float().tolist())
    batch = tr.load_batch([0, 1, 2, 3])
    lat = batch["latents"].float()
    b, _, h, w = lat.shape
    txt, vec = batch["txt"].float(), batch["vec"].float()
    x0, eps = pack(lat), pack(torch.randn(lat.shape, generator=torch.Generator().manual_seed(0)))
    t = g4[:-1].float()
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    got = tr.distiller.target(x_t, t, txt, vec, h, w)
    with torch.no_grad():
        want = []
        for k in range(4):
            t0, t1, t2 = (g8[2 * k + j].float().reshape(1) for j in range(3))
            x, tk, vk = x_t[k:k + 1], txt[k:k + 1], vec[k:k + 1]
            ids = (image_ids(1, h, w), text_ids(1, txt.shape[1]))
            v1 = tr.distiller.teacher(x, ids[0], tk, ids[1], t0, vk, None)
            x_mid = x - (t0 - t1) * v1
            v2 = tr.distiller.teacher(x_mid, ids[0], tk, ids[1], t1, vk, None)
            want.append((x - (x_mid - (t1 - t2) * v2)) / (t0 - t2))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    linear = _trainer(tiny_cache, tmp_path / "lin", teacher_file, "distill.student_steps=4")
    assert not torch.allclose(linear.distiller.target(x_t, t, txt, vec, h, w), got, atol=1e-4)
    with pytest.raises(ConfigError, match="validation.shift"):  # the bundle must sample on the student's grid
        _trainer(tiny_cache, tmp_path / "bad", teacher_file, "distill.shift=3.0")
    with pytest.raises(ConfigError, match="distill.shift"):
        load_config(TINY_TOML, ["distill.shift=0"])


@pytest.mark.parametrize("substeps,shift", [(4, 1.0), (3, 3.0), (1, 1.0)])
def test_target_spans_k_teacher_steps(tiny_cache, tmp_path, teacher_file, substeps, shift):
    """distill.teacher_substeps = k: one student step of the 2-step grid covers k Euler steps of the teacher's
    sampler on the (shifted) 2k-step grid, as `generate --steps 2k --shift alpha` would take them (k = 1:
    the teacher's own velocity)."""
    extra = [f"distill.teacher_substeps={substeps}", "distill.student_steps=2", "distill.teacher_cfg=2.0"]
    if shift != 1.0:
        extra += [f"distill.shift={shift}", f'validation.shift="{shift:g}"']
    tr = _trainer(tiny_cache, tmp_path, teacher_file, *extra)
    grid = timestep_grid(2 * substeps, shift=shift).float()
    batch = tr.load_batch([0, 1])
    lat = batch["latents"].float()
    b, _, h, w = lat.shape
    txt, vec = batch["txt"].float(), batch["vec"].float()
    x0, eps = pack(lat), pack(torch.randn(lat.shape, generator=torch.Generator().manual_seed(1)))
    t = grid[[0, substeps]]  # the student's two grid times
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    got = tr.distiller.target(x_t, t, txt, vec, h, w)
    with torch.no_grad():
        want = []
        for j in range(2):
            x = x_t[j:j + 1]
            for i in range(substeps):
                t0, t1 = grid[j * substeps + i], grid[j * substeps + i + 1]
                v = tr.distiller.velocity(x, t0.reshape(1), txt[j:j + 1], vec[j:j + 1], h, w, None)
                x = x - (t0 - t1) * v
            want.append((x_t[j:j + 1] - x) / (t[j] - grid[(j + 1) * substeps]))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    if substeps == 1:
        torch.testing.assert_close(got, tr.distiller.velocity(x_t, t, txt, vec, h, w, None))
    else:  # more teacher steps give a different target than progressive distillation's two
        two = _trainer(tiny_cache, tmp_path / "two", teacher_file, *extra[1:])
        assert not torch.allclose(two.distiller.target(x_t, t, txt, vec, h, w), got, atol=1e-4)


def test_validation_loss_measures_the_distillation_target(tiny_cache, tmp_path, teacher_file):
    """While distilling, validation loss = MSE of the student against the teacher's two-half-step target at
    the student's grid times (not against the flow target eps - x0)."""
    tr = _trainer(tiny_cache, tmp_path, teacher_file, "distill.student_steps=2", "distill.teacher_cfg=2.0",
                  "validation.every=1", "validation.holdout=6", "validation.use_ema=false")
    got = tr.validator.loss(tr.model)
    assert sorted(got) == ["loss", "loss_t0.500", "loss_t1.000"]
    holdout = [tr.validator.cache[i] for i in tr.holdout]
    lat = torch.stack([it["latents"] for it in holdout]).float()
    txt = torch.stack([it["txt"] for it in holdout]).float()
    vec = torch.stack([it["vec"] for it in holdout]).float()
    g = torch.Generator().manual_seed(tr.cfg.validation.seed)
    eps = torch.stack([torch.randn(it["latents"].shape, generator=g) for it in holdout])
    b, _, h, w = lat.shape
    want, flow_loss = {}, {}
    with torch.no_grad():
        for tk in (1.0, 0.5):
            t = torch.full((b,), tk)
            x_t = (1 - tk) * pack(lat) + tk * pack(eps)
            pred = tr.model(x_t, image_ids(b, h, w), txt, text_ids(b, txt.shape[1]), t, vec, None)
            want[tk] = (pred - tr.distiller.target(x_t, t, txt, vec, h, w)).pow(2).mean().item()
            flow_loss[tk] = (pred - (pack(eps) - pack(lat))).pow(2).mean().item()
    assert got["loss_t1.000"] == pytest.approx(want[1.0], rel=1e-5)
    assert got["loss_t0.500"] == pytest.approx(want[0.5], rel=1e-5)
    assert got["loss"] == pytest.approx((want[1.0] + want[0.5]) / 2, rel=1e-5)
    assert got["loss_t0.500"] != pytest.approx(flow_loss[0.5], rel=1e-2)


def test_config_errors(tiny_cache, tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="student_steps"):
        load_config(TINY_TOML, ["distill.student_steps=0"])
    for bad in ("[0.8, 0.2]", "[0.5]", "[0.0, 2.0]"):
        with pytest.raises(ConfigError, match="distill.teacher_cfg_interval"):
            load_config(TINY_TOML, [f"distill.teacher_cfg_interval={bad}"])
    for bad in ("0", "2.5", "true"):
        with pytest.raises(ConfigError, match="teacher_substeps"):
            load_config(TINY_TOML, [f"distill.teacher_substeps={bad}"])
    for bad in ('"abc"', '"-2"'):  # the grid the exported bundle samples with
        with pytest.raises(ConfigError, match="validation.shift"):
            load_config(TINY_TOML, [f"validation.shift={bad}"])
    assert load_config(TINY_TOML, ['validation.shift="flux"']).validation.shift == "flux"
    with pytest.raises(ConfigError, match="rectified_flow"):
        _trainer(tiny_cache, tmp_path, teacher_file, "flow.path=eps_linear")


def test_distill_run_from_the_cli(tiny_cache, tmp_path, teacher_file, train_env):
    out = tmp_path / "run"
    r = cli_train(overrides(tiny_cache, out, "model.preset=micro", f'model.init="{teacher_file}"',
                            f'distill.teacher="{teacher_file}"', "distill.teacher_cfg=2.0", "train.steps=4",
                            "checkpoint.every=0"), train_env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    assert (out / "export" / "transformer.safetensors").is_file()

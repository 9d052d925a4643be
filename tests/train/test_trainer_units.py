"""Trainer pieces: LR schedule, accumulation == one batch, activation checkpointing, checkpoint helpers,
barriers on failed writes."""

import math
import shutil
from dataclasses import dataclass

import pytest
import torch

from conftest import TINY_TOML, overrides
from rectiflow.train.batches import local_slice
from rectiflow.train.checkpoint import (
    capture_rng,
    find_latest,
    flatten_optimizer_state,
    list_checkpoints,
    prune,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer_state,
)
from rectiflow.train.config import load_config
from rectiflow.train.distributed import LocalContext
from rectiflow.train.trainer import Trainer, lr_factor


def test_lr_factor():
    assert lr_factor(0, 4, 10, "constant", 0.0) == 0.25 and lr_factor(3, 4, 10, "constant", 0.0) == 1.0
    assert lr_factor(4, 4, 10, "cosine", 0.1) == 1.0
    assert lr_factor(10, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(7, 4, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(7, 4, 10, "linear", 0.0) == pytest.approx(0.5)


def test_local_slice_partitions_the_global_batch():
    got = sorted(j for m in range(2) for r in range(3) for j in range(12)[local_slice(12, m, 2, r, 3)])
    assert got == list(range(12))


def _losses(cache, out, *extra, steps=3):
    tr = Trainer(load_config(TINY_TOML, overrides(cache, out, "model.preset=micro", "checkpoint.every=0",
                                                  *extra)))
    return [tr.train_step().loss for _ in range(steps)], tr


def test_accumulation_equals_one_batch(tiny_cache, tmp_path):
    a, ta = _losses(tiny_cache, tmp_path / "a", "optim.accumulation=1")
    b, tb = _losses(tiny_cache, tmp_path / "b", "optim.accumulation=2")
    assert a == pytest.approx(b, rel=1e-5)
    for (k, p), q in zip(ta.model.named_parameters(), tb.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)


def test_activation_checkpointing_same_training(tiny_cache, tmp_path):
    a, ta = _losses(tiny_cache, tmp_path / "a")
    b, tb = _losses(tiny_cache, tmp_path / "b", "train.activation_checkpointing=true")
    assert a == b
    assert ta.model.state_dict().keys() == tb.model.state_dict().keys()
    assert all(torch.equal(p, q) for p, q in zip(ta.model.parameters(), tb.model.parameters()))


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95))
    p.grad = torch.randn(3, 2)
    opt.step()
    tensors, js = flatten_optimizer_state(opt.state_dict())
    assert set(tensors) == {"state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq"}
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1.0)
    opt2.load_state_dict(unflatten_optimizer_state(tensors, js))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95) and opt2.param_groups[0]["lr"] == 1e-3
    for k, v in opt.state[p].items():
        assert torch.equal(v, opt2.state[opt2.param_groups[0]["params"][0]][k])


def test_rng_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(5)
    state = capture_rng({"noise": g})
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()

    first = draw()
    restore_rng(*state, {"noise": g})
    assert draw() == first


def test_latest_ignores_partial_and_prune(tmp_path):
    def save(step):
        return save_checkpoint(tmp_path, step, model={"w": torch.ones(2) * step}, ema=None,
                               optimizer={"state": {}, "param_groups": []}, rng=capture_rng({}), state={},
                               config={}, config_toml="")

    for s in (1, 2, 3):
        save(s)
    (tmp_path / ".step-000000004.tmp-abc").mkdir()  # an interrupted write
    broken = tmp_path / "step-000000005"
    shutil.copytree(tmp_path / "step-000000003", broken)
    (broken / "optimizer.safetensors").unlink()  # listed in state.json but missing
    assert find_latest(tmp_path).name == "step-000000003"
    prune(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]
    assert not list(tmp_path.glob(".step-*"))


@dataclass
class _CountingDist(LocalContext):
    """The single-process context, counting barriers (a rank that skips one leaves the others waiting)."""

    barriers: int = 0

    def barrier(self) -> None:
        self.barriers += 1


def test_failed_write_still_meets_the_barrier(tiny_cache, tmp_path, monkeypatch):
    dist = _CountingDist()
    tr = Trainer(load_config(TINY_TOML, overrides(tiny_cache, tmp_path / "o", "model.preset=micro",
                                                  "checkpoint.every=0")), dist=dist)

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("rectiflow.train.export.export_weights", fail)
    monkeypatch.setattr("rectiflow.train.checkpoint.save_checkpoint", fail)
    for write in (tr.export, tr.save_checkpoint):
        before = dist.barriers
        with pytest.raises(OSError, match="disk full"):
            write()
        assert dist.barriers == before + 1, write.__name__

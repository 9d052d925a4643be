"""Non-finite steps are skipped (no update), logged with step and sample ids, and stop the run after the
configured count; checkpoints never hold non-finite tensors."""

import pytest
import torch

from conftest import TINY_TOML, overrides
from rectiflow.errors import RectiflowError
from rectiflow.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rectiflow.train.config import load_config
from rectiflow.train.metrics import read_metrics
from rectiflow.train.trainer import Trainer


def _trainer(cache, out, *extra):
    cfg = load_config(TINY_TOML, overrides(cache, out, "model.preset=micro", *extra))
    return Trainer(cfg)


def _corrupt_at(trainer, steps):
    load = trainer.load_batch

    def load_batch(indices):
        batch = load(indices)
        if trainer.step in steps:
            batch["latents"] = batch["latents"].clone()
            batch["latents"][0, 0, 0, 0] = float("nan")
        return batch

    trainer.load_batch = load_batch


def test_nan_batch_is_skipped_and_logged(tiny_cache, tmp_path, caplog):
    tr = _trainer(tiny_cache, tmp_path / "run", "train.steps=6", "checkpoint.every=3")
    _corrupt_at(tr, {3})
    before, ema_before = {}, {}

    def snapshot(step):
        if step == 3:
            before.update({k: v.clone() for k, v in tr.model.state_dict().items()})
            ema_before.update({k: v.clone() for k, v in tr.ema.items()})

    original = tr.train_step

    def train_step():
        snapshot(tr.step)
        result = original()
        if result.step in (3, 4):
            assert result.applied == (result.step == 3)
        if result.step == 4:  # the corrupted step: nothing changed, not applied
            assert not result.applied
            assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
            assert all(torch.equal(tr.ema[k], ema_before[k]) for k in tr.ema)
            assert all(p.grad is None for p in tr.model.parameters())
        return result

    tr.train_step = train_step
    with caplog.at_level("WARNING"):
        result = tr.fit()
    assert result["step"] == 6 and tr.bad_total == 1 and tr.bad_consecutive == 0
    skipped = read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl", "skipped")
    assert len(skipped) == 1 and skipped[0]["step"] == 3
    assert skipped[0]["loss"] == "nan" and len(skipped[0]["ids"]) == 4
    assert all(i.startswith("sample-") for i in skipped[0]["ids"])
    assert "step 3: non-finite loss" in caplog.text and skipped[0]["ids"][0] in caplog.text
    for d in list_checkpoints(tmp_path / "run" / "checkpoints"):
        c = load_checkpoint(d)
        for sd in (c.model, c.ema, {k: v for k, v in c.optimizer["state"][0].items()}):
            assert all(torch.isfinite(v).all() for v in sd.values())


def test_stops_after_consecutive_bad_steps(tiny_cache, tmp_path):
    tr = _trainer(tiny_cache, tmp_path / "run", "train.steps=20", "checkpoint.every=2",
                  "train.max_bad_consecutive=3")
    _corrupt_at(tr, set(range(4, 20)))
    with pytest.raises(RectiflowError, match=r"stopped at step 6: 3 consecutive / 3 total non-finite"):
        tr.fit()
    latest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert latest.name == "step-000000006"  # the skipped steps left finite state (checkpoint at step 6)
    assert all(torch.isfinite(v).all() for v in load_checkpoint(latest).model.values())


def test_stops_after_total_bad_steps(tiny_cache, tmp_path):
    tr = _trainer(tiny_cache, tmp_path / "run", "train.steps=20", "train.max_bad_consecutive=0",
                  "train.max_bad_total=2", "checkpoint.every=0")
    _corrupt_at(tr, {1, 5})
    with pytest.raises(RectiflowError, match="stopped at step 5: 1 consecutive / 2 total"):
        tr.fit()
    assert tr.step == 5


def test_checkpoint_refuses_non_finite(tmp_path):
    from rectiflow.train.checkpoint import capture_rng

    model = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(RectiflowError, match="tensor 'w' is not finite"):
        save_checkpoint(tmp_path, 1, model=model, ema=None, optimizer={"state": {}, "param_groups": []},
                        rng=capture_rng({}), state={}, config={}, config_toml="")
    assert not list(tmp_path.iterdir())

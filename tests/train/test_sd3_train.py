"""`rectiflow train` with an SD3 preset, end to end on the tiny cache: the loss falls, resume is exact, the
exported file and the checkpoint weights load back as SD3, validation runs through the same family seam."""

import shutil

import torch

from conftest import assert_same_checkpoint, cli_train, overrides
from rectiflow.convert.transformer import load_transformer
from rectiflow.models.sd3 import MMDiT
from rectiflow.train.metrics import read_metrics

SD3_ARGS = ("model.preset=sd3-micro", "train.steps=24", "checkpoint.every=12", "validation.every=12",
            "validation.holdout=4", "validation.buckets=2")


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "logs" / "metrics.jsonl", "train")]


def test_sd3_trains_and_resumes_exactly(tiny_cache, tmp_path, train_env):
    out = tmp_path / "run"
    args = overrides(tiny_cache, out, *SD3_ARGS)
    r = cli_train(args, train_env)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = _losses(out)
    assert len(losses) == 24
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6])  # it learns (deterministic run: -22%)
    val = read_metrics(out / "logs" / "metrics.jsonl", "val")
    assert val and all(torch.isfinite(torch.tensor(v["loss"])) for v in val)

    exported = load_transformer(out / "export" / "transformer.safetensors")
    assert isinstance(exported, MMDiT) and exported.params.depth == 2
    for name in ("model", "ema"):
        ckpt = load_transformer(out / "checkpoints" / "step-000000024" / f"{name}.safetensors")
        assert isinstance(ckpt, MMDiT)

    # resume from the step-12 checkpoint: the same step-24 state, bit for bit
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step-000000024")
    r = cli_train([*overrides(tiny_cache, again, *SD3_ARGS), "--resume"], train_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step-000000012" in r.stderr
    assert_same_checkpoint(again / "checkpoints" / "step-000000024", out / "checkpoints" / "step-000000024")

"""Validation: held-out samples never trained on, bucketed loss with fixed noise, sample grid PNG."""

import numpy as np
import torch
from PIL import Image

from conftest import TINY_TOML, HashTextEncoder, PoolAutoEncoder, overrides
from rectiflow.data.grid import LABEL_WIDTH, PAD
from rectiflow.train.config import load_config
from rectiflow.train.metrics import read_metrics
from rectiflow.train.trainer import Trainer
from rectiflow.train.validation import bucket_times


def _decoder():
    ae = PoolAutoEncoder()
    pinv = torch.linalg.pinv(ae.proj)  # [3, 16]: least-squares inverse of the 1x1 projection

    def decode(z):  # [B, 16, h, w] -> [B, 3, 8h, 8w]
        x = torch.einsum("co,bohw->bchw", pinv, z)
        return torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")

    return decode


def test_validation_loss_and_grid(tiny_cache, tmp_path):
    cfg = load_config(TINY_TOML, overrides(
        tiny_cache, tmp_path / "run", "model.preset=micro", "train.steps=4", "checkpoint.every=0",
        "validation.every=2", "validation.holdout=8", "validation.buckets=4", "validation.sample_steps=3",
        'validation.prompts=["a red square", "a blue square"]', "validation.seeds=[0, 1, 2]",
        "validation.cfg_scale=2.0"))
    tr = Trainer(cfg)
    seen = set()
    load = tr.load_batch
    tr.load_batch = lambda idx: (seen.update(idx), load(idx))[1]
    tr.validator.text_encoder = HashTextEncoder()
    tr.validator.decode = _decoder()
    first = tr.validator.loss(tr.model)
    assert first == tr.validator.loss(tr.model)  # fixed noise: deterministic
    assert set(first) == {f"loss_t{t:.3f}" for t in bucket_times(4)} | {"loss"}
    assert abs(first["loss"] - sum(v for k, v in first.items() if k != "loss") / 4) < 1e-9
    tr.fit()
    assert not seen & set(tr.holdout) and len(tr.holdout) == 8
    rows = read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl", "val")
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["loss"] != first["loss"]
    grid = Image.open(tmp_path / "run" / "samples" / "step-000000004.png").convert("RGB")
    cell = 4 * 32 + PAD  # 32 px samples enlarged 4x (to 128 px) with a gap
    top = grid.height - 2 * cell  # the column labels' band
    assert grid.size == (LABEL_WIDTH + 3 * cell, top + 2 * cell) and top > 0  # columns: seeds, rows: prompts
    labels = np.asarray(grid)[:, :LABEL_WIDTH]
    assert (labels[top:top + cell] < 128).any() and (labels[top + cell:] < 128).any()  # each row: its prompt
    assert (np.asarray(grid)[:top, LABEL_WIDTH:] < 128).any()  # the column labels
    # sampling is deterministic per seed: the same latents twice, and a different seed differs
    z1 = tr.validator.sample(tr.model, ["a red square"], [0, 1], 4, 4)
    z2 = tr.validator.sample(tr.model, ["a red square"], [0, 1], 4, 4)
    assert torch.equal(z1, z2) and not torch.equal(z1[0], z1[1])


def test_validation_prompts_from_the_data(tiny_cache, tmp_path):
    """With no validation.prompts, validation.data_prompts captions of the dataset itself are the prompts:
    distinct, non-empty, the held-out samples' first."""
    cfg = load_config(TINY_TOML, overrides(
        tiny_cache, tmp_path / "run", "model.preset=micro", "train.steps=0", "validation.every=1",
        "validation.holdout=4", "validation.prompts=[]", "validation.data_prompts=3"))
    tr = Trainer(cfg)
    prompts = tr.validator.prompts
    captions = tr.cache.manifest["captions"]
    assert len(prompts) == 3 == len(set(prompts)) and all(p in captions and p for p in prompts)
    first_holdout = captions[tr.validator.cache.caption_index(tr.holdout[0])]
    assert prompts[0] == first_holdout
    named = load_config(TINY_TOML, overrides(
        tiny_cache, tmp_path / "r2", "model.preset=micro", "train.steps=0", "validation.every=1",
        "validation.holdout=4", 'validation.prompts=["x y"]', "validation.data_prompts=3"))
    assert Trainer(named).validator.prompts == ["x y"]  # named prompts win

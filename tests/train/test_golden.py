"""Golden loss curve: the first 30 steps of configs/tiny.toml (the `tiny` transformer, fp32, seed 0) on the
synthetic test cache (tests/train/conftest.py) must match tests/train/golden/tiny_loss.json.

Regenerate (after an intended change of the model, the step or the flow math; say why in the commit):
    PYTHONPATH=src:tests/train python tests/train/test_golden.py
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_TOML, make_cache, overrides
from rectiflow.train.config import load_config
from rectiflow.train.trainer import Trainer

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"
STEPS = 30
# Float32 sums differ with thread count and CPU kernels (1 vs 2 threads here: 2e-7 relative after 30 steps);
# other CPUs' kernels may differ more, and Adam amplifies differences a little.
RTOL = 1e-3


def loss_curve(cache: Path, out: Path) -> list[float]:
    cfg = load_config(TINY_TOML, overrides(cache, out, f"train.steps={STEPS}", "checkpoint.every=0",
                                           "ema.enabled=false", "train.precision=fp32", "train.seed=0"))
    trainer = Trainer(cfg)
    return [trainer.train_step().loss for _ in range(STEPS)]


def test_golden_loss_curve(tiny_cache, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = loss_curve(tiny_cache, tmp_path / "run")
    assert losses == pytest.approx(golden["losses"], rel=RTOL)
    assert losses[-1] < 0.7 * losses[0]  # and it learns


def regenerate() -> None:
    with tempfile.TemporaryDirectory() as d:
        losses = loss_curve(make_cache(Path(d) / "cache"), Path(d) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "what": f"first {STEPS} losses of configs/tiny.toml + TEST_OVERRIDES of tests/train/conftest.py",
        "regenerate": "PYTHONPATH=src:tests/train python tests/train/test_golden.py",
        "torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    sys.exit(regenerate())

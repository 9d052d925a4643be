"""Golden loss curve, a regression guard: the first 30 steps of configs/tiny.toml (the `tiny` transformer,
fp32, seed 0) on the synthetic test cache (tests/train/conftest.py) must match tests/train/golden/
tiny_loss.json, whose "what" / "purpose" / "regenerate" fields say exactly that (checked here).

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
EXTRA = ("checkpoint.every=0", "ema.enabled=false", "train.precision=fp32", "train.seed=0")
# What the golden file holds and why; regenerate() writes exactly these, and the test checks the file says so.
WHAT = (f"the first {STEPS} training losses (Trainer.train_step) of configs/tiny.toml with the "
        f"TEST_OVERRIDES of tests/train/conftest.py and {', '.join(EXTRA)}, on the synthetic cache of "
        "conftest.make_cache")
PURPOSE = (f"guards against regressions: test_golden.py fails when a change moves any of these losses by "
           f"more than rtol {RTOL}; made by running the regenerate command on CPU, and regenerated "
           "only after an intended change of the model, the training step or the flow math (say why in the "
           "commit)")
REGENERATE = "PYTHONPATH=src:tests/train python tests/train/test_golden.py"


def loss_curve(cache: Path, out: Path) -> list[float]:
    cfg = load_config(TINY_TOML, overrides(cache, out, f"train.steps={STEPS}", *EXTRA))
    trainer = Trainer(cfg)
    return [trainer.train_step().loss for _ in range(STEPS)]


def test_golden_loss_curve(tiny_cache, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert (golden["what"], golden["purpose"], golden["regenerate"]) == (WHAT, PURPOSE, REGENERATE)
    losses = loss_curve(tiny_cache, tmp_path / "run")
    assert losses == pytest.approx(golden["losses"], rel=RTOL)
    assert losses[-1] < 0.7 * losses[0]  # and it learns


def regenerate() -> None:
    with tempfile.TemporaryDirectory() as d:
        losses = loss_curve(make_cache(Path(d) / "cache"), Path(d) / "run")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"what": WHAT, "purpose": PURPOSE, "regenerate": REGENERATE,
                                  "torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    sys.exit(regenerate())

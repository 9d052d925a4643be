"""recipes/shapes: the model card's wall-time table (finalize.py) and the colour-binding probe."""

import importlib.util
from pathlib import Path

FINALIZE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "finalize.py"


def _finalize():
    spec = importlib.util.spec_from_file_location("shapes_finalize", FINALIZE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wall_rows_sum_the_invocations_of_a_resumed_stage():
    times = [{"stage": "data", "seconds": 390}, {"stage": "transformer", "seconds": 3000},
             {"stage": "transformer", "seconds": 1962}, {"stage": "eval", "seconds": 150}]
    assert _finalize()._wall_rows(times).splitlines() == [
        "| data | 6.5 |", "| transformer (2 invocations) | 82.7 |", "| eval | 2.5 |"]


def test_card_sentence_reads_the_ceiling_report(tmp_path):
    from types import SimpleNamespace

    import torch

    from rectiflow.eval.shapes_ceiling import evaluate_ceiling

    class Blank(torch.nn.Module):  # decodes everything to white: the round trip scores 0
        def __init__(self):
            super().__init__()
            self.w, self.params = torch.nn.Parameter(torch.zeros(())), SimpleNamespace(ch_mult=(1,))

        def encode(self, x):
            return x

        def decode(self, z):
            return torch.ones_like(z)

    assert _finalize()._ceiling_sentence(tmp_path) == ""  # no report: no sentence
    evaluate_ceiling(Blank(), limit=1, seeds=[0], progress=False, out_dir=tmp_path / "ceiling")
    sentence = _finalize()._ceiling_sentence(tmp_path)
    assert "score 0.000 seen / 0.000 held-out" in sentence and "(the renders: 1.000 / 1.000;" in sentence


def test_binding_probe_runs_and_its_counts_add_up(tmp_path):
    import json
    import subprocess
    import sys

    from rectiflow.sample.random_model import random_bundle

    bundle = random_bundle(tmp_path / "model", transformer="micro", autoencoder="tiny", seed=0)
    probe = FINALIZE.parent / "binding_probe.py"
    out = tmp_path / "probe.json"
    run = subprocess.run([sys.executable, str(probe), str(bundle), "--steps", "1", "--prompts", "3",
                          "--size", "32", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["seq A, pooled A", "seq A, pooled B", "seq B, pooled A", "seq A, pooled empty"]
    for r in res.values():
        assert r["images"] == 12  # 3 prompts x seeds 0..3
        assert r["colour_A"] + r["colour_B"] + r["colour_other"] == r["objects"]
        assert 0 <= r["correct_A"] <= 1 and 0 <= r["correct_B"] <= 1
    assert "seq A, pooled B" in run.stdout
    tf = json.loads(out.read_text())["teacher_forced"]
    assert list(tf) == ["0.95", "0.85", "0.7", "0.5", "0.3", "0.1"]
    for losses in tf.values():
        assert list(losses) == ["true", "colour swap", "shape swap", "other colours"]
        assert all(v > 0 for v in losses.values())

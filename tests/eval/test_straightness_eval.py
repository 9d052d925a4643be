"""`rectiflow eval straightness` on a tiny random model: the report is flow.straightness of its ODE."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rectiflow.errors import RectiflowError
from rectiflow.eval.straightness import evaluate_straightness
from rectiflow.flow import endpoint_errors, straightness
from rectiflow.models.transformer import pack
from rectiflow.sample import Pipeline, initial_noise, random_bundle

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # weights scaled down: a smoother field in t, so the adaptive reference takes few steps
    return random_bundle(tmp_path_factory.mktemp("m") / "b", transformer="micro", seed=3, weight_scale=0.3)


def test_report_matches_the_flow_functions(bundle):
    pipe = Pipeline.from_bundle(bundle)
    rep = evaluate_straightness(pipe, n=3, prompts=PROMPTS, seed=5, steps=8, buckets=4, few_steps=(1, 2),
                                size=32, batch_size=2, cfg_scale=2.0, progress=False)
    cond = pipe.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    empty = pipe.encode_prompts([""] * 3)
    v = pipe.velocity_fn(cond, empty, 4, 4, None, 2.0)
    x1 = pack(initial_noise([5, 6, 7], 3, 16, 4, 4))
    with torch.no_grad():
        want = straightness(v, x1, steps=8, buckets=4)
        errs = endpoint_errors(v, x1, want.endpoint, steps=(1, 2))
    assert rep["S"] == pytest.approx(want.value, rel=1e-5)
    assert rep["S_by_bucket"] == pytest.approx(want.by_bucket, rel=1e-5)
    assert rep["endpoint_rms"] == pytest.approx({"1": errs[1], "2": errs[2]}, rel=1e-5)
    assert rep["S"] > 0 and rep["cfg_scale"] == 2.0
    with pytest.raises(RectiflowError, match="--reference"):
        evaluate_straightness(pipe, n=1, prompts=PROMPTS, reference="rk9", progress=False)


def test_cli(bundle, tmp_path, cli_env):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "rectiflow", "eval", "straightness", "--model", str(bundle),
                        "--n", "2", "--steps", "8", "--buckets", "2", "--reference", "dopri5", "--size", "32",
                        "--no-progress", "--out", str(out)], env=cli_env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "straightness S = " in r.stdout and "endpoint RMS distance to dopri5" in r.stdout
    rep = json.loads(out.read_text())
    assert set(rep["endpoint_rms"]) == {"1", "2", "4", "8"} and len(rep["S_by_bucket"]) == 2

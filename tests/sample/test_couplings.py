"""`rectiflow reflow pairs`: couplings match the teacher's ODE, resume and extend exactly, refuse mixing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rectiflow.data.couplings import CouplingsDataset, read_manifest
from rectiflow.errors import RectiflowError
from rectiflow.flow import solve, solve_adaptive, timestep_grid
from rectiflow.models.transformer import pack, unpack
from rectiflow.sample import Pipeline, initial_noise, random_bundle
from rectiflow.sample import couplings as couplings_mod
from rectiflow.sample.couplings import PromptSource, make_couplings

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue star"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("teacher") / "b", transformer="micro", seed=1)


@pytest.fixture(scope="module")
def pipe(bundle):
    return Pipeline.from_bundle(bundle)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _make(pipe, prompt_file, out, n, **kw):
    kw = {"steps": 3, "batch_size": 2, "shard_size": 2, "width": 32, "height": 32, "progress": False, **kw}
    return make_couplings(pipe, PromptSource.from_file(prompt_file, pipe.text_encoder), out, n, **kw)


def _tensors(out):
    m = read_manifest(out)
    return m, {s["file"]: load_file(str(out / s["file"])) for s in m["shards"]}


def _assert_same(a, b):
    (ma, ta), (mb, tb) = _tensors(a), _tensors(b)
    assert [s["file"] for s in ma["shards"]] == [s["file"] for s in mb["shards"]]
    for f in ta:
        assert ta[f].keys() == tb[f].keys()
        for k in ta[f]:
            assert torch.equal(ta[f][k], tb[f][k]), (f, k)


def test_pairs_are_the_teachers_ode_endpoints_of_seeded_noise(pipe, prompt_file, tmp_path):
    m = _make(pipe, prompt_file, tmp_path / "c", 5, cfg_scale=2.0, seed=7)
    assert m["status"] == "complete" and m["n"] == 5 and [s["count"] for s in m["shards"]] == [2, 2, 1]
    assert m["teacher"]["hash"] == pipe.model_hash and m["solver"] == "euler" and m["steps"] == 3
    data = CouplingsDataset(tmp_path / "c")
    assert len(data) == 5
    # pair 3: the noise of seed 7 + 3, and 3 Euler steps of the CFG-guided teacher from it
    noise = initial_noise([10], 1, 16, 4, 4)
    torch.testing.assert_close(data.noise[3:4], noise, rtol=0, atol=0)
    txt, vec = pipe.encode_prompts([data.prompts[3]])
    empty = pipe.encode_prompts([""])
    v = pipe.velocity_fn((txt, vec), empty, 4, 4, None, 2.0)
    with torch.no_grad():
        z0 = unpack(solve(v, pack(noise), timestep_grid(3), method="euler"), 4, 4)
    torch.testing.assert_close(data.z0[3:4], z0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.txt[3], txt[0])
    assert data.prompts[3] in PROMPTS


def test_interrupted_run_resumes_exactly_and_a_larger_n_extends(pipe, prompt_file, tmp_path, monkeypatch):
    _make(pipe, prompt_file, tmp_path / "whole", 5)
    real, calls = couplings_mod._shard, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(couplings_mod, "_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _make(pipe, prompt_file, tmp_path / "resumed", 5)
    assert read_manifest(tmp_path / "resumed")["status"] == "partial"
    monkeypatch.setattr(couplings_mod, "_shard", real)
    _make(pipe, prompt_file, tmp_path / "resumed", 5)
    _assert_same(tmp_path / "whole", tmp_path / "resumed")
    _make(pipe, prompt_file, tmp_path / "grown", 3)  # shards of 2 + 1, the short one redone when extending
    _make(pipe, prompt_file, tmp_path / "grown", 5)
    _assert_same(tmp_path / "whole", tmp_path / "grown")


def test_dopri5_pairs_are_the_adaptive_solution(pipe, prompt_file, tmp_path):
    m = _make(pipe, prompt_file, tmp_path / "c", 2, solver="dopri5", rtol=1e-5, atol=1e-5)
    assert m["solver"] == "dopri5" and m["steps"] is None and m["rtol"] == 1e-5
    data = CouplingsDataset(tmp_path / "c")
    v = pipe.velocity_fn(pipe.encode_prompts(data.prompts), None, 4, 4)
    with torch.no_grad():
        z0, _ = solve_adaptive(v, pack(initial_noise([0, 1], 2, 16, 4, 4)), 1.0, 0.0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.z0, unpack(z0, 4, 4), rtol=1e-5, atol=1e-5)


def test_other_teacher_or_settings_refused(pipe, prompt_file, tmp_path):
    _make(pipe, prompt_file, tmp_path / "c", 2)
    other = Pipeline.from_bundle(random_bundle(tmp_path / "other", transformer="micro", seed=2))
    with pytest.raises(RectiflowError, match="teacher .* not .*do not mix"):
        _make(other, prompt_file, tmp_path / "c", 2)
    with pytest.raises(RectiflowError, match="steps=3, this run has 4"):
        _make(pipe, prompt_file, tmp_path / "c", 2, steps=4)


def _cli(args, cli_env):
    return subprocess.run([sys.executable, "-m", "rectiflow", "reflow", "pairs", *args], env=cli_env,
                          capture_output=True, text=True, timeout=120)


def test_cli_pairs_and_bad_input(bundle, prompt_file, tmp_path, cli_env):
    base = ["--model", str(bundle), "--prompts", str(prompt_file), "--steps", "2", "--no-progress"]
    r = _cli([*base, "--n", "3", "--out", str(tmp_path / "c")], cli_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 pairs of" in r.stdout and read_manifest(tmp_path / "c")["status"] == "complete"

    r = _cli([*base, "--n", "0", "--out", str(tmp_path / "zero")], cli_env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --n must be a positive number of pairs, got 0"
    assert not (tmp_path / "zero").exists()

    other = random_bundle(tmp_path / "other", transformer="micro", seed=5)
    r = _cli(["--model", str(other), "--prompts", str(prompt_file), "--steps", "2", "--n", "3", "--out",
              str(tmp_path / "c")], cli_env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "do not mix" in last
    assert "Traceback" not in r.stderr
    assert read_manifest(tmp_path / "c")["teacher"]["hash"] != "", "the first teacher's couplings stay"

    card = json.loads((other / "model.json").read_text())  # a FLUX text-encoder spec whose files are absent
    card["text_encoder"] = {"kind": "flux", "t5_path": "t5", "clip_path": "clip", "t5_tokenizer_path": "t5",
                            "clip_tokenizer_path": "clip", "max_length": 16}
    (other / "model.json").write_text(json.dumps(card))
    r = _cli(["--model", str(other), "--prompts", str(prompt_file), "--n", "3", "--out", str(tmp_path / "x")],
             cli_env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[-1].startswith("error: the model's text encoder is unavailable")
    assert "--from-cache" in lines[-1]

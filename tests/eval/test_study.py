"""`rectiflow study`: spec validation (one line per mistake), a tiny two-variant study end to end, resume
after an interrupted variant. Real components throughout: a shapes-world cache made with `rectiflow data
shapes` / `rectiflow cache` (random tiny autoencoder, the local MiniLM), the `micro` transformer, the real
benchmark on one prompt per task at 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rectiflow.cli.main import main
from rectiflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE_TOML = """
[model]
preset = "micro"
autoencoder = "{ae}"
[data]
cache = "{cache}"
batch_size = 4
[optim]
lr = 1e-3
warmup_steps = 2
schedule = "constant"
[ema]
decay = 0.5
[train]
log_every = 1
[validation]
every = 4
holdout = 4
sample_steps = 2
[checkpoint]
every = 2
keep = 0
"""

SPEC_TOML = """
[study]
name = "tiny"
base = "base.toml"
out = "{out}"
seeds = [0]

[budget]
samples = 16

[eval]
steps = [1, 2]
at = [0.5, 1.0]
splits = ["seen"]
limit = 1
size = 32
cfg = 1.0

[[variants]]
name = "rf/lognorm(0.00,1.00)"
flow.timestep_params = {{m = 0.0, s = 1.0}}

[[variants]]
name = "rf/uniform"
flow.timesteps = "uniform"
flow.timestep_params = {{}}
eval.shift = 3
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 24-image shapes-world cache at 32 px and the random tiny autoencoder that encoded it."""
    from rectiflow.convert.autoencoder import build_autoencoder, save_autoencoder

    root = tmp_path_factory.mktemp("world")
    assert main(["data", "shapes", "--out", str(root / "data"), "--n", "24", "--size", "32",
                 "--no-progress"]) == 0
    import torch

    torch.manual_seed(0)
    save_autoencoder(build_autoencoder("tiny"), root / "ae.safetensors", format="bfl")
    assert main(["cache", "--data", str(root / "data"), "--autoencoder", str(root / "ae.safetensors"),
                 "--text-encoder", "minilm:16", "--size", "32", "--out", str(root / "cache")]) == 0
    return root


def _write_spec(folder: Path, world: Path, out: Path, spec: str = SPEC_TOML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(BASE_TOML.format(ae=world / "ae.safetensors", cache=world / "cache"))
    p = folder / "spec.toml"
    p.write_text(spec.format(out=out))
    return p


# ---- validation: one line each ---------------------------------------------------------------------------


def _spec_error(tmp_path, world, text: str) -> str:
    from rectiflow.eval.study_spec import load_spec

    p = _write_spec(tmp_path / "s", world, tmp_path / "out", text)
    with pytest.raises(ConfigError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("edit, expected", [
    (("[eval]", "[eval]\nstepz = [4]"), "unknown key 'stepz' in [eval]"),
    (("[study]", "[studdy]\nx = 1\n[study]"), "unknown key 'studdy' in the study spec"),
    (("seeds = [0]", "seeds = [0]\ncolour = 1"), "unknown key 'colour' in [study]"),
    (('flow.timesteps = "uniform"', 'flow.timestepz = "uniform"'),
     "variant 'rf/uniform' overrides flow.timestepz, which is not a config key"),
    (('flow.timesteps = "uniform"', 'flou.timesteps = "uniform"'),
     "variant 'rf/uniform' overrides unknown config section 'flou'"),
    (("[budget]\nsamples = 16", ""), "[budget] is missing"),
    (("samples = 16", "samples = 16\ncpu_minutes = 1"), "[budget] needs exactly one of samples"),
    (("samples = 16", "seconds = 16"), "unknown key 'seconds' in [budget]"),
    (('flow.timesteps = "uniform"', 'flow.timesteps = "uniform"\neval.steps = [3]'),
     "unknown key 'steps' in variant 'rf/uniform' eval"),
    (('name = "rf/uniform"', 'name = "rf/lognorm(0.00,1.00)"'), "appears twice"),
    (('flow.timesteps = "uniform"', 'optim.lr = -1.0'), "variant 'rf/uniform': optim.lr=-1.0"),
    (("at = [0.5, 1.0]", "at = [0.0, 1.0]"), "at must be a non-empty list of budget fractions"),
])
def test_spec_errors_are_one_line(tmp_path, world, edit, expected):
    old, new = edit
    assert old in SPEC_TOML
    assert expected in _spec_error(tmp_path, world, SPEC_TOML.replace(old, new, 1))


def test_spec_resolves_variants_and_sets(tmp_path, world):
    from rectiflow.eval.study_spec import load_spec

    p = _write_spec(tmp_path / "s", world, tmp_path / "out")
    spec = load_spec(p, ["budget.samples=40", "study.seeds=[3, 4]"])
    assert spec.seeds == (3, 4) and spec.budget_samples == 40
    lognorm, uniform = spec.variants
    assert uniform.config.flow.timesteps == "uniform" and uniform.config.flow.timestep_params == {}
    assert lognorm.config.flow.timesteps == "logit_normal" and lognorm.eval.shift is None
    assert uniform.eval.shift == 3.0 and uniform.eval.steps == (1, 2)  # [eval] with the variant's own shift
    assert spec.steps_for_samples(uniform) == 10  # 40 samples / batch 4
    cfg = spec.run_config(uniform, 4, tmp_path / "r", 10)
    assert cfg.train.seed == 4 and cfg.train.steps == 10 and cfg.export.formats == []
    assert uniform.slug == "rf-uniform" and lognorm.slug == "rf-lognorm-0.00-1.00"


def test_cli_errors(tmp_path, world, capsys):
    p = _write_spec(tmp_path / "s", world, tmp_path / "out")
    assert main(["study", str(p), "--only", "edm", "--dry-run"]) == 2
    assert "--only names 'edm', which is not a variant of tiny" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


# ---- running -------------------------------------------------------------------------------------------


def test_two_variant_study_end_to_end_and_resume(tmp_path, world, capsys, monkeypatch):
    """Dry run (nothing written), a study interrupted in its second variant, the same command again: the
    first variant is skipped, the second resumes from its checkpoint, and the report covers both."""
    from rectiflow.eval import study as study_mod
    from rectiflow.eval.study_layout import load_run_state
    from rectiflow.eval.study_spec import load_spec
    from rectiflow.train.trainer import Trainer

    out = tmp_path / "out"
    p = _write_spec(tmp_path / "s", world, out)
    assert main(["study", str(p), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "rf/uniform seed 0: new; 4 steps x batch 4; score at steps [2, 4]" in printed
    assert not out.exists()

    # interrupt rf/uniform at its first training step (as Ctrl-C does: the trainer finishes the step,
    # writes a checkpoint and returns interrupted)
    real_fit = Trainer.fit

    def interrupted_fit(self, stop_at=None):
        if self.cfg.flow.timesteps == "uniform" and self.step == 0:
            one_step = self.train_step

            def step_then_signal():
                result = one_step()
                self._on_signal(2, None)  # SIGINT arrives during the first step
                return result

            self.train_step = step_then_signal
        return real_fit(self, stop_at=stop_at)

    monkeypatch.setattr(Trainer, "fit", interrupted_fit)
    assert main(["study", str(p)]) == 130
    assert "interrupted in rf/uniform seed 0" in capsys.readouterr().err
    first = load_run_state(out / "runs" / "rf-lognorm-0.00-1.00" / "seed-0")
    assert sorted(first["evals"][next(iter(first["evals"]))]) == ["2", "4"]
    second_dir = out / "runs" / "rf-uniform" / "seed-0"
    second = load_run_state(second_dir)
    assert second["segments"][-1]["to"] == 1  # the interrupted segment is recorded
    assert (second_dir / "train" / "checkpoints").is_dir()

    monkeypatch.setattr(Trainer, "fit", real_fit)
    resumed = []
    real_resume = Trainer.resume
    monkeypatch.setattr(Trainer, "resume", lambda self, path=None: resumed.append(self.cfg.train.out_dir)
                        or real_resume(self, path))
    assert main(["study", str(p)]) == 0
    printed = capsys.readouterr().out
    assert "rf/lognorm(0.00,1.00) seed 0: done (skipped)" in printed
    assert resumed and all("rf-uniform" in r for r in resumed)
    second = load_run_state(second_dir)
    scored = second["evals"][study_mod.eval_key(load_spec(p).variants[1].eval)]
    assert sorted(scored) == ["2", "4"]
    assert scored["4"]["settings"]["shift"] == 3.0  # the variant's own sampler setting reached the sampler
    assert scored["4"]["samples"] == 16 and scored["4"]["train_cpu_s"] > 0
    assert scored["4"]["val_loss"] is not None  # validation.every = 4

    summary = json.loads((out / "study.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["rf/lognorm(0.00,1.00)", "rf/uniform"]
    for v in summary["variants"]:
        f = v["final"]
        assert f["n_runs"] == 1 and f["samples"] == 16
        assert set(f["scores"]["seen"]) == {"1", "2"}
        assert 0.0 <= f["scores"]["seen"]["2"]["mean"] <= 1.0 and f["scores"]["seen"]["2"]["std"] is None
        assert [c["step"] for c in v["curve"]] == [2, 4]
    md = (out / "study.md").read_text()
    assert "| rf/uniform |" in md and "seen 2 steps" in md
    assert (out / "score-vs-cpu-seen-2steps.png").is_file()

    # a third run does nothing but rewrite the report
    assert main(["study", str(p), "--only", "rf/uniform"]) == 0
    assert "rf/uniform seed 0: done (skipped)" in capsys.readouterr().out


def test_changed_variant_config_is_refused(tmp_path, world, capsys):
    out = tmp_path / "out"
    p = _write_spec(tmp_path / "s", world, out, SPEC_TOML.replace("samples = 16", "samples = 8"))
    assert main(["study", str(p), "--only", "rf/uniform"]) == 0
    capsys.readouterr()
    changed = 'flow.timesteps = "uniform"\noptim.lr = 2e-3'
    p.write_text(p.read_text().replace('flow.timesteps = "uniform"', changed))
    assert main(["study", str(p), "--only", "rf/uniform"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another config (optim.lr: 0.001 -> 0.002)" in err and err.count("\n") == 1


def test_config_changes_ignore_fields_a_newer_rectiflow_added():
    """Runs stay resumable across versions: a key only one side has at its default is no change."""
    from rectiflow.eval.study import config_changes
    from rectiflow.train.config import RunConfig, config_to_dict

    new = config_to_dict(RunConfig().replace(train={"steps": 50}))
    old = config_to_dict(RunConfig())
    del old["optim"]["min_lr_ratio"]  # a field the older version did not have, at its default now
    assert config_changes(old, new) == []  # train.steps is not a change either
    new["optim"]["min_lr_ratio"] = 0.5
    default = RunConfig().optim.min_lr_ratio
    assert config_changes(old, new) == [f"optim.min_lr_ratio: {default!r} -> 0.5"]
    old["validation"]["shift"] = ""  # an older version's way of saying "no shift": the same run
    old["optim"]["no_longer_a_field"] = 1  # a field this version dropped cannot change the run
    new["optim"]["min_lr_ratio"] = default
    assert config_changes(old, new) == []


def test_cpu_minutes_budget_calibrates_once(tmp_path, world, capsys):
    """A CPU-time budget: each variant's steps = budget / its measured CPU seconds per step, measured once
    and kept, so that a resumed study trains to the same step."""
    import math

    from rectiflow.eval.study_layout import load_run_state

    out = tmp_path / "out"
    text = SPEC_TOML.replace("samples = 16", "cpu_minutes = 0.002\ncalibration_steps = 3").replace(
        "at = [0.5, 1.0]", "at = [1.0]").replace("steps = [1, 2]", "steps = [1]")
    p = _write_spec(tmp_path / "s", world, out, text)
    assert main(["study", str(p), "--only", "rf/uniform", "--dry-run"]) == 0
    assert "rf/uniform seed 0: new; calibrate, then train 0.002 training CPU minutes per run" in \
        capsys.readouterr().out
    assert main(["study", str(p), "--only", "rf/uniform"]) == 0
    state = load_run_state(out / "runs" / "rf-uniform" / "seed-0")
    per_step = state["calibration"]["cpu_s_per_step"]
    assert per_step > 0 and state["calibration"]["steps"] == 3
    assert state["steps"] == max(1, math.floor(0.002 * 60 / per_step))
    assert not (out / "runs" / "rf-uniform" / "seed-0" / "calibration").exists()  # scratch removed
    capsys.readouterr()
    assert main(["study", str(p), "--only", "rf/uniform", "--dry-run"]) == 0
    assert f"rf/uniform seed 0: done; {state['steps']} steps" in capsys.readouterr().out


def test_a_run_locked_by_a_live_process_is_skipped(tmp_path, world, capsys):
    """Two `rectiflow study` processes never work on the same run; a dead owner's lock is taken over."""
    import os

    out = tmp_path / "out"
    p = _write_spec(tmp_path / "s", world, out, SPEC_TOML.replace("samples = 16", "samples = 4"))
    lock = out / "runs" / "rf-uniform" / "seed-0" / "study-run.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getppid()))  # alive, and not this process
    assert main(["study", str(p), "--only", "rf/uniform"]) == 0
    assert "rf/uniform seed 0: another process is working on it (skipped)" in capsys.readouterr().out
    assert not (lock.parent / "train").exists() and lock.is_file()
    lock.write_text("999999999")  # no such process
    assert main(["study", str(p), "--only", "rf/uniform"]) == 0
    assert "rf/uniform seed 0: step 1:" in capsys.readouterr().out
    assert not lock.exists()

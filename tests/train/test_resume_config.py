"""--resume starts from the run's saved config; the command line changes only what it names, said once."""

import logging

from conftest import TEST_OVERRIDES, TINY_TOML
from rectiflow.cli.main import main
from rectiflow.train.checkpoint import find_latest, load_checkpoint


def _base(cache, out):
    return [*TEST_OVERRIDES, f'data.cache="{cache}"', f'train.out_dir="{out}"']


def _messages(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_resume_keeps_what_the_command_line_leaves_out(tiny_cache, tmp_path, caplog):
    out = tmp_path / "run"
    first = [*_base(tiny_cache, out), "model.preset=micro", "train.steps=2", "checkpoint.every=2",
             'validation.prompts=["a red square", "a blue field"]', "optim.lr=2e-3", "train.seed=7"]
    assert main(["train", str(TINY_TOML), *first]) == 0
    caplog.clear()
    # resume naming only where the run is and a longer schedule: the rest comes from the saved config
    with caplog.at_level(logging.INFO):
        assert main(["train", str(TINY_TOML), f'train.out_dir="{out}"', "train.steps=4", "--resume"]) == 0
    c = load_checkpoint(find_latest(out / "checkpoints"))
    assert c.step == 4
    assert c.config["validation"]["prompts"] == ["a red square", "a blue field"]
    assert (c.config["model"]["preset"], c.config["optim"]["lr"], c.config["train"]["seed"]) == \
        ("micro", 2e-3, 7)
    assert c.config["data"]["cache"] == str(tiny_cache) and c.config["data"]["batch_size"] == 4
    changes = _messages(caplog, "change(s) to the run's saved config")
    assert len(changes) == 1 and "1 change(s)" in changes[0] and "train.steps=4 (was 2)" in changes[0]
    # configs/tiny.toml disagrees with the run on keys not named: reported as kept, the run's values win
    kept = _messages(caplog, "the run keeps its values")
    assert len(kept) == 1 and "model.preset ('tiny', run: 'micro')" in kept[0]
    assert "train.steps" not in kept[0]


def test_resume_with_a_different_override_applies_and_prints_it(tiny_cache, tmp_path, caplog):
    out = tmp_path / "run"
    first = [*_base(tiny_cache, out), "model.preset=micro", "train.steps=2", "checkpoint.every=2"]
    assert main(["train", str(TINY_TOML), *first]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", str(TINY_TOML), *first[:-2], "checkpoint.every=2", "train.steps=3",
                     "optim.lr=5e-4", "data.batch_size=8", "--resume"]) == 0
    c = load_checkpoint(find_latest(out / "checkpoints"))
    assert (c.step, c.config["optim"]["lr"], c.config["data"]["batch_size"]) == (3, 5e-4, 8)
    changes = _messages(caplog, "change(s) to the run's saved config")
    assert len(changes) == 1 and "3 change(s)" in changes[0]
    assert all(s in changes[0] for s in ("optim.lr=0.0005 (was 0.001)", "data.batch_size=8 (was 4)",
                                         "train.steps=3 (was 2)"))
    assert not _messages(caplog, "the run keeps its values")


def test_resume_without_a_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["train", str(TINY_TOML), f'train.out_dir="{tmp_path}"', "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: no complete checkpoint in")
    (tmp_path / "step-1").mkdir()
    assert main(["train", str(TINY_TOML), "--resume", str(tmp_path / "step-1")]) == 2
    assert "is not a training checkpoint (no config.json)" in capsys.readouterr().err

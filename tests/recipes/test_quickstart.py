"""`rectiflow quickstart`: a non-shapes dataset (procedural icons) to a bundle and a sample grid, end to end
with a tiny budget (every trainer then runs its minimum steps); a rerun skips every stage."""

import json
import logging

import pytest
from PIL import Image

from rectiflow.cli.main import main
from rectiflow.data.icons import write_icons
from rectiflow.recipes.quickstart import AE_PROBE_STEPS, MIN_STEPS, PROBE_STEPS


@pytest.mark.slow
def test_quickstart_end_to_end_then_skips_when_done(tmp_path, capsys, caplog):
    data = write_icons(tmp_path / "icons", 40, size=32)
    run = tmp_path / "run"
    args = ["quickstart", str(data), "--out", str(run), "--size", "32", "--minutes", "0.01", "--clock", "cpu",
            "--preset", "micro", "--ae-preset", "tiny", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    state = json.loads((run / "quickstart.json").read_text())
    stages = state["stages"]
    assert all(stages[s]["done"] for s in ("check", "autoencoder", "cache", "transformer", "samples"))
    # the data check's report is kept; nothing was dropped from these distinct icons
    assert (run / "data" / "report.txt").read_text().startswith("samples found")
    assert stages["check"] == {**stages["check"], "samples": 40, "kept": 40}
    # steps from the budget: this one is tiny, so each trainer runs its minimum (plus the autoencoder probe)
    assert stages["autoencoder"]["steps"] == MIN_STEPS + AE_PROBE_STEPS
    assert stages["transformer"]["steps"] == MIN_STEPS + 1 + PROBE_STEPS
    assert stages["transformer"]["per_step_s"] > 0
    # the bundle: named after the run, guided by default (trained with caption dropout)
    bundle = run / "train" / "export" / "bundle"
    card = json.loads((bundle / "model.json").read_text())
    assert card["name"] == "run" and card["defaults"]["cfg_scale"] == 4.0
    assert card["defaults"]["width"] == 32
    # the sample grid: 8 of the dataset's own captions x 4 seeds, labelled
    captions = {json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()}
    prompts = stages["samples"]["prompts"]
    assert len(prompts) == 8 and set(prompts) <= captions
    grid = Image.open(run / "samples.png")
    assert grid.height > 8 * 128 and grid.width > 4 * 128  # 32 px samples shown at 128 px, with labels
    # the closing summary names the commands to generate from the result
    assert f'rectiflow generate "{prompts[0]}" --model {bundle}' in out
    # a rerun does nothing but print the summary again
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    skipped = [r.getMessage() for r in caplog.records if "already done, skipped" in r.getMessage()]
    assert len(skipped) == 5 and "quickstart done" in capsys.readouterr().out
    # another size into the same run directory: one line, nothing touched
    assert main([*args[:4], "--size", "64"]) == 2
    assert "holds a quickstart run made with other options" in capsys.readouterr().err


def test_quickstart_bad_input_one_line(tmp_path, capsys):
    assert main(["quickstart", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["quickstart", str(tmp_path), "--out", str(tmp_path / "r"), "--size", "40"]) == 2
    assert "use a multiple of 16" in capsys.readouterr().err
    assert main(["quickstart", str(tmp_path), "--out", str(tmp_path / "r"), "--ae-preset", "{bad"]) == 2
    assert "--ae-preset is not valid JSON" in capsys.readouterr().err

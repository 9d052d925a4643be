"""`rectiflow eval shapes` end to end on a random-weights bundle: files, report, errors."""

import json

import pytest

from rectiflow.cli.main import main

# random_bundle needs models/autoencoder.py, convert/autoencoder.py and models/text.py (other work items)
random_model = pytest.importorskip("rectiflow.sample.random_model")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from rectiflow.convert.bundle import SamplingDefaults

    root = tmp_path_factory.mktemp("bundle") / "tiny-random"
    return random_model.random_bundle(root, defaults=SamplingDefaults(steps=2, width=32, height=32),
                                      name="tiny-random")


def test_eval_shapes_cli_writes_reports_grids_and_geneval_layout(model, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "shapes", "--model", str(model), "--steps", "1,2", "--size", "32", "--limit", "1",
               "--split", "seen,heldout", "--sampler", "euler", "--cfg", "1.5", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "seen      steps= 1 overall=" in printed and "held_out  steps= 2 overall=" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["name"] == "tiny-random" and len(report["model"]["hash"]) >= 12
    s = report["settings"]
    assert s["steps"] == [1, 2] and s["seeds"] == [0, 1, 2, 3] and s["sampler"] == "euler"
    assert s["cfg_scale"] == 1.5 and s["size"] == 32
    for split, n_tasks in (("seen", 6), ("held_out", 3)):
        for n in ("1", "2"):
            summary = report["results"][split][n]
            assert summary["n_images"] == n_tasks * 4 and 0.0 <= summary["overall"] <= 1.0
            sub = out / split / f"steps{n}"
            assert (sub / "grid.png").is_file() and (sub / "report.json").is_file()
            assert (sub / "00000" / "metadata.jsonl").is_file()
            assert sorted(p.name for p in (sub / "00000" / "samples").iterdir()) == [
                "0000.png", "0001.png", "0002.png", "0003.png"]
    assert "| 2 steps |" in (out / "report.md").read_text()
    # each line names the commonest failure kind of its split and step count
    kinds = {}
    for per_kind in report["results"]["seen"]["1"]["failures"].values():
        for kind, c in per_kind.items():
            kinds[kind] = kinds.get(kind, 0) + c
    line = next(x for x in printed.splitlines() if x.startswith("seen      steps= 1"))
    assert kinds  # a random model fails (almost) everything
    top = max(kinds.values())
    assert any(f"most failures: {k} ({c})" in line for k, c in kinds.items() if c == top), line


def test_eval_shapes_cli_errors(model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "shapes", "--model", str(model), "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["eval", "shapes", "--model", str(model), "--split", "train", "--out", str(tmp_path)])
    capsys.readouterr()
    rc = main(["eval", "shapes", "--model", str(model), "--size", "30", "--limit", "1", "--steps", "1",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 2 and "multiple of 16" in capsys.readouterr().err


def test_eval_shapes_cli_shift(model, tmp_path, capsys):
    """--shift reaches the sampler's step grid (the samples change) and the report records it."""
    outs = {}
    for shift in ("none", "3"):
        out = tmp_path / shift
        rc = main(["eval", "shapes", "--model", str(model), "--steps", "2", "--size", "32", "--limit", "1",
                   "--split", "seen", "--shift", shift, "--out", str(out), "--no-progress"])
        assert rc == 0
        outs[shift] = out
    assert json.loads((outs["none"] / "report.json").read_text())["settings"]["shift"] is None
    assert json.loads((outs["3"] / "report.json").read_text())["settings"]["shift"] == 3.0
    first = "seen/steps2/00000/samples/0000.png"
    assert (outs["none"] / first).read_bytes() != (outs["3"] / first).read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", "shapes", "--model", str(model), "--shift", "-1", "--out", str(tmp_path / "bad")])
    assert "the shift must be > 0" in capsys.readouterr().err

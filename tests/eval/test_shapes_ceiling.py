"""`rectiflow eval ceiling`: renders and their autoencoder round trips scored by the benchmark's scorer."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rectiflow.cli.main import main
from rectiflow.convert.bundle import default_bundle_path
from rectiflow.errors import RectiflowError
from rectiflow.eval.shapes import TASKS
from rectiflow.eval.shapes_ceiling import ROWS, evaluate_ceiling, round_trip


class PixelAutoencoder(torch.nn.Module):
    """An 'autoencoder' whose latents are the pixels themselves (identity), or whose decoder paints
    everything white (blank): the two ends of what a round trip can do to a score."""

    def __init__(self, blank: bool = False):
        super().__init__()
        self.blank = blank
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.params = SimpleNamespace(ch_mult=(1, 2))  # factor 2

    def encode(self, x):
        return x

    def decode(self, z):
        return torch.ones_like(z) if self.blank else z


def test_round_trip_of_identity_is_exact():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    out = round_trip(PixelAutoencoder(), images)
    assert out.dtype == np.uint8 and np.array_equal(out, images)  # the uint8 <-> [-1, 1] maps invert exactly


def test_identity_keeps_the_renders_score_and_blank_loses_it(tmp_path):
    ident = evaluate_ceiling(PixelAutoencoder(), limit=2, seeds=[0, 1], progress=False, out_dir=tmp_path)
    for rows in ident["results"].values():
        assert rows["renders"]["overall"] >= 0.99
        assert rows["autoencoder"]["per_task"] == rows["renders"]["per_task"]  # identical pixels, scores
    seen = ident["results"]["seen"]["renders"]
    assert list(seen["per_task"]) == list(TASKS) and seen["n_images"] == 6 * 2 * 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"]["held_out"]["renders"]["n_images"] == 3 * 2 * 2
    assert (tmp_path / "seen" / "grid.png").is_file() and (tmp_path / "held_out" / "grid.png").is_file()
    assert "| renders |" in (tmp_path / "report.md").read_text()

    blank = evaluate_ceiling(PixelAutoencoder(blank=True), limit=2, seeds=[0], splits=["seen"],
                             progress=False)
    rows = blank["results"]["seen"]
    assert rows["renders"]["overall"] >= 0.99 and rows["autoencoder"]["overall"] == 0.0
    assert rows["autoencoder"]["failures"]["single_object"] == {"nothing detected": 2}


def test_reports_are_deterministic():
    a = evaluate_ceiling(PixelAutoencoder(), limit=1, seeds=[0, 1], splits=["seen"], progress=False)
    b = evaluate_ceiling(PixelAutoencoder(), limit=1, seeds=[0, 1], splits=["seen"], progress=False)
    assert a == b


def test_bad_arguments_get_one_line():
    with pytest.raises(RectiflowError, match="seeds must not be empty"):
        evaluate_ceiling(PixelAutoencoder(), seeds=[], progress=False)
    with pytest.raises(RectiflowError, match="not divisible by the autoencoder's factor 2"):
        evaluate_ceiling(PixelAutoencoder(), size=63, progress=False)
    with pytest.raises(RectiflowError, match="limit must be a positive integer"):
        evaluate_ceiling(PixelAutoencoder(), limit=0, progress=False)


def test_cli_with_the_bundled_autoencoder(tmp_path, capsys):
    if not (default_bundle_path() / "ae.safetensors").is_file():
        pytest.skip("the bundled model is not installed")
    rc = main(["eval", "ceiling", "--limit", "2", "--seeds", "1", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "seen      renders=" in out and "held_out  renders=" in out
    report = json.loads((tmp_path / "report.json").read_text())
    for rows in report["results"].values():
        assert set(rows) == set(ROWS)
        # a trained autoencoder keeps most of the score, and never adds to it here
        assert 0.5 <= rows["autoencoder"]["overall"] <= rows["renders"]["overall"] + 1e-9


def test_cli_refuses_a_missing_autoencoder(tmp_path, capsys):
    rc = main(["eval", "ceiling", "--autoencoder", str(tmp_path / "nope.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1

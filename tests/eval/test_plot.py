import numpy as np
import pytest
from PIL import Image

from rectiflow.eval.plot import PALETTE, line_plot


def test_line_plot_draws_each_series(tmp_path):
    p = line_plot({"a": [(0, 1.0), (10, 0.1)], "b": [(0, 0.5), (5, float("nan")), (10, 0.2)]},
                  tmp_path / "x.png", title="t", xlabel="step", ylabel="loss", logy=True, size=(400, 300))
    arr = np.asarray(Image.open(p).convert("RGB"))
    assert arr.shape == (300, 400, 3)
    for color in PALETTE[:2]:  # both series' colours are on the canvas
        assert (np.abs(arr.astype(int) - color).sum(-1) == 0).sum() > 20


def test_line_plot_needs_points(tmp_path):
    with pytest.raises(ValueError, match="no finite points"):
        line_plot({"a": [(0, float("inf"))]}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        line_plot({"a": [(0, -1.0)]}, tmp_path / "x.png", logy=True)

"""The heart shape: its geometry, its rendering in the world's style, and the scorer telling it apart."""

import numpy as np
import pytest

from rectiflow.data.shapes import COLORS, SHAPES, Obj, render_objects
from rectiflow.data.shapes_geometry import ideal_area, ideal_mask
from rectiflow.errors import RectiflowError
from rectiflow.eval.heart import HEART_SHAPES, heart_prompts, prompt_color, score_heart
from rectiflow.eval.shapes_detect import detect


def test_heart_geometry():
    m = ideal_mask("heart", 512)
    assert abs(m.mean() - ideal_area("heart")) < 2e-3
    cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
    assert cols[0] <= 1 and cols[-1] >= 510  # the width fills the box
    assert not m[20, 256] and m[20, 128] and m[20, 384]  # the notch between the two lobes at the top
    assert m[rows[-1], 256] and not m[rows[-1], 200]  # one point at the bottom
    assert np.array_equal(m, m[:, ::-1])  # symmetric


@pytest.mark.parametrize("color", list(COLORS))
def test_rendered_hearts_are_scored_hearts_and_other_shapes_are_not(color):
    img = render_objects([Obj("heart", color, 30.0, 34.0, 20.0)], 64)
    assert score_heart(f"a photo of a {color} heart", img) == (True, f"{color} heart")
    assert score_heart("a photo of a heart", img)[0]
    other = "red" if color != "red" else "blue"
    assert not score_heart(f"a photo of a {other} heart", img)[0]
    assert [d.shape for d in detect(img)] == ["circle"]  # the world's own detector has no heart
    for shape in SHAPES:
        img = render_objects([Obj(shape, color, 30.0, 34.0, 20.0)], 64)
        assert [d.shape for d in detect(img, HEART_SHAPES)] == [shape]  # adding the heart steals nothing


def test_prompts():
    assert heart_prompts()[0] == "a photo of a heart" and len(heart_prompts()) == 1 + len(COLORS)
    assert prompt_color("a photo of a pink heart") == "pink" and prompt_color("a photo of a heart") is None
    with pytest.raises(RectiflowError, match="not a heart prompt"):
        prompt_color("a photo of a red circle")

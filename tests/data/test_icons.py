"""The procedural icon dataset (`rectiflow data icons`): deterministic, captioned, readable as a source."""

import json

import numpy as np
import pytest

from rectiflow.cli.main import main
from rectiflow.data.icons import BACKGROUNDS, COLOURS, OBJECTS, icon_item, render_icon, write_icons
from rectiflow.data.sources import open_source
from rectiflow.errors import ConfigError


def test_icon_colours_and_captions():
    img = np.asarray(render_icon("heart", "red", "white", 32))
    assert img.shape == (32, 32, 3)
    assert tuple(img[0, 0]) == BACKGROUNDS["white"]  # corner: background
    assert tuple(img[14, 16]) == COLOURS["red"]  # centre of the heart: the icon colour
    a, cap = icon_item(3, seed=1, size=32)
    b, _ = icon_item(3, seed=1, size=32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    colour, obj = cap.split()[1], cap.split()[2]
    assert cap.startswith("a ") and colour in COLOURS and obj in OBJECTS and cap.endswith(" background")
    with pytest.raises(ConfigError, match="unknown icon"):
        render_icon("dragon", "red", "white")


def test_write_icons_and_cli(tmp_path, capsys):
    out = write_icons(tmp_path / "icons", 6, size=32)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"icon-{i:05d}.png" for i in range(6)]
    source = open_source(out)
    assert len(source) == 6 and source.load_image(0).size == (32, 32)
    assert source[0].captions["text"] == (icon_item(0, 0, 32)[1],)
    assert main(["data", "icons", "--out", str(out), "--n", "2"]) == 2
    assert "already holds a metadata.jsonl" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="positive"):
        write_icons(tmp_path / "x", 0)

"""LoRA trigger words put into captions (`rectiflow cache --trigger`)."""

import numpy as np

from rectiflow.data.captions import add_trigger
from rectiflow.data.sources import ArraySource


def test_add_trigger_rules():
    assert add_trigger("a photo of a heart", "sks") == "sks, a photo of a heart"
    assert add_trigger("a photo of [trigger] heart", "sks") == "a photo of sks heart"
    assert add_trigger("an sks heart", "sks") == "an sks heart"  # already there
    assert add_trigger("a heart", "  ") == "a heart"


def test_source_captions_get_the_trigger():
    src = ArraySource(2, lambda i: (np.zeros((8, 8, 3), np.uint8), {"text": [f"a photo {i}"]}, f"s{i}"))
    src.add_trigger("sks")
    assert [s.captions["text"] for s in src.samples] == [("sks, a photo 0",), ("sks, a photo 1",)]

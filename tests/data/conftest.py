"""Fixtures for the data tests: tiny images written with PIL, in memory or on disk."""

import io

import numpy as np
import pytest
from PIL import Image


def _image(w=40, h=32, seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes():
    """image_bytes(w, h, seed, fmt) -> encoded random RGB image."""
    return _image


@pytest.fixture
def write_image():
    """write_image(path, w, h, seed) writes a random PNG/JPEG (by suffix) and returns the path."""

    def write(path, w=40, h=32, seed=0):
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image(w, h, seed, fmt))
        return path

    return write

"""build_cache with image-decoding threads writes exactly what the single-threaded build writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rectiflow.data.cache import _map, build_cache
from rectiflow.data.sources import open_source
from rectiflow.data.transforms import Buckets
from rectiflow.errors import FormatError


class MeanPoolAE(torch.nn.Module):
    """A deterministic stand-in encoder: 8x8 average pooling to 16 channels (identity lies in the weights)."""

    def __init__(self):
        super().__init__()
        self.params = {"kind": "mean-pool-test"}
        self.proj = torch.nn.Parameter(torch.linspace(-1, 1, 48).reshape(16, 3), requires_grad=False)

    @torch.no_grad()
    def encode(self, x):
        return torch.einsum("oc,bchw->bohw", self.proj, torch.nn.functional.avg_pool2d(x, 8))


class WordText:
    def encode(self, prompts):
        txt = torch.tensor([[float(len(p)), float(p.count("a"))] for p in prompts])[:, None, :]  # [b, 1, 2]
        return txt.repeat(1, 3, 1), txt[:, 0]

    def spec(self):
        return {"kind": "word-test"}

    def fingerprint(self):
        return "word-test-v1"


def _folder(root, write_image, n=23):
    sizes = [(48 + 8 * (i % 4), 40 + 8 * (i % 3)) for i in range(n)]
    for i, (w, h) in enumerate(sizes):
        write_image(root / f"{i:02d}.png", w, h, seed=i)
        (root / f"{i:02d}.txt").write_text(f"a caption {i % 5}")
    (root / "07.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable: skipped either way
    return open_source(root)


@pytest.mark.parametrize("buckets", [False, True])
def test_threads_do_not_change_the_cache(tmp_path, write_image, buckets):
    src = _folder(tmp_path / "data", write_image)
    kw = {"buckets": Buckets.for_size(48)} if buckets else {"size": 32}
    outs = [build_cache(src, MeanPoolAE(), WordText(), tmp_path / f"c{w}", batch_size=3, shard_size=5,
                        workers=w, **kw) for w in (0, 3)]
    a, b = (json.loads((o / "manifest.json").read_text()) for o in outs)
    assert a == b and "07" not in a["ids"] and len(a["ids"]) == 22
    for shard in a["shards"] + a["text_shards"]:
        x, y = (load_file(str(o / shard["file"])) for o in outs)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_threaded_unreadable_image_raises_with_its_name(tmp_path, write_image):
    src = _folder(tmp_path / "data", write_image, n=9)
    with pytest.raises(FormatError, match="07.png: unreadable image"):
        build_cache(src, MeanPoolAE(), WordText(), tmp_path / "c", size=32, on_error="raise", workers=2)


def test_map_keeps_order_and_bounds_lookahead():
    started = []

    def f(i):
        started.append(i)
        return i * i

    it = _map(f, range(50), workers=2, ahead=4)
    assert next(it) == 0
    assert max(started) < 8  # at most `ahead` submitted before the first result was consumed (+ slack)
    assert [0, *it] == [i * i for i in range(50)]
    assert list(_map(f, range(5), workers=0)) == [0, 1, 4, 9, 16]

"""build_cache: the manifest it keeps rewriting, and resuming an interrupted build."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rectiflow.data.cache_writer import _ManifestWriter, build_cache
from rectiflow.data.sources import open_source
from rectiflow.errors import RectiflowError


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


def test_manifest_writer_writes_the_whole_manifest(tmp_path):
    m = {"format": "x", "ids": ["a", "b"], "captions": ["", "c \"q\""], "shards": [{"file": "f", "n": 2}]}
    w = _ManifestWriter(tmp_path, m)
    for done, status in ((set(), "in_progress"), ({"f", "e"}, "complete")):
        w.write(done, status)
        assert json.loads((tmp_path / "manifest.json").read_text()) == {**m, "done": sorted(done),
                                                                          "status": status}


def test_interrupted_cache_resumes_only_missing_shards(tmp_path, write_image):
    src = _folder(tmp_path / "data", write_image, n=12)
    out = build_cache(src, MeanPoolAE(), WordText(), tmp_path / "c", size=32, batch_size=4, shard_size=4)
    m = json.loads((out / "manifest.json").read_text())
    files = [s["file"] for s in m["shards"] + m["text_shards"]]
    assert m["status"] == "complete" and m["done"] == sorted(files) and m["num_samples"] == 11
    before = {f: load_file(str(out / f)) for f in files}
    # as if killed before the last latent shard was recorded
    last = m["shards"][-1]["file"]
    (out / last).unlink()
    m.update(done=sorted(set(files) - {last}), status="in_progress")
    (out / "manifest.json").write_text(json.dumps(m))
    stamps = {f: (out / f).stat().st_mtime_ns for f in files if f != last}
    build_cache(src, MeanPoolAE(), WordText(), out, size=32, batch_size=4, shard_size=4)
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps  # nothing else redone
    again = json.loads((out / "manifest.json").read_text())
    assert again["status"] == "complete" and again["done"] == sorted(files)
    assert {k: v for k, v in again.items() if k not in ("done", "status")} == \
        {k: v for k, v in m.items() if k not in ("done", "status")}
    assert torch.equal(load_file(str(out / last))["latents"], before[last]["latents"])
    with pytest.raises(RectiflowError, match="other settings"):
        build_cache(src, MeanPoolAE(), WordText(), out, size=48, batch_size=4, shard_size=4)


def test_truncation_is_said_once_with_the_total(tmp_path, write_image, caplog):
    """The encoder warns per call; `cache` encodes many batches and says it once, with the total (it used to
    repeat the encoder's warning once per batch)."""
    import logging

    from rectiflow.models.text import TrainableTextConfig, TrainableTextEncoder

    root = tmp_path / "d"
    for i in range(7):
        write_image(root / f"{i}.png", 32, 32, seed=i)
        (root / f"{i}.txt").write_text(f"caption number {i} is far too long")  # 32 bytes + <bos>, <eos> > 16
    encoder = TrainableTextEncoder(TrainableTextConfig(dim=24, depth=1, heads=2, max_length=16)).eval()
    with caplog.at_level(logging.WARNING):
        encoder.encode(["x" * 40])
    assert len(caplog.records) == 1 and "truncated" in caplog.records[0].getMessage()  # the encoder alone
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_cache(open_source(root), MeanPoolAE(), encoder, tmp_path / "c", size=32, batch_size=2)
    said = [r.getMessage() for r in caplog.records if "truncat" in r.getMessage()]
    assert said == ["7 of 8 unique captions are longer than the text encoder's 16 tokens and are truncated, "
                    "dropping 126 tokens in all (longest needs 34); shorten them"]


def test_written_files_get_the_default_mode(tmp_path, write_image):
    """Cache shards, weight files and bundle folders come from private temporaries (0600 / 0700); in place
    they have the mode open() gives (the manifest's): 0644 / 0755 under umask 022."""
    import os
    import stat

    from rectiflow.io.atomic import atomic_dir
    from rectiflow.io.safetensors_io import save_safetensors

    old = os.umask(0o022)
    try:
        source = _folder(tmp_path / "d", write_image, n=6)
        cache = build_cache(source, MeanPoolAE(), WordText(), tmp_path / "c",
                            size=32, shard_size=4)
        weights = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        with atomic_dir(tmp_path / "bundle") as d:
            (d / "x.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in cache.iterdir()}
    assert modes["manifest.json"] == 0o644 and len(modes) >= 3
    assert all(m == 0o644 for m in modes.values()), modes
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o755


def test_no_progress_silences_every_bar(tmp_path, write_image, capsys):
    """progress=False (the CLI's --no-progress) silences the planning bar too (shown from 1,000 samples)."""
    from rectiflow.data.cache_writer import plan_cache
    from rectiflow.data.transforms import CenterCrop

    root = tmp_path / "many"
    root.mkdir()
    write_image(root / "0.png", 16, 16, seed=0)
    for i in range(1000):  # one picture, 1,000 samples: planning reads headers only
        (root / f"{i:04d}.png").write_bytes((root / "0.png").read_bytes())
        (root / f"{i:04d}.txt").write_text("x")
    (root / "0.png").unlink()
    source = open_source(root)
    plan_cache(source, CenterCrop(16), 512, progress=False)
    assert "planning" not in capsys.readouterr().err
    plan_cache(source, CenterCrop(16), 512)
    assert "planning" in capsys.readouterr().err

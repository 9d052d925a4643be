"""`rectiflow cache --text-from`: a second cache of the same captions reuses the first one's embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import N_SAMPLES, HashTextEncoder, PoolAutoEncoder, _item
from rectiflow.data.cache_writer import CachedText, build_cache
from rectiflow.data.sources import ArraySource
from rectiflow.errors import FormatError, RectiflowError


def _text_rows(cache) -> tuple[torch.Tensor, torch.Tensor]:
    m = json.loads((cache / "manifest.json").read_text())
    shards = [load_file(str(cache / s["file"])) for s in m["text_shards"]]
    return torch.cat([s["txt"] for s in shards]), torch.cat([s["vec"] for s in shards])


def test_recache_at_another_size_reuses_the_text_table(tiny_cache, tmp_path):
    src = ArraySource(N_SAMPLES, _item, name="squares")
    out = build_cache(src, PoolAutoEncoder(), CachedText(tiny_cache), tmp_path / "c16", size=16, batch_size=8,
                      shard_size=16)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (tiny_cache, out))
    assert b["text_encoder"] == a["text_encoder"]  # the encoder that really made the embeddings
    assert b["captions"] == a["captions"] and b["caption_indices"] == a["caption_indices"]
    for x, y in zip(_text_rows(tiny_cache), _text_rows(out)):
        assert torch.equal(x, y)
    assert load_file(str(out / "latents-00000.safetensors"))["latents"].shape[-2:] == (2, 2)  # 16 px / 8
    # and the rows are what the encoder itself gives
    txt, vec = HashTextEncoder().encode(a["captions"][1:3])
    got_txt, got_vec = CachedText(tiny_cache).encode(a["captions"][1:3])
    assert torch.equal(got_txt, txt) and torch.equal(got_vec, vec)


def test_half_precision_tables_come_back_as_float32(tiny_cache, tmp_path):
    copy = tmp_path / "half"
    copy.mkdir()
    m = json.loads((tiny_cache / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({k: m[k] for k in ("format", "version", "text_encoder",
                                                                      "captions", "text_shards")}))
    for s in m["text_shards"]:
        t = load_file(str(tiny_cache / s["file"]))
        save_file({k: v.half() for k, v in t.items()}, str(copy / s["file"]))
    txt, vec = CachedText(copy).encode(m["captions"][:4])
    ref_txt, ref_vec = CachedText(tiny_cache).encode(m["captions"][:4])
    assert txt.dtype == vec.dtype == torch.float32
    torch.testing.assert_close(txt, ref_txt, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vec, ref_vec, rtol=1e-3, atol=1e-3)


def test_unknown_captions_and_missing_files_are_clear_errors(tiny_cache, tmp_path):
    with pytest.raises(RectiflowError, match="'a purple square'"):
        CachedText(tiny_cache).encode(["a purple square"])
    with pytest.raises(RectiflowError, match="manifest.json"):
        CachedText(tmp_path)


def test_broken_text_tables_are_clear_errors(tiny_cache, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else", "captions": []}))
    with pytest.raises(FormatError, match="missing: text_encoder, text_shards"):
        CachedText(bad)
    m = json.loads((tiny_cache / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(m))  # a real manifest, but no shard files beside it
    with pytest.raises(RectiflowError, match="text shard text-00000.safetensors is missing"):
        CachedText(bad)


def test_cli_text_from_error_is_one_line(tmp_path, capsys):
    from PIL import Image

    from rectiflow.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "a.png")
    (data / "a.txt").write_text("a red square")
    rc = main(["cache", "--data", str(data), "--autoencoder", "tiny", "--text-from", str(tmp_path / "none"),
               "--size", "32", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--text-from" in err and "manifest.json" in err

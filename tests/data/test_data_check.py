"""`rectiflow data check`: every problem class found in a prepared fixture; the manifest excludes them."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from rectiflow.cli.main import main
from rectiflow.data.check import (
    _dct_matrix,
    check_dataset,
    count_words,
    duplicate_clusters,
    hamming,
    phash,
)
from rectiflow.data.sources import ManifestSource, open_source
from rectiflow.errors import ConfigError


def _smooth(seed, w=64, h=64):
    """A smooth random image (low-frequency content, like a photo) as a PIL image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    root.mkdir()
    rows = []
    for i in range(4):
        _smooth(i).save(root / f"ok{i}.png")
        rows.append({"file_name": f"ok{i}.png", "text": f"a good caption {i}"})
    # a near-duplicate of ok0: half size, JPEG-recompressed
    buf = io.BytesIO()
    _smooth(0).resize((48, 48), Image.BICUBIC).save(buf, format="JPEG", quality=75)
    (root / "dup.jpg").write_bytes(buf.getvalue())
    rows.append({"file_name": "dup.jpg", "text": "the same picture again"})
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    rows.append({"file_name": "corrupt.png", "text": "broken"})
    _smooth(9, 16, 16).save(root / "tiny.png")
    rows.append({"file_name": "tiny.png", "text": "too small"})
    _smooth(10).save(root / "long.png")
    rows.append({"file_name": "long.png", "text": " ".join(["word"] * 40)})
    _smooth(11).save(root / "nocap.png")  # no metadata row
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_phash_matches_scipy_dct_and_is_robust():
    from scipy.fft import dct

    grey = np.random.default_rng(0).random((32, 32))
    ours = _dct_matrix(32) @ grey @ _dct_matrix(32).T
    ref = dct(dct(grey, axis=0), axis=1) / 4  # scipy's unnormalised DCT-II is 2x ours per axis
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    a = _smooth(0)
    buf = io.BytesIO()
    a.resize((32, 32)).save(buf, format="JPEG", quality=75)
    assert hamming(phash(a), phash(Image.open(buf))) <= 4
    others = [hamming(phash(a), phash(_smooth(s))) for s in range(1, 20)]
    assert min(others) > 12 and 24 < np.mean(others) < 40


def test_duplicate_clusters_equal_brute_force():
    rng = np.random.default_rng(1)
    base = [int(x) for x in rng.integers(0, 2**63, 30)]
    hashes = {}
    for i, h in enumerate(base):  # each base hash plus 0-2 copies with a few flipped bits
        hashes[3 * i] = h
        for c in range(int(rng.integers(0, 3))):
            flips = rng.choice(64, size=int(rng.integers(0, 7)), replace=False)
            hashes[3 * i + 1 + c] = h ^ sum(1 << int(f) for f in flips)
    for t in (0, 3, 6):
        keys = sorted(hashes)
        parent = {k: k for k in keys}

        def find(k, parent=parent):
            while parent[k] != k:
                k = parent[k]
            return k

        for a in keys:
            for b in keys:
                if a < b and hamming(hashes[a], hashes[b]) <= t:
                    parent[max(find(a), find(b))] = min(find(a), find(b))
        brute = {}
        for k in keys:
            brute.setdefault(find(k), []).append(k)
        expected = sorted(sorted(c) for c in brute.values() if len(c) > 1)
        assert sorted(duplicate_clusters(hashes, t)) == expected
    with pytest.raises(ConfigError, match="Hamming"):
        duplicate_clusters(hashes, 64)


def test_check_finds_each_problem(messy, tmp_path):
    source = open_source(messy)
    report = check_dataset(source, size=32, max_tokens=20, dedup=True, progress=False)
    by_kind = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p.location.rsplit("/", 1)[-1])
    assert by_kind == {"missing_caption": ["nocap.png"], "unreadable": ["corrupt.png"],
                       "too_small": ["tiny.png"], "caption_too_long": ["long.png"], "duplicate": ["dup.jpg"]}
    assert "ok0.png" in next(p.detail for p in report.problems if p.kind == "duplicate")
    assert [source[i].id for i in report.kept] == ["ok0", "ok1", "ok2", "ok3"]
    table = report.table()
    assert "kept" in table and "duplicate" in table and "corrupt.png" in table
    man = report.write_manifest(tmp_path / "out" / "kept.jsonl")
    kept = ManifestSource(man)
    assert [s.id for s in kept] == ["ok0", "ok1", "ok2", "ok3"]
    assert kept.load_image(0).size == (64, 64)
    # without the options only listing and decoding problems remain
    plain = check_dataset(open_source(messy), progress=False)
    assert sorted(plain.counts()) == ["missing_caption", "unreadable"]


def test_token_counting():
    assert count_words("a b c") == 4  # ceil(3 * 4/3)
    source_caps = {"caption": ("one two three four",)}
    from rectiflow.data.sources import ArraySource

    src = ArraySource(1, lambda i: (np.zeros((16, 16, 3), np.uint8), source_caps, "x"))
    words = lambda s: len(s.split())  # noqa: E731
    assert not check_dataset(src, max_tokens=4, count_tokens=words, progress=False).problems
    assert check_dataset(src, max_tokens=3, count_tokens=words, progress=False).problems
    with pytest.raises(ConfigError, match="max_tokens"):
        check_dataset(src, max_tokens=0)


def test_cli_data_check(messy, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    rc = main(["data", "check", str(messy), "--size", "32", "--max-tokens", "20", "--dedup",
               "--write-manifest", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "unreadable" in text and "approximated" in text
    assert len(out.read_text().splitlines()) == 4
    assert main(["data", "check", str(messy), "--strict"]) == 1
    assert main(["data", "check", str(out), "--strict"]) == 0  # the manifest is clean
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err

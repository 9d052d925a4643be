"""`rectiflow data check`: every problem class found in a prepared fixture; the manifest excludes them."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from rectiflow.cli.main import main
from rectiflow.data.check import (
    DEFAULT_COLOUR,
    DEFAULT_HAMMING,
    Fingerprint,
    _dct_matrix,
    check_dataset,
    colour_distance,
    count_words,
    duplicate_groups,
    fingerprint,
    hamming,
    phash,
)
from rectiflow.data.icons import COLOURS, render_icon
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


def _jpeg_bytes(img, scale):
    """A resized copy recompressed as JPEG q=75."""
    buf = io.BytesIO()
    img.resize((int(img.width * scale),) * 2, Image.LANCZOS).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _jpeg_copy(img, scale):
    return Image.open(io.BytesIO(_jpeg_bytes(img, scale))).convert("RGB")


def test_dedup_keeps_colour_variants_and_finds_copies(tmp_path):
    """The issue's case: one icon in nine colours (distinct samples: pHash alone, which is grey, sees them
    as identical) plus a half-size JPEG copy of the blue one and an exact copy of the red one."""
    root = tmp_path / "icons"
    root.mkdir()
    rows = []
    for c in COLOURS:
        render_icon("heart", c, "white", 64).save(root / f"{c}.png")
        rows.append({"file_name": f"{c}.png", "text": f"a {c} heart"})
    (root / "blue-small.jpg").write_bytes(_jpeg_bytes(render_icon("heart", "blue", "white", 64), 0.5))
    render_icon("heart", "red", "white", 64).save(root / "red-again.png")
    rows += [{"file_name": "blue-small.jpg", "text": "a blue heart"}, {"file_name": "red-again.png",
                                                                       "text": "a red heart"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    grey = [phash(render_icon("heart", c, "white", 64)) for c in COLOURS]
    assert max(hamming(grey[0], h) for h in grey) <= DEFAULT_HAMMING  # what fooled the old dedup
    report = check_dataset(open_source(root), dedup=True, progress=False)
    dups = {p.location.rsplit("/", 1)[-1]: p.detail for p in report.problems if p.kind == "duplicate"}
    assert sorted(dups) == ["blue-small.jpg", "red-again.png"]
    assert "blue.png, which is kept (the largest image of the group)" in dups["blue-small.jpg"]
    assert "red.png, which is kept (listed first among images of the same size)" in dups["red-again.png"]
    assert len(report.kept) == len(COLOURS)
    assert report.large_dedup_warning() is not None  # 2 of 11 removed: > 5%, said loudly
    assert "keep " in report.duplicates_text() and "blue-small.jpg" in report.duplicates_text()


def test_dedup_never_chains_past_the_threshold():
    """a - b - c with a-b and b-c within the threshold but a-c beyond it: single linkage (the old union-find)
    dropped both b and c as copies of a; now c is compared with the kept image a and stays."""
    flat = np.full((4, 4, 3), 128.0)
    a = 0
    b = a ^ 0b111  # 3 bits from a
    c = b ^ (0b111 << 8)  # 3 bits from b, 6 from a
    prints = {0: Fingerprint(a, flat, 64), 1: Fingerprint(b, flat, 64), 2: Fingerprint(c, flat, 64)}
    groups = duplicate_groups(prints, threshold=4)
    assert [(g.kept, [j for j, _, _ in g.removed]) for g in groups] == [(0, [1])]
    # colour alone separates: same hash, colour 20 apart (> the default 16)
    far = {0: Fingerprint(a, flat, 64), 1: Fingerprint(a, flat + 20 / np.sqrt(3), 64)}
    assert colour_distance(far[0].colour, far[1].colour) > DEFAULT_COLOUR
    assert duplicate_groups(far) == []


def test_dedup_groups_hold_the_leader_property():
    """Random hashes with noisy copies: every removed image is within both thresholds of its group's kept
    image, and no two kept images are within both thresholds of each other (nothing left to merge)."""
    rng = np.random.default_rng(1)
    prints, k = {}, 0
    for _ in range(30):
        h = int(rng.integers(0, 2**63))
        col = rng.uniform(0, 255, (4, 4, 3))
        for _ in range(int(rng.integers(1, 4))):
            flips = rng.choice(64, size=int(rng.integers(0, 7)), replace=False)
            prints[k] = Fingerprint(h ^ sum(1 << int(f) for f in flips),
                                    np.clip(col + rng.normal(0, 2, col.shape), 0, 255),
                                    int(rng.choice([32 * 32, 64 * 64])))
            k += 1

    def near(i, j, t):
        return (hamming(prints[i].phash, prints[j].phash) <= t
                and colour_distance(prints[i].colour, prints[j].colour) <= DEFAULT_COLOUR)

    for t in (0, 3, 6):
        groups = duplicate_groups(prints, t)
        removed = {j for g in groups for j, _, _ in g.removed}
        assert removed or t == 0, "the fixture should hold copies"
        for g in groups:
            for j, d, c in g.removed:
                assert near(g.kept, j, t) and d == hamming(prints[g.kept].phash, prints[j].phash)
                assert c == colour_distance(prints[g.kept].colour, prints[j].colour)
                assert prints[g.kept].pixels >= prints[j].pixels
        kept = [i for i in prints if i not in removed]
        assert not any(near(i, j, t) for i in kept for j in kept if i < j)
    with pytest.raises(ConfigError, match="Hamming"):
        duplicate_groups(prints, 64)


def test_fingerprint_of_a_copy_is_close():
    img = render_icon("fish", "orange", "cream", 64)
    a, b = fingerprint(img), fingerprint(_jpeg_copy(img, 0.5))
    assert hamming(a.phash, b.phash) <= DEFAULT_HAMMING
    assert colour_distance(a.colour, b.colour) <= DEFAULT_COLOUR
    assert a.pixels == 64 * 64 and b.pixels == 32 * 32


def test_check_finds_each_problem(messy, tmp_path):
    source = open_source(messy)
    report = check_dataset(source, size=32, max_tokens=20, dedup=True, progress=False)
    by_kind = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p.location.rsplit("/", 1)[-1])
    assert by_kind == {"missing_caption": ["nocap.png"], "unreadable": ["corrupt.png"],
                       "too_small": ["tiny.png"], "caption_too_long": ["long.png"], "duplicate": ["dup.jpg"]}
    assert "ok0.png, which is kept (the largest image" in next(p.detail for p in report.problems
                                                               if p.kind == "duplicate")
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
    report = tmp_path / "report.txt"
    rc = main(["data", "check", str(messy), "--size", "32", "--max-tokens", "20", "--dedup",
               "--write-manifest", str(out), "--report", str(report)])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0 and "unreadable" in text and "approximated" in text
    assert len(out.read_text().splitlines()) == 4
    # over-long captions come with the fix; the duplicate group says what is kept and why
    assert "fix: the longest caption needs about 54 tokens; with MiniLM cache with --text-encoder minilm:N" \
        in text
    assert "keep " in text and "ok0.png (the largest image of the group); remove " in text
    # 1 of 8 samples removed by dedup: above the 5% that is announced loudly (on stderr)
    assert "WARNING: --dedup removes 1 of 8 samples (12.5%" in captured.err
    full = report.read_text()
    assert "duplicate groups:" in full and "corrupt.png: unreadable" in full
    assert main(["data", "check", str(messy), "--strict"]) == 1
    assert main(["data", "check", str(out), "--strict"]) == 0  # the manifest is clean
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_long_caption_hint_names_the_minilm_length():
    from rectiflow.data.check import long_caption_hint
    from rectiflow.data.sources import ArraySource

    src = ArraySource(1, lambda i: (np.zeros((16, 16, 3), np.uint8), {"text": ("w " * 30,)}, "x"))
    words = lambda s: len(s.split()) + 2  # noqa: E731  ([CLS] and [SEP], like MiniLM's count)
    report = check_dataset(src, max_tokens=16, count_tokens=words, progress=False)
    assert report.longest_caption == 32
    assert "--text-encoder minilm:32" in long_caption_hint(report, "minilm")
    assert "shorten the captions" in long_caption_hint(report, "trainable")
    assert long_caption_hint(check_dataset(src, progress=False), "minilm") is None

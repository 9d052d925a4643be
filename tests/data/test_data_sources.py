"""Sources, captions, transforms, datasets and samplers on tiny fixtures written in the test."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from rectiflow.data.captions import CaptionPolicy, class_caption, sample_rng
from rectiflow.data.datasets import BucketBatchSampler, ImageCaptionDataset, ResumableSampler
from rectiflow.data.sources import (
    ClassFolderSource,
    ImageFolderSource,
    ManifestSource,
    TextCaptionSource,
    WebDatasetSource,
    open_source,
    shapes_source,
)
from rectiflow.data.transforms import Buckets, CenterCrop, make_buckets, resize_center_crop, to_tensor
from rectiflow.errors import ConfigError, FormatError

# ---- sources ---------------------------------------------------------------------------------------------


def test_imagefolder_jsonl_several_columns(tmp_path, write_image):
    write_image(tmp_path / "a.png", seed=1)
    write_image(tmp_path / "sub" / "b.png", seed=2)
    rows = [{"file_name": "a.png", "original": "a cat", "synthetic": ["a grey cat", "a cat on a mat"]},
            {"file_name": "sub/b.png", "original": "a dog", "synthetic": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = ImageFolderSource(tmp_path, caption_columns=["original", "synthetic"])
    assert [s.id for s in src] == ["a", "sub/b"]
    assert src[0].captions == {"original": ("a cat",), "synthetic": ("a grey cat", "a cat on a mat")}
    assert src[1].captions == {"original": ("a dog",), "synthetic": ()}
    assert src.load_image(1).size == (40, 32)
    assert isinstance(open_source(tmp_path, caption_columns=["original"]), ImageFolderSource)


def test_imagefolder_csv_default_column_and_problems(tmp_path, write_image):
    for n in ("a", "b", "c"):
        write_image(tmp_path / f"{n}.png")
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["file_name", "text"], ["a.png", "one"], ["b.png", "  "], ["gone.png", "x"]])
    src = ImageFolderSource(tmp_path)
    assert [s.captions for s in src] == [{"text": ("one",)}]
    kinds = sorted((p.kind, p.location.rsplit("/", 1)[-1]) for p in src.problems)
    assert kinds == [("missing_caption", "b.png"), ("missing_caption", "c.png"),
                     ("missing_image", "gone.png")]
    with pytest.raises(FormatError, match="b.png"):
        ImageFolderSource(tmp_path, on_error="raise")
    with pytest.raises(FormatError, match="caption column"):
        ImageFolderSource(tmp_path, caption_columns=["nope"])


def test_txt_captions(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\n\n  second   caption \n")
    write_image(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("\n  \n")
    write_image(tmp_path / "c.png")
    src = open_source(tmp_path)
    assert isinstance(src, TextCaptionSource)
    assert [(s.id, s.captions) for s in src] == [("a", {"caption": ("first caption", "second caption")})]
    assert sorted(p.kind for p in src.problems) == ["empty_caption", "missing_caption"]
    assert any(p.location.endswith("b.jpg") for p in src.problems)
    with pytest.raises(FormatError, match="b.jpg: empty_caption"):
        TextCaptionSource(tmp_path, on_error="raise")


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, image_bytes):
    with tarfile.open(tmp_path / "s-000.tar", "w") as tar:
        _add(tar, "x/000.jpg", image_bytes(seed=3, fmt="JPEG"))
        _add(tar, "x/000.txt", b"a red ball\na ball")
        _add(tar, "x/001.png", image_bytes(w=20, h=20, seed=4))
        meta = {"caption": "a blue box", "synthetic": ["a small blue box"]}
        _add(tar, "x/001.json", json.dumps(meta).encode())
        _add(tar, "x/002.png", image_bytes())  # no caption
    with tarfile.open(tmp_path / "s-001.tar", "w") as tar:
        _add(tar, "003.webp", image_bytes(seed=5, fmt="WEBP"))
        _add(tar, "003.txt", b"a green cone")
    src = open_source(tmp_path)
    assert isinstance(src, WebDatasetSource)
    assert [s.id for s in src] == ["x/000", "x/001", "003"]
    assert src[0].captions == {"caption": ("a red ball", "a ball")}
    assert src[1].captions == {"caption": ("a blue box",)}
    assert src.load_image(1).size == (20, 20) and src.image_size(2) == (40, 32)
    assert [p.kind for p in src.problems] == ["missing_caption"] and "x/002" in src.problems[0].location
    both = WebDatasetSource([tmp_path / "s-000.tar"], caption_keys=["caption", "synthetic"])
    assert both[1].captions == {"caption": ("a blue box",), "synthetic": ("a small blue box",)}


def test_class_folders_and_articles(tmp_path, write_image):
    write_image(tmp_path / "apple" / "1.png")
    write_image(tmp_path / "golden_retriever" / "1.png")
    write_image(tmp_path / "golden_retriever" / "2.png")
    src = open_source(tmp_path)
    assert isinstance(src, ClassFolderSource)
    assert [s.captions["caption"][0] for s in src] == [
        "a photo of an apple", "a photo of a golden retriever", "a photo of a golden retriever"]
    assert class_caption("unicorn") == "a photo of a unicorn"
    assert class_caption("hour_glass", "A {class}") == "An hour glass"
    assert class_caption("owl", "{class} drawing") == "owl drawing"
    with pytest.raises(ConfigError, match="placeholder"):
        class_caption("owl", "a photo")


def test_manifest_source_roundtrip(tmp_path, write_image):
    write_image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "a.txt").write_text("hello")
    src = open_source(tmp_path / "d")
    man = tmp_path / "m" / "kept.jsonl"
    man.parent.mkdir()
    man.write_text("\n".join(json.dumps(s.to_json(man.parent)) for s in src))
    again = open_source(man)
    assert isinstance(again, ManifestSource)
    assert again[0].captions == src[0].captions and again.read_bytes(0) == src.read_bytes(0)
    man.write_text("{not json")
    with pytest.raises(FormatError, match="kept.jsonl:1"):
        ManifestSource(man)


def test_open_source_errors(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_source(tmp_path / "nothing")
    with pytest.raises(FormatError, match="no images"):
        open_source(tmp_path)
    with pytest.raises(ConfigError, match="on_error"):
        TextCaptionSource(tmp_path, on_error="ignore")


def test_shapes_like_adapter():
    class Item:
        def __init__(self, i):
            self.image = np.full((24, 32, 3), i, np.uint8)
            self.caption, self.captions = f"shape {i}", [f"alt {i}", f"shape {i}"]

    class World:
        seed, size = 7, 32

        def __getitem__(self, i):
            return Item(i)

    src = shapes_source(World(), 3)
    assert src[2].captions == {"caption": ("shape 2", "alt 2")}
    assert src.image_size(1) == (32, 24)
    assert np.asarray(src.load_image(2))[0, 0].tolist() == [2, 2, 2]
    ds = ImageCaptionDataset(src, size=16)
    assert ds[1]["image"].shape == (3, 16, 16)


def test_real_shapes_world_source_and_imagefolder(tmp_path):
    from rectiflow.data.shapes import ShapesWorld, write_imagefolder

    world = ShapesWorld(size=32, seed=1)
    src = shapes_source(world, 4)
    assert src[0].captions["caption"][0] == world[0].caption
    assert np.array_equal(np.asarray(src.load_image(3)), world[3].image)
    folder = write_imagefolder(tmp_path / "w", 4, size=32, seed=1, progress=False)
    both = open_source(folder, caption_columns=["text", "captions"])
    assert both[0].captions["text"] == (world[0].caption,)
    assert both[0].captions["captions"] == tuple(world[0].captions)
    assert np.array_equal(np.asarray(both.load_image(2)), world[2].image)


# ---- transforms -------------------------------------------------------------------------------------------


def test_resize_crop_and_tensor_range():
    from PIL import Image

    img = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3)))  # [50, 100, 3]
    out = resize_center_crop(img, 32, 32)
    assert out.size == (32, 32)
    x = to_tensor(out)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # the crop keeps the middle: columns ~25..75 of the ramp
    assert 20 < (x[0, 0, 0] + 1) * 127.5 < 32 and 68 < (x[0, 0, -1] + 1) * 127.5 < 80
    white = to_tensor(Image.new("RGB", (16, 16), (255, 255, 255)))
    black = to_tensor(Image.new("RGB", (16, 16), (0, 0, 0)))
    assert white.min() == 1.0 and black.max() == -1.0
    with pytest.raises(ConfigError, match="multiple of 16"):
        CenterCrop(30)


def test_buckets():
    b = make_buckets(1024)
    assert (1024, 1024) in b and all(w % 16 == 0 and h % 16 == 0 for w, h in b)
    assert all(0.9 * 1024**2 <= w * h <= 1024**2 for w, h in b)
    assert all(0.5 <= w / h <= 2 for w, h in b) and (b[0][1], b[0][0]) == b[-1]
    buckets = Buckets.for_size(64)
    assert buckets.buckets == ((48, 80), (64, 64), (80, 48))
    assert buckets.target(100, 100) == (64, 64)
    assert buckets.target(200, 100) == (80, 48)
    assert buckets.target(30, 60) == (48, 80)
    with pytest.raises(ConfigError, match="area"):
        Buckets(((64, 64), (16, 32)))
    with pytest.raises(ConfigError, match="multiple of 16"):
        Buckets(((64, 60),))


# ---- captions ---------------------------------------------------------------------------------------------


def test_caption_mix_probabilities():
    caps = {"original": ("o",), "synthetic": ("s1", "s2")}
    policy = CaptionPolicy(mix={"original": 0.3, "synthetic": 0.7})
    draws = [policy(caps, seed=0, epoch=0, index=i)["caption"] for i in range(4000)]
    frac_o = draws.count("o") / len(draws)
    assert abs(frac_o - 0.3) < 0.03  # 4000 draws: std ~0.007
    assert abs(draws.count("s1") / len(draws) - 0.35) < 0.03
    # a sample without the synthetic field always gets the original
    assert {policy({"original": ("o",), "synthetic": ()}, 0, 0, i)["caption"] for i in range(50)} == {"o"}
    # seeded: same (seed, epoch, index) -> same caption; other epochs differ somewhere
    assert draws == [policy(caps, 0, 0, i)["caption"] for i in range(4000)]
    assert draws != [policy(caps, 0, 1, i)["caption"] for i in range(4000)]
    with pytest.raises(ConfigError, match="probabilities"):
        CaptionPolicy(mix={"a": -1.0})


def test_caption_dropout_per_encoder():
    policy = CaptionPolicy(dropout={"t5": 0.2, "clip": 0.5})
    outs = [policy({"caption": ("hi",)}, 1, 0, i)["text"] for i in range(4000)]
    t5 = sum(o["t5"] == "" for o in outs) / len(outs)
    clip = sum(o["clip"] == "" for o in outs) / len(outs)
    both = sum(o["t5"] == "" and o["clip"] == "" for o in outs) / len(outs)
    assert abs(t5 - 0.2) < 0.03 and abs(clip - 0.5) < 0.03 and abs(both - 0.1) < 0.03  # independent
    assert all(o["t5"] in ("", "hi") for o in outs)
    assert CaptionPolicy()({"caption": ("hi",)}, 0, 0, 0)["text"] == {"default": "hi"}
    with pytest.raises(ConfigError, match="dropout"):
        CaptionPolicy(dropout={"t5": 1.5})
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random()


# ---- datasets and samplers -----------------------------------------------------------------------------


def _txt_folder(root, write_image, sizes):
    for i, (w, h) in enumerate(sizes):
        write_image(root / f"{i:02d}.png", w, h, seed=i)
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
    return open_source(root)


def test_dataset_items_and_corrupt_image(tmp_path, write_image):
    src = _txt_folder(tmp_path, write_image, [(40, 32)] * 3)
    (tmp_path / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageCaptionDataset(src, size=16, captions=CaptionPolicy(dropout={"default": 0.0}))
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["caption"] == "caption 0" and item["text"] == {"default": "caption 0"} and item["id"] == "00"
    sub = ds[1]  # corrupt -> the next readable sample
    assert sub["id"] == "02" and sub["index"] == 2 and ds.bad == {1}
    with pytest.raises(FormatError, match="01.png: unreadable image"):
        ImageCaptionDataset(src, size=16, on_error="raise")[1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["text"]["default"][0] == "caption 0"
    with pytest.raises(ConfigError, match="exactly one"):
        ImageCaptionDataset(src)


def test_bucketed_batches_stack(tmp_path, write_image):
    sizes = [(100, 60), (60, 100), (50, 50), (120, 70), (64, 64), (70, 110), (80, 80), (90, 50)]
    src = _txt_folder(tmp_path, write_image, sizes)
    ds = ImageCaptionDataset(src, buckets=Buckets.for_size(64))
    assert ds.bucket_ids() == [2, 0, 1, 2, 1, 0, 1, 2]
    sampler = BucketBatchSampler(ds.bucket_ids(), batch_size=2, seed=0, drop_last=True)
    batches = list(sampler)
    # buckets hold 2, 3, 3 samples: with drop_last the odd one of each 3-bucket is left out
    assert len(batches) == 3 and len({i for b in batches for i in b}) == 6
    for b in batches:
        assert len({ds.bucket_ids()[i] for i in b}) == 1
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds.bucket_ids(), 2, seed=0))
    shapes = {tuple(batch["image"].shape[2:]) for batch in loader}
    assert shapes <= {(80, 48), (64, 64), (48, 80)} and len(shapes) >= 2
    keep_all = BucketBatchSampler(ds.bucket_ids(), batch_size=2, seed=0, drop_last=False)
    assert sorted(i for b in keep_all for i in b) == list(range(8))


def test_samplers_resume_exactly():
    full = ResumableSampler(10, seed=3)
    run = [list(full), list(full)]  # two epochs
    assert sorted(run[0]) == list(range(10)) and run[0] != run[1]
    resumed = ResumableSampler(10, seed=3)
    it = iter(resumed)
    head = [next(it) for _ in range(4)]
    state = resumed.state_dict()
    assert state == {"epoch": 0, "position": 4}
    fresh = ResumableSampler(10, seed=3)
    fresh.load_state_dict(state)
    assert head + list(fresh) == run[0] and list(fresh) == run[1]
    with pytest.raises(ConfigError, match="does not fit"):
        fresh.load_state_dict({"epoch": 0, "position": 11})
    assert list(ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]

    ids = [0, 1, 0, 1, 0, 1, 0, 1, 2, 2]
    bs = BucketBatchSampler(ids, 2, seed=5)
    epochs = [list(bs), list(bs)]
    b2 = BucketBatchSampler(ids, 2, seed=5)
    b2.load_state_dict({"epoch": 0, "position": 2})
    assert epochs[0][:2] + list(b2) == epochs[0] and list(b2) == epochs[1]


def test_package_exports_are_lazy():
    import subprocess
    import sys

    code = ("import sys, rectiflow.data as d; assert 'torch' not in sys.modules; "
            "from rectiflow.data import open_source, LatentCache, ImageCaptionDataset; "
            "print(LatentCache.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "LatentCache" in r.stdout, r.stderr


@pytest.mark.parametrize("mix", [{"text": 0.7, "captions": 0.3}, None, {"a": 0.5, "b": 0.2, "c": 0.3},
                                 {"absent": 1.0}])
def test_field_choice_is_numpys_weighted_choice(mix):
    """choose_field caches the cdf but must draw exactly what rng.choice(n, p=weights / total) draws."""
    pol = CaptionPolicy(mix=mix)
    for caps in ({"text": ["x"], "captions": ["y", "z"]}, {"text": ["x"]},
                 {"a": ["1"], "b": ["2"], "c": ["3"]}, {"a": ["1"], "c": ["3"]},
                 {"captions": ["q"], "other": ["r"]}):
        present = list(caps)
        w = [pol.mix.get(f, 0.0) for f in present] if mix is not None else [1.0] * len(present)
        if sum(w) <= 0:
            w = [1.0] * len(present)
        for i in range(300):
            ours, ref = sample_rng(3, 1, i), sample_rng(3, 1, i)
            want = present[int(ref.choice(len(present), p=np.asarray(w) / sum(w)))]
            assert pol.choose_field(caps, ours) == want
            assert ours.random() == ref.random()  # the same numbers consumed

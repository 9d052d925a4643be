"""The shapes world against its spec (docs/shapes-world.md): no held-out combination in any
training image, placement rules, grammar and articles, captions parse back, determinism, imagefolder."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from rectiflow.cli.main import main
from rectiflow.data.shapes import (
    COLORS,
    SHAPES,
    TASKS,
    Prompt,
    ShapesWorld,
    counterfactual_scene,
    held_out_present,
    parse_prompt,
    prompts_for,
    render,
    sample_prompt,
    scene_for_prompt,
    true_captions,
    write_imagefolder,
)
from rectiflow.data.sources import open_source
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.eval.shapes import score_image
from rectiflow.eval.shapes_detect import detect

# The spec's held-out lists, written out again (not imported from the module under test).
HELD_PAIRS = {("red", "triangle"), ("blue", "circle"), ("green", "star"), ("yellow", "square"),
              ("purple", "cross"), ("pink", "diamond")}


def _held_out_geometry(objs, side):
    """Spec: a circle above a square (GenEval rule on (cx, cy, side)), a triangle left of a star."""
    bad = []
    for a, b in itertools.permutations(objs, 2):
        dx, dy = a.cx - b.cx, a.cy - b.cy
        m = 0.1 * (side(a) + side(b))
        if (a.shape, b.shape) == ("circle", "square") and dy < -m and abs(dy) >= abs(dx):
            bad.append("circle above square")
        if (a.shape, b.shape) == ("triangle", "star") and dx < -m and abs(dx) >= abs(dy):
            bad.append("triangle left of star")
    return bad


@pytest.fixture(scope="module")
def world_items():
    world = ShapesWorld(64, seed=3)
    return [(world.scene(i), world[i]) for i in range(600)]


def test_training_world_never_contains_held_out_combinations(world_items):
    tasks = set()
    for scene, item in world_items:
        tasks.add(scene.task)
        assert not {(o.color, o.shape) for o in scene.objects} & HELD_PAIRS, scene
        assert not _held_out_geometry(scene.objects, lambda o: o.s), scene
        dets = detect(item.image)  # and what the detector sees in the pixels
        assert not {(d.color, d.shape) for d in dets} & HELD_PAIRS, scene
        assert not _held_out_geometry(dets, lambda d: d.side), (scene, dets)
        for cap in item.captions:
            assert not parse_prompt(cap).held_out, cap
    assert tasks == set(TASKS)


def test_held_out_scenes_are_available_for_evaluation_only():
    p = parse_prompt("a photo of a circle above a square")
    assert p.held_out
    scene = scene_for_prompt(p, np.random.default_rng(0), 64)
    assert _held_out_geometry(scene.objects, lambda o: o.s) == ["circle above square"]
    with pytest.raises(ConfigError, match="held-out"):
        scene_for_prompt(p, np.random.default_rng(0), 64, train=True)


def test_placement_rules(world_items):
    for scene, _ in world_items:
        size = scene.size
        for o in scene.objects:
            assert 0.22 * size <= o.s <= 0.34 * size
            assert o.cx - o.s / 2 >= 0.03 * size - 1e-9 and o.cx + o.s / 2 <= 0.97 * size + 1e-9
            assert o.cy - o.s / 2 >= 0.03 * size - 1e-9 and o.cy + o.s / 2 <= 0.97 * size + 1e-9
        for a, b in itertools.combinations(scene.objects, 2):  # boxes at least 0.04 S apart
            gap = max(abs(a.cx - b.cx) - (a.s + b.s) / 2, abs(a.cy - b.cy) - (a.s + b.s) / 2)
            assert gap >= 0.04 * size - 1e-9, scene
        p = scene.prompt
        n = {"single_object": 1, "colors": 1, "counting": p.count}.get(p.task, 2)
        assert len(scene.objects) == n
        if p.task == "position":  # d at least 0.15 S along the dominant axis
            a, b = scene.objects
            d = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
            assert d[p.relation] >= 0.15 * size


def test_rendered_pixels():
    scene = scene_for_prompt("a photo of an orange star and a blue square", np.random.default_rng(1), 64)
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (255, 255, 255)  # white background (inside the margin)
    sq = next(o for o in scene.objects if o.shape == "square")
    assert tuple(img[int(sq.cy), int(sq.cx)]) == COLORS["blue"]  # exact fill colour
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 3  # anti-aliased edges
    assert bool(score_image(scene.prompt, img))
    assert render(scene, 128).shape == (128, 128, 3)


def test_articles_and_grammar():
    assert Prompt("colors", "circle", color1="orange").text == "a photo of an orange circle"
    assert Prompt("color_attr", "square", "star", color1="red", color2="orange").text == \
        "a photo of a red square and an orange star"
    assert Prompt("counting", "cross", count=4).text == "a photo of four crosses"
    assert Prompt("position", "star", "circle", relation="left of").text == \
        "a photo of a star left of a circle"
    texts = [p.text for t in TASKS for p in prompts_for(t)]
    assert not any(" a orange" in t or " an " + c in t for t in texts for c in ("red", "circle", "black"))
    assert len(texts) == len(set(texts)) == 1902
    with pytest.raises(ConfigError):
        Prompt("two_object", "star", "star")
    with pytest.raises(RectiflowError):
        parse_prompt("a photo of a dog")


def test_every_caption_parses_back():
    for t in TASKS:
        for p in prompts_for(t):
            assert parse_prompt(p.text) == p
            assert parse_prompt("  " + p.text.upper().replace("AN ", "A ") + ". ") == p


def test_true_captions_are_true(world_items):
    """Every true caption is scored correct on the render (>= 99%, the detector's bar on ground truth)."""
    n_caps, ok = [], []
    for scene, item in world_items:
        assert item.captions == true_captions(scene) and item.captions[0] == scene.caption
        n_caps.append(len(item.captions))
        ok += [bool(score_image(parse_prompt(cap), item.image)) for cap in item.captions]
    print(f"\ntrue captions scored correct: {np.mean(ok):.4f} of {len(ok)}")
    assert np.mean(ok) >= 0.99
    assert max(n_caps) > 3  # two-object scenes carry several true captions


def test_reading_caption_order(world_items, tmp_path, capsys):
    """caption_order='reading': the same images and tasks; a two-object image's two_object / color_attr
    captions name the left object first (the upper one when |dy| > |dx|), checked on the scene's geometry
    here; the captions are a subset of the 'any' world's (so still true), position captions all kept."""
    world = ShapesWorld(64, seed=3, caption_order="reading")
    changed = 0
    for i, (scene, item) in enumerate(world_items[:300]):
        r = world[i]
        assert np.array_equal(r.image, item.image) and r.task == item.task and r.caption == r.captions[0]
        assert set(r.captions) <= set(item.captions)
        changed += r.captions != item.captions
        for cap in r.captions:
            p = parse_prompt(cap)
            if p.task in ("two_object", "color_attr"):
                a, b = (next(o for o in scene.objects if o.shape == s) for s in (p.shape1, p.shape2))
                dx, dy = b.cx - a.cx, b.cy - a.cy
                assert (dx > 0 if abs(dx) >= abs(dy) else dy > 0), (cap, scene.objects)
        positions = [c for c in item.captions if parse_prompt(c).task == "position"]
        assert [c for c in r.captions if parse_prompt(c).task == "position"] == positions
        if scene.task in ("two_object", "color_attr"):
            assert parse_prompt(r.caption).task == scene.task
    assert changed > 50  # most two-object images lose their reversed captions
    # the CLI writes the same world; a bad order is one line before anything is written
    assert main(["data", "shapes", "--out", str(tmp_path / "w"), "--n", "20", "--seed", "3", "--no-progress",
                 "--caption-order", "reading"]) == 0
    assert "reading order" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "w" / "metadata.jsonl").read_text().splitlines()]
    want = [world[i] for i in range(20)]
    assert [(r["text"], r["captions"]) for r in rows] == [(w.caption, w.captions) for w in want]
    with pytest.raises(SystemExit):
        main(["data", "shapes", "--out", str(tmp_path / "bad"), "--n", "2", "--caption-order", "random"])
    assert "--caption-order" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="caption order"):
        ShapesWorld(64, caption_order="random")
    with pytest.raises(ConfigError, match="caption order"):
        true_captions(world_items[0][0], "random")


def test_determinism_by_seed():
    a, b, c = ShapesWorld(64, seed=5), ShapesWorld(64, seed=5), ShapesWorld(64, seed=6)
    for i in (0, 7, 31):
        assert a.scene(i) == b.scene(i) and np.array_equal(a[i].image, b[i].image)
    assert [a.scene(i) for i in range(8)] != [c.scene(i) for i in range(8)]
    assert [x.caption for x in itertools.islice(a.iter_from(4), 3)] == [a[i].caption for i in (4, 5, 6)]


def test_imagefolder_writer_and_cli(tmp_path):
    out = write_imagefolder(tmp_path / "w1", 12, 64, seed=2, progress=False)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    world = ShapesWorld(64, seed=2)
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(12)]
    for i, r in enumerate(rows):
        assert r["text"] == world[i].caption and r["captions"] == world[i].captions and r["task"] in TASKS
        with Image.open(out / r["file_name"]) as im:
            assert np.array_equal(np.asarray(im), world[i].image)
    src = open_source(out)  # default caption column "text"; all true captions with "captions"
    assert len(src) == 12 and src[0].captions == {"text": (rows[0]["text"],)}
    every = open_source(out, caption_columns=["captions"])
    assert every[0].captions["captions"] == tuple(rows[0]["captions"])
    with pytest.raises(RectiflowError, match="already"):
        write_imagefolder(out, 3, 64, seed=2, progress=False)
    # the CLI, with two workers, writes the same bytes
    assert main(["data", "shapes", "--out", str(tmp_path / "w2"), "--n", "12", "--seed", "2",
                 "--workers", "2", "--no-progress"]) == 0
    for r in rows:
        assert (tmp_path / "w2" / r["file_name"]).read_bytes() == (out / r["file_name"]).read_bytes()
    assert (tmp_path / "w2" / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()
    assert main(["data", "shapes", "--out", str(tmp_path / "w3"), "--n", "0"]) == 2  # one-line error


def test_cli_task_weights(tmp_path, capsys):
    """--task-weights reaches ShapesWorld: only the named mix is drawn; bad specs are one-line errors."""
    mix = "single_object=0,two_object=0,counting=0,colors=0,position=1,color_attr=3"
    assert main(["data", "shapes", "--out", str(tmp_path / "w"), "--n", "30", "--seed", "3", "--no-progress",
                 "--task-weights", mix]) == 0
    assert "position 0.25 color_attr 0.75" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "w" / "metadata.jsonl").read_text().splitlines()]
    world = ShapesWorld(64, seed=3, task_weights={"position": 1, "color_attr": 3})
    assert [r["text"] for r in rows] == [world[i].caption for i in range(30)]
    assert {r["task"] for r in rows} == {"position", "color_attr"}
    for bad in ("position", "place=2", "position=x", "position=-1", ",".join(f"{t}=0" for t in TASKS)):
        with pytest.raises(SystemExit):
            main(["data", "shapes", "--out", str(tmp_path / "bad"), "--n", "2", "--task-weights", bad])
        err = capsys.readouterr().err
        assert ("all zero" if bad.endswith("color_attr=0") else "bad task weight") in err
    assert not (tmp_path / "bad").exists()
    for bad, msg in (({"place": 1}, "unknown task"), ({"position": -1}, "finite, >= 0"),
                     ({"position": 0}, "not all zero")):
        with pytest.raises(ConfigError, match=msg):
            ShapesWorld(64, task_weights=bad)


def test_shape_weights(tmp_path, capsys):
    """--shape-weights draws prompts in proportion to the product of their shapes' weights; bad weights are
    one-line errors."""
    # without weights the draw is the one datasets were written with before the option (a golden: these
    # captions are what `rectiflow data shapes --seed 5` wrote then)
    assert [ShapesWorld(64, seed=5)[i].caption for i in range(4)] == [
        "a photo of a circle below a square", "a photo of a star above a diamond",
        "a photo of a star and a square", "a photo of a square below a star"]
    plain, same = ShapesWorld(64, seed=5), ShapesWorld(64, seed=5, shape_weights=dict.fromkeys(SHAPES, 1.0))
    assert [same[i].task for i in range(40)] == [plain[i].task for i in range(40)]  # the task is drawn first
    # weight 0 removes a shape from every caption; a heavy weight makes it the commonest noun
    no_star = ShapesWorld(64, seed=5, shape_weights={"star": 0})
    assert not any("star" in no_star[i].caption for i in range(200))
    single = {t: float(t == "single_object") for t in TASKS}
    heavy = ShapesWorld(64, seed=5, shape_weights={"cross": 4}, task_weights=single)
    share = np.mean([heavy[i].caption.endswith("cross") for i in range(400)])
    assert 0.35 < share < 0.65  # 4 / (5 + 4) = 0.44 against 1/6 uniform
    assert main(["data", "shapes", "--out", str(tmp_path / "w"), "--n", "20", "--seed", "5", "--no-progress",
                 "--shape-weights", "star=0"]) == 0
    assert "shape weights circle 1 square 1 triangle 1 diamond 1 star 0 cross 1" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "w" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [no_star[i].caption for i in range(20)]
    for bad, msg in (("star", "bad shape weight"), ("hexagon=2", "bad shape weight"),
                     ("star=x", "not a number"), ("star=-1", "finite and >= 0"),
                     (",".join(f"{s}=0" for s in SHAPES), "all zero")):
        with pytest.raises(SystemExit):
            main(["data", "shapes", "--out", str(tmp_path / "bad"), "--n", "2", "--shape-weights", bad])
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    for bad in ({"hexagon": 1.0}, {"star": float("nan")}, dict.fromkeys(SHAPES, 0.0)):
        with pytest.raises(ConfigError, match="shape"):
            ShapesWorld(64, shape_weights=bad)
    # a task none of whose prompts keeps a weight: said when drawn
    only_circle = {s: float(s == "circle") for s in SHAPES}
    with pytest.raises(ConfigError, match="leave no two_object prompt"):
        sample_prompt("two_object", np.random.default_rng(0), shape_weights=only_circle)


def test_shapes_vocabulary_is_the_spec():
    assert dict(COLORS) == {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (235, 210, 20),
                            "green": (30, 160, 60), "blue": (30, 80, 220), "purple": (130, 50, 180),
                            "pink": (240, 110, 190), "black": (20, 20, 20)}
    assert dict(SHAPES) == {"circle": "circles", "square": "squares", "triangle": "triangles",
                            "diamond": "diamonds", "star": "stars", "cross": "crosses"}


def test_counterfactuals_make_every_caption_false(world_items, tmp_path, capsys):
    """ShapesWorld.counterfactual(i): the same captions, an image every one of them is scored false on (the
    real scorer), the same boxes and colours, no held-out combination, the plain item unchanged; in both
    caption orders. The writer and CLI pair a counterfactual folder row for row with the plain one."""
    world, reading = ShapesWorld(64, seed=3), ShapesWorld(64, seed=3, caption_order="reading")
    false_of_cf, true_of_plain, collapsed = [], [], 0
    for i, (scene, item) in enumerate(world_items[:300]):
        for w in (world, reading):
            cf = w.counterfactual(i)
            plain = w[i]
            assert cf.captions == plain.captions and cf.caption == plain.caption and cf.task == plain.task
            assert not np.array_equal(cf.image, plain.image)
            false_of_cf += [not score_image(parse_prompt(c), cf.image) for c in cf.captions]
            true_of_plain += [bool(score_image(parse_prompt(c), plain.image)) for c in plain.captions]
        assert np.array_equal(world[i].image, item.image)  # drawing the counterfactual changes nothing else
        cf_scene = counterfactual_scene(scene, np.random.default_rng([3, i, 1]))
        assert [(o.color, o.cx, o.cy, o.s) for o in cf_scene.objects] == \
            [(o.color, o.cx, o.cy, o.s) for o in scene.objects]
        assert not held_out_present(cf_scene.objects, 64, slack=0.06)
        assert not {(o.color, o.shape) for o in cf_scene.objects} & HELD_PAIRS
        assert not _held_out_geometry(cf_scene.objects, lambda o: o.s)
        shapes = {o.shape for o in scene.objects}
        cf_shapes = {o.shape for o in cf_scene.objects}
        if len(shapes) == 2:
            collapsed += len(cf_shapes) == 1 and cf_shapes < shapes  # drawn as one of the two named shapes
        else:
            assert len(cf_shapes) == 1 and cf_shapes != shapes
    print(f"\ncaptions false of their counterfactual: {np.mean(false_of_cf):.4f} of {len(false_of_cf)}")
    assert all(false_of_cf) and np.mean(true_of_plain) >= 0.99
    assert collapsed > 50
    # the writer: same names and captions, the counterfactual images, a flag on each row
    out = write_imagefolder(tmp_path / "cf", 6, 64, seed=3, counterfactual="all", progress=False)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(6)]
    for i, r in enumerate(rows):
        assert r["captions"] == world[i].captions and r["counterfactual"] is True
        with Image.open(out / r["file_name"]) as im:
            assert np.array_equal(np.asarray(im), world.counterfactual(i).image)
    assert main(["data", "shapes", "--out", str(tmp_path / "cf2"), "--n", "6", "--seed", "3", "--no-progress",
                 "--counterfactual", "--workers", "2"]) == 0
    assert "counterfactual images (all)" in capsys.readouterr().out
    assert (tmp_path / "cf2" / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()
    # two-shape: only images of two shapes get a counterfactual, the others stay themselves
    assert main(["data", "shapes", "--out", str(tmp_path / "cf3"), "--n", "24", "--seed", "3",
                 "--no-progress", "--counterfactual", "two-shape"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cf3" / "metadata.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        two = len({o.shape for o in world.scene(i).objects}) == 2
        with Image.open(tmp_path / "cf3" / r["file_name"]) as im:
            want = world.counterfactual(i) if two else world[i]
            assert np.array_equal(np.asarray(im), want.image) and r["counterfactual"] is two
    assert 0 < sum(r["counterfactual"] for r in rows) < 24
    with pytest.raises(SystemExit):
        main(["data", "shapes", "--out", str(tmp_path / "bad"), "--n", "2", "--counterfactual", "three"])
    assert "--counterfactual" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="unknown counterfactual kind"):
        write_imagefolder(tmp_path / "bad", 2, 64, counterfactual="three", progress=False)
    assert not (tmp_path / "bad").exists()

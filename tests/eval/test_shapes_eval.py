"""evaluate_shapes plumbing with a fake pipeline whose generate() returns ground-truth renders (must score
~1.0), blank canvases (must score 0) or another prompt's renders; files in GenEval's layout; the report."""

import json
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from rectiflow.convert.bundle import SamplingDefaults
from rectiflow.data.shapes import SHAPES, TASKS, parse_prompt, render, scene_for_prompt
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.eval.shapes import prompt_set
from rectiflow.eval.shapes_eval import evaluate_prompt, evaluate_shapes, geneval_metadata, report_markdown


class FakePipeline:
    """generate(prompts, steps=, seeds=, ...) -> images, like rectiflow.sample.Pipeline.generate."""

    name, model_hash = "fake-truth", "0123456789abcdef"

    def __init__(self, mode="truth"):
        self.defaults = SamplingDefaults(steps=2, width=64, height=64)
        self.mode, self.calls = mode, []

    def generate(self, prompts, *, steps, width, height, sampler, shift, guidance, cfg_scale, seeds,
                 num_images_per_prompt, progress):
        assert width == height and progress is False and len(seeds) == len(prompts) * num_images_per_prompt
        self.calls.append(dict(prompts=list(prompts), steps=steps, seeds=list(seeds), sampler=sampler))
        images = []
        for i, text in enumerate(prompts):
            for seed in seeds[i * num_images_per_prompt:(i + 1) * num_images_per_prompt]:
                if self.mode == "blank":
                    arr = np.full((height, width, 3), 255, np.uint8)
                else:
                    shown = "a photo of a cross" if self.mode == "cross" else text
                    rng = np.random.default_rng([seed, zlib.crc32(text.encode()), steps])
                    arr = render(scene_for_prompt(parse_prompt(shown), rng, width))
                images.append(Image.fromarray(arr))
        settings = [dict(sampler=sampler, shift=None, guidance=None, cfg_scale=cfg_scale)] * len(images)
        return SimpleNamespace(images=images, settings=settings)


def test_ground_truth_generator_scores_one_and_files_follow_geneval(tmp_path):
    pipe = FakePipeline()
    report = evaluate_shapes(pipe, steps=[1], out_dir=tmp_path, progress=False, batch_prompts=64)
    seen, held = report["results"]["seen"]["1"], report["results"]["held_out"]["1"]
    print(f"\nfake ground-truth generator: seen {seen['overall']:.4f}, held-out {held['overall']:.4f}")
    assert seen["overall"] >= 0.99 and held["overall"] >= 0.99
    assert seen["n_images"] == 48 * 6 * 4 and held["n_images"] == 24 * 3 * 4
    assert list(seen["per_task"]) == list(TASKS)
    assert list(held["per_task"]) == ["colors", "position", "color_attr"]
    assert list(seen["shapes_found"]) == list(SHAPES) and min(seen["shapes_found"].values()) >= 0.99
    # each distinct prompt is generated once, with the protocol's seeds
    texts = [t for c in pipe.calls for t in c["prompts"]]
    assert len(texts) == len(set(texts)) == len({p.text for p in prompt_set("seen")}) + len(
        {p.text for p in prompt_set("held_out")})
    assert all(c["seeds"] == [0, 1, 2, 3] * len(c["prompts"]) for c in pipe.calls)
    # GenEval layout: <split>/steps<N>/<index>/metadata.jsonl + samples/<n>.png
    root = tmp_path / "seen" / "steps1"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert [f.name for f in folders] == [f"{k:05d}" for k in range(288)]
    meta = json.loads((folders[0] / "metadata.jsonl").read_text())
    assert meta["prompt"] == prompt_set("seen")[0].text and meta["tag"] == "single_object"
    assert sorted(p.name for p in (folders[0] / "samples").iterdir()) == [f"{n:04d}.png" for n in range(4)]
    with Image.open(folders[0] / "samples" / "0000.png") as im:
        assert im.size == (64, 64)
    rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 288 * 4
    assert {"prompt", "task", "seed", "correct", "failure", "clauses", "detections"} <= set(rows[0])
    assert all((r["failure"] is None) == r["correct"] for r in rows)
    with Image.open(root / "grid.png") as grid:
        assert grid.size == (4 * 64, 6 * 4 * 64)  # 4 distinct prompts per task, 4 seeds
    for path in (tmp_path / "report.json", root / "report.json"):
        r = json.loads(path.read_text())
        assert r["model"] == {"name": "fake-truth", "hash": "0123456789abcdef"}
        assert r["settings"]["seeds"] == [0, 1, 2, 3] and r["settings"]["sampler"] == "euler"
        assert r["settings"]["cfg_scale"] == 1.0 and "guidance" in r["settings"]
    assert "| 1 steps |" in (tmp_path / "report.md").read_text()
    assert "## held_out" in (tmp_path / "report.md").read_text()


def test_blank_and_wrong_images_score_low_and_settings_are_passed():
    blank = evaluate_shapes(FakePipeline("blank"), steps=[2], limit=3, progress=False)
    s = blank["results"]["seen"]["2"]
    assert s["overall"] == 0.0 and s["n_images"] == 6 * 3 * 4
    assert s["failures"] == {t: {"nothing detected": 12} for t in TASKS}
    assert "| color_attr | nothing detected | 12 |" in report_markdown(blank)
    assert set(s["shapes_found"].values()) == {0.0} and len(s["shapes_found"]) >= 4
    pipe = FakePipeline("cross")
    wrong = evaluate_shapes(pipe, steps=[1, 3], splits=["heldout"], limit=2, sampler="heun", cfg_scale=2.5,
                            progress=False)
    assert list(wrong["results"]) == ["held_out"] and list(wrong["results"]["held_out"]) == ["1", "3"]
    assert wrong["results"]["held_out"]["3"]["overall"] == 0.0  # a cross alone satisfies none of these
    found = wrong["results"]["held_out"]["3"]["shapes_found"]  # the crosses are found, nothing else
    assert all(v == (s == "cross") for s, v in found.items()) and len(found) > 2
    assert "| 1 steps | " in report_markdown(wrong).split("Named shapes found")[1]
    for summary in wrong["results"]["held_out"].values():  # every failed image has exactly one kind
        assert {t: sum(f.values()) for t, f in summary["failures"].items()} == {
            t: v["n"] - v["correct"] for t, v in summary["per_task"].items()}
    assert {c["steps"] for c in pipe.calls} == {1, 3} and {c["sampler"] for c in pipe.calls} == {"heun"}
    assert wrong["settings"]["cfg_scale"] == 2.5 and wrong["settings"]["limit_per_task"] == 2


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(RectiflowError, match="steps"):
        evaluate_shapes(FakePipeline(), steps=[0], progress=False)
    with pytest.raises(ConfigError, match="split"):
        evaluate_shapes(FakePipeline(), steps=[1], splits=["train"], progress=False)
    with pytest.raises(RectiflowError, match="limit"):
        evaluate_shapes(FakePipeline(), steps=[1], limit=0, progress=False)


def test_geneval_metadata():
    m = geneval_metadata(parse_prompt("a photo of a star left of a circle"))
    assert m["include"] == [{"class": "circle", "count": 1},
                            {"class": "star", "count": 1, "position": ["left of", 0]}]
    assert geneval_metadata(parse_prompt("a photo of three crosses"))["include"] == [
        {"class": "cross", "count": 3}]
    m = geneval_metadata(parse_prompt("a photo of an orange square and a red circle"))
    assert m["include"] == [{"class": "square", "count": 1, "color": "orange"},
                            {"class": "circle", "count": 1, "color": "red"}]
    assert m["tag"] == "color_attr" and m["held_out"] is False


def test_evaluate_prompt_counts_the_seeds_that_come_out_right(tmp_path):
    text = "a photo of a yellow star and a blue square"
    truth = evaluate_prompt(FakePipeline(), text, seeds=range(5), steps=[1, 2], out_dir=tmp_path,
                            progress=False)
    assert truth["task"] == "color_attr" and list(truth["results"]) == ["1", "2"]
    assert truth["results"]["2"] == {"correct": 5, "n": 5, "correct_seeds": [0, 1, 2, 3, 4], "failures": {}}
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["seeds"] == [0, 1, 2, 3, 4]
    with Image.open(tmp_path / "steps1" / "grid.png") as grid:
        assert grid.size == (5 * 64, 64)
    pipe = FakePipeline("cross")
    wrong = evaluate_prompt(pipe, text, seeds=[3, 4, 5], steps=[4], cfg_scale=2.0, progress=False)
    assert wrong["results"]["4"] == {"correct": 0, "n": 3, "correct_seeds": [],
                                     "failures": {"both shapes missing": 3}}
    assert pipe.calls == [dict(prompts=[text], steps=4, seeds=[3, 4, 5], sampler="euler")]
    assert wrong["settings"]["cfg_scale"] == 2.0


def test_evaluate_prompt_bad_input_one_line_each():
    with pytest.raises(RectiflowError, match="not a shapes-world prompt"):
        evaluate_prompt(FakePipeline(), "a yellow star", progress=False)
    with pytest.raises(RectiflowError, match="seeds must not be empty"):
        evaluate_prompt(FakePipeline(), "a photo of a star", seeds=[], progress=False)
    with pytest.raises(RectiflowError, match="steps"):
        evaluate_prompt(FakePipeline(), "a photo of a star", steps=[0], progress=False)

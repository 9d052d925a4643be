"""The bundled default model (src/rectiflow/assets/default): present, small, loads, generates through the
CLI without --model, and keeps its measured shapes-world accuracy (a regression guard, not the benchmark: the
full numbers are in its model card, from `rectiflow eval shapes`)."""

import json

import numpy as np
import pytest
from PIL import Image

from rectiflow.cli.main import main
from rectiflow.convert.bundle import CARD_FILE, DEFAULT_MODEL_ENV, default_bundle_path
from rectiflow.eval.shapes import score_image

BUNDLE = default_bundle_path()
PROMPT = "a photo of a yellow star and a blue square"


@pytest.fixture(scope="module")
def pipe():
    from rectiflow.sample import Pipeline

    return Pipeline.from_bundle(BUNDLE)


def test_bundle_is_shipped_and_small():
    assert (BUNDLE / CARD_FILE).is_file(), "the default model must ship in src/rectiflow/assets/default"
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"default model is {size / 2**20:.1f} MB (budget 40 MB)"
    card = json.loads((BUNDLE / CARD_FILE).read_text())
    assert card["defaults"]["width"] == card["defaults"]["height"] == 64
    assert (BUNDLE / "README.md").is_file() and "shapes-world" in (BUNDLE / "README.md").read_text().lower()


def test_generate_without_model_uses_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "-o", str(out), "--seed", "1", "--no-progress"]) == 0
    img = Image.open(out)
    assert img.size == (64, 64)
    settings = json.loads(img.text["rectiflow"])
    assert settings["model"] == json.loads((BUNDLE / CARD_FILE).read_text())["name"]
    defaults = json.loads((BUNDLE / CARD_FILE).read_text())["defaults"]
    assert settings["steps"] == defaults["steps"] == 8 and settings["cfg_scale"] == defaults["cfg_scale"]
    assert settings["shift"] == defaults["shift"] == 3.0


def test_accuracy_does_not_regress(pipe):
    # 24 images: the README's prompt and one prompt per task, seeds 0-3, the model's defaults (Euler, 8 steps,
    # time shift 3, CFG 1: the distilled student). Measured when the model was made: see MIN_CORRECT; the
    # model card has the full evaluation.
    prompts = [PROMPT, "a photo of a circle", "a photo of a star and a cross", "a photo of three squares",
               "a photo of a red square", "a photo of a diamond above a cross"]
    res = pipe.generate(prompts, seeds=[0, 1, 2, 3] * len(prompts), num_images_per_prompt=4, progress=False)
    scored = [bool(score_image(p, np.asarray(im))) for p, im in
              zip([p for p in prompts for _ in range(4)], res.images)]
    per_prompt = {p: sum(scored[4 * i:4 * i + 4]) for i, p in enumerate(prompts)}
    assert sum(scored) >= MIN_CORRECT, f"{sum(scored)}/24 correct ({per_prompt})"


# The shipped weights with the bundle's defaults (Euler, 8 steps, time shift 3, CFG 1) get 14/24 of these
# right (circle 4/4, red square 3/4, three squares 0/4, star and cross 3/4, diamond above a cross 3/4, the
# README prompt 1/4). The model before it got 16/24 here but less on the full benchmark at 8 steps
# (0.688 / 0.642 against 0.722 / 0.719): 24 images are a guard against breakage, not a ranking. One image of
# margin for float differences across CPUs. The full benchmark is in the model card.
MIN_CORRECT = 13


def test_eval_prompt_scores_what_generate_draws(tmp_path, capsys):
    # `rectiflow eval prompt` draws seed i as `rectiflow generate --seed i` does (the bundle's defaults) and
    # scores it as the benchmark does: the seeds it reports right are those whose PNG scores right.
    out = tmp_path / "e"
    assert main(["eval", "prompt", PROMPT, "--seeds", "3", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    right = []
    for seed in range(3):
        png = tmp_path / f"{seed}.png"
        assert main(["generate", PROMPT, "-o", str(png), "--seed", str(seed), "--no-progress"]) == 0
        if score_image(PROMPT, np.asarray(Image.open(png).convert("RGB"))):
            right.append(seed)
    assert report["results"]["8"]["correct_seeds"] == right
    assert f"steps= 8 {len(right)}/3 correct" in capsys.readouterr().out


def test_eval_prompt_outside_the_grammar_is_one_line(capsys):
    assert main(["eval", "prompt", "a yellow star", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: not a shapes-world prompt: 'a yellow star'; use one of the six templates, e.g. "
                   "'a photo of an orange circle' or 'a photo of two stars'"]

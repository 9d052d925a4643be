"""`rectiflow tune grpo`: the loop moves a model toward what its reward prefers, resumes exactly, exports a
bundle that samples with the ODE, and refuses bad input with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rectiflow.cli.main import main
from rectiflow.convert.bundle import SamplingDefaults
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.sample import Pipeline, random_bundle
from rectiflow.tune.grpo import GRPOOptions, grpo
from rectiflow.tune.prompts import PromptPool
from rectiflow.tune.rewards import reward_and_pool, shapes_reward

POOL = PromptPool({"a": ["a photo of a red circle", "a photo of two squares"], "b": ["a photo of a star"]})
SEEDS = list(range(6))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("grpo") / "b", transformer="micro", seed=3,
                         defaults=SamplingDefaults(steps=2, width=32, height=32))


def brightness(prompts, images):
    return [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]


def darkness(prompts, images):
    return [-b for b in brightness(prompts, images)]


def _mean_brightness(pipe):
    """ODE samples (the sampler `generate` runs) of fixed seeds."""
    r = pipe.generate(["a photo of a star"] * len(SEEDS), seeds=SEEDS, progress=False)
    return float(np.mean(brightness(None, r.images)))


OPTS = dict(iterations=6, prompts=2, group_size=4, minibatch=8, lr=1e-2, kl_weight=0.0, anchor=0.0,
            clip_range=0.2, checkpoint_every=3)


@pytest.mark.parametrize("objective", ["grpo", "awm"])
def test_the_reward_it_is_given_is_what_moves(bundle, tmp_path, objective):
    """Tuned for brightness the ODE samples get brighter; tuned for darkness, darker (the same seeds), with
    either objective."""
    before = _mean_brightness(Pipeline.from_bundle(bundle))
    after = {}
    for name, reward in (("up", brightness), ("down", darkness)):
        pipe = Pipeline.from_bundle(bundle)
        opts = GRPOOptions(**dict(OPTS, objective=objective))
        s = grpo(pipe, POOL, reward, tmp_path / name, opts, progress=False)
        assert s["images"] == 6 * 2 * 4
        after[name] = _mean_brightness(Pipeline.from_bundle(tmp_path / name / "bundle"))
    assert after["up"] > before + 0.01 and after["down"] < before - 0.01, (before, after)
    card = json.loads((tmp_path / "up" / "bundle" / "model.json").read_text())
    assert card["grpo"]["options"]["lr"] == OPTS["lr"] and card["defaults"]["steps"] == 2
    lines = (tmp_path / "up" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == list(range(1, 7))


@pytest.mark.parametrize("objective", ["grpo", "awm"])
def test_an_interrupted_run_resumes_to_the_same_weights(bundle, tmp_path, objective):
    """3 rounds, then the same command with 6: the rounds 4-6 continue from the saved state (model,
    optimizer, history) and land where 6 rounds in one go do."""
    opts = dict(OPTS, objective=objective)
    whole = Pipeline.from_bundle(bundle)
    grpo(whole, POOL, brightness, tmp_path / "whole", GRPOOptions(**opts), progress=False)
    grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path / "part",
         GRPOOptions(**dict(opts, iterations=3)), progress=False)
    resumed = Pipeline.from_bundle(bundle)
    grpo(resumed, POOL, brightness, tmp_path / "part", GRPOOptions(**opts), progress=False)
    a, b = whole.transformer.state_dict(), resumed.transformer.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    h_whole = (tmp_path / "whole" / "history.jsonl").read_text()
    assert (tmp_path / "part" / "history.jsonl").read_text() == h_whole


def test_a_directory_of_another_run_is_refused(bundle, tmp_path):
    grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path, GRPOOptions(**dict(OPTS, iterations=1)),
         progress=False)
    with pytest.raises(ConfigError, match="holds a GRPO run with another lr; use another --out"):
        grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path,
             GRPOOptions(**dict(OPTS, iterations=1, lr=1e-4)), progress=False)


@pytest.mark.parametrize("kw, msg", [
    ({"group_size": 1}, r"group_size must be an integer >= 2 \(advantages are relative"),
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"kl_weight": -1.0}, "kl_weight must be >= 0"),
    ({"anchor": -1.0}, "anchor must be >= 0"),
    ({"step": "ddim"}, "unknown stochastic step 'ddim'; choose one of cps, sde"),
    ({"objective": "dpo"}, "unknown objective 'dpo'; choose one of grpo, awm"),
    ({"objective": "awm", "sde_steps": 2}, "awm objective does not take"),
    ({"objective": "awm", "eta": 0.5}, "awm objective does not take"),
    ({"step": "cps", "eta": 1.5}, r"CPS noise level eta must be in \(0, 1\]"),
])
def test_bad_options_are_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        GRPOOptions(**kw)


def test_more_stochastic_steps_than_steps_is_refused(bundle, tmp_path):
    with pytest.raises(ConfigError, match="sde_steps=3 is more than the sampler's 2 steps"):
        grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path, GRPOOptions(sde_steps=3))
    with pytest.raises(ConfigError, match="a CPS step ending at t = 0 has no noise; use at most 1"):
        grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path, GRPOOptions(sde_steps=2))


def test_prompt_pools(tmp_path):
    with pytest.raises(RectiflowError, match="not found; give a text file with one prompt per line"):
        PromptPool.from_file(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(RectiflowError, match="has no prompts"):
        PromptPool.from_file(tmp_path / "empty.txt")
    draws = POOL.draw(3000, np.random.default_rng(0))
    share_b = sum(g == "b" for g, _ in draws) / len(draws)
    assert 0.45 < share_b < 0.55  # groups are drawn uniformly, whatever their size


def test_the_shapes_reward_counts_clauses_on_seen_prompts_only():
    from rectiflow.data.shapes import Obj, Scene, parse_prompt, render
    from rectiflow.eval.shapes import prompt_set

    reward, pool = reward_and_pool("shapes")
    held_out = {p.text for p in prompt_set("held_out")}
    assert not held_out & {p for ps in pool.groups.values() for p in ps}
    scene = Scene((Obj("circle", "red", 20.0, 20.0, 18.0),), 64, parse_prompt("a photo of a red circle"))
    from PIL import Image

    im = Image.fromarray(render(scene))
    # the circle is drawn, the square is not: one clause of two
    assert reward(["a photo of a circle and a square"], [im]) == [0.5]
    assert shapes_reward(["a photo of a circle"], [im]) == [1.0]
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        reward_and_pool("nope")


def test_cli_refuses_bad_input_with_one_line(bundle, tmp_path, capsys):
    rc = main(["tune", "grpo", "--model", str(bundle), "--out", str(tmp_path), "--group-size", "1",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "group_size must be an integer >= 2" in err and len(err.strip().splitlines()) == 1
    rc = main(["tune", "grpo", "--model", str(bundle), "--out", str(tmp_path), "--reward", "nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown reward" in err and len(err.strip().splitlines()) == 1
    rc = main(["tune", "grpo", "--model", str(bundle), "--out", str(tmp_path), "--objective", "awm",
               "--sde-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "awm objective does not take" in err and len(err.strip().splitlines()) == 1


def test_a_run_past_the_asked_iterations_is_refused(bundle, tmp_path):
    grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path, GRPOOptions(**dict(OPTS, iterations=2)),
         progress=False)
    with pytest.raises(ConfigError, match="is at iteration 2, past --iterations 1"):
        grpo(Pipeline.from_bundle(bundle), POOL, brightness, tmp_path,
             GRPOOptions(**dict(OPTS, iterations=1)), progress=False)


def test_the_anchor_holds_the_velocity_near_the_starting_model(bundle, tmp_path):
    """With the same reward and seeds, a large anchor keeps the tuned velocity (deterministic steps too)
    closer to the starting model's than no anchor does."""
    start = Pipeline.from_bundle(bundle)
    x = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(0))  # micro: 4 tokens of 64 channels
    cond = start.encode_prompts(["a photo of a star"] * 4)
    drift = {}
    for anchor in (0.0, 100.0):
        pipe = Pipeline.from_bundle(bundle)
        opts = GRPOOptions(**dict(OPTS, kl_weight=0.0, anchor=anchor))
        s = grpo(pipe, POOL, brightness, tmp_path / str(anchor), opts, progress=False)
        assert s["iterations"] == OPTS["iterations"]
        with torch.no_grad():
            t = torch.tensor(0.5)  # the last (deterministic) step of the 2-step grid starts here
            v0 = start.velocity_fn(cond, None, 4, 4)(x, t)
            v1 = pipe.velocity_fn(cond, None, 4, 4)(x, t)
        drift[anchor] = float((v1 - v0).norm() / v0.norm())
    assert drift[100.0] < 0.5 * drift[0.0], drift

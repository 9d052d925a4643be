"""`rectiflow tune dmd`: distribution matching distillation gives a one-step generator the spread of its
teacher's samples (where one regressed step collapses it), DMD2's GAN term pulls it toward real latents,
runs resume exactly, and bad input is refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rectiflow.cli.main import main
from rectiflow.convert.bundle import SamplingDefaults, save_bundle
from rectiflow.data.cache_reader import LatentCache
from rectiflow.data.cache_writer import build_cache
from rectiflow.data.sources import ArraySource
from rectiflow.data.transforms import Buckets
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.models.sd3 import MMDiT
from rectiflow.models.text import load_text_encoder
from rectiflow.sample import Pipeline, random_bundle
from rectiflow.tune.adversarial import classifier_loss, generator_gan_loss, last_hidden_states
from rectiflow.tune.dmd import DMDOptions, dmd
from rectiflow.tune.prompts import PromptPool

PROMPT = "a photo of a star"
POOL = PromptPool({"a": [PROMPT]})
SEEDS = list(range(100, 164))
DATA_MEAN, DATA_STD = 1.0, 0.5


def _latents(bundle, steps):
    pipe = Pipeline.from_bundle(bundle)
    r = pipe.generate([PROMPT] * len(SEEDS), seeds=SEEDS, steps=steps, cfg_scale=1.0, progress=False)
    return r.latents


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A micro transformer trained by flow matching on latents N(1, 0.5^2) (no images needed): its ODE draws
    that spread, its single step from noise (the posterior mean) a much narrower one."""
    root = tmp_path_factory.mktemp("dmd")
    b = random_bundle(root / "random", transformer="micro", seed=3,
                      defaults=SamplingDefaults(steps=1, width=32, height=32))
    pipe = Pipeline.from_bundle(b)
    c, lh, lw = pipe.autoencoder.params.z_channels, 32 // pipe.downsample, 32 // pipe.downsample
    txt, vec = pipe.encode_prompts([PROMPT] * 32)
    velocity = pipe.velocity_fn((txt.clone(), vec.clone()), None, lh, lw)
    torch.manual_seed(0)
    pipe.transformer.requires_grad_(True)
    opt = torch.optim.Adam(pipe.transformer.parameters(), lr=2e-3)
    for _ in range(500):
        z0 = DATA_MEAN + DATA_STD * torch.randn(32, c, lh, lw)
        eps, t = torch.randn_like(z0), torch.rand(32)
        tb = t.reshape(-1, 1, 1, 1)
        v = pipe.family.unpack(velocity(pipe.family.pack((1 - tb) * z0 + tb * eps), t), lh, lw)
        loss = ((v - (eps - z0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe.transformer.requires_grad_(False)
    return save_bundle(root / "teacher", pipe.transformer, pipe.autoencoder, pipe.text_encoder, pipe.defaults,
                       name="teacher")


def test_one_step_gets_the_teachers_spread(teacher, tmp_path):
    reference = _latents(teacher, 16)  # the teacher's own distribution
    before = _latents(teacher, 1)
    s = dmd(Pipeline.from_bundle(teacher), Pipeline.from_bundle(teacher), POOL, tmp_path,
            DMDOptions(iterations=50, batch=16, steps=1, teacher_cfg=1.0, lr=1.5e-4, fake_lr=1e-3,
                       fake_updates=3), progress=False)
    after = _latents(tmp_path / "bundle", 1)
    ref_std, b_std, a_std = (float(x.std(0).mean()) for x in (reference, before, after))
    assert b_std < ref_std - 0.15, (b_std, ref_std)  # one regressed step is narrower than the ODE's samples
    assert abs(a_std - ref_std) < 0.3 * abs(b_std - ref_std), (b_std, a_std, ref_std)
    assert abs(float(after.mean()) - float(reference.mean())) < 0.1
    card = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert card["dmd"]["options"]["lr"] == 1.5e-4 and card["defaults"]["steps"] == 1
    assert card["defaults"]["cfg_scale"] == 1.0 and s["samples"] == 50 * 16 * 4
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == list(range(1, 51))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("dmd-random") / "b", transformer="micro", seed=3,
                         defaults=SamplingDefaults(steps=2, width=32, height=32))


OPTS = dict(iterations=4, batch=4, fake_updates=2, lr=1e-3, checkpoint_every=2)


@pytest.mark.parametrize("steps, gan, gan_t_max", [(1, 0.0, None), (2, 0.0, None), (1, 0.5, None),
                                                   (1, 0.5, 0.3)])
def test_an_interrupted_run_resumes_to_the_same_weights(bundle, tmp_path, steps, gan, gan_t_max):
    """For one and two steps, and with the GAN term (its classifier and real batches resume too), at DMD's
    noise levels and at its own."""
    real = _flat_images(Pipeline.from_bundle(bundle), tmp_path / "real", n=8) if gan else None
    kw = dict(OPTS, steps=steps, gan=gan, gan_t_max=gan_t_max)
    whole = Pipeline.from_bundle(bundle)
    dmd(whole, Pipeline.from_bundle(bundle), POOL, tmp_path / "whole", DMDOptions(**kw), real=real,
        progress=False)
    dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(bundle), POOL, tmp_path / "part",
        DMDOptions(**dict(kw, iterations=2)), real=real, progress=False)
    resumed = Pipeline.from_bundle(bundle)
    dmd(resumed, Pipeline.from_bundle(bundle), POOL, tmp_path / "part", DMDOptions(**kw), real=real,
        progress=False)
    a, b = whole.transformer.state_dict(), resumed.transformer.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    history = [(tmp_path / run / "history.jsonl").read_text() for run in ("part", "whole")]
    assert history[0] == history[1]


def test_a_directory_of_another_run_is_refused(bundle, tmp_path):
    dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(bundle), POOL, tmp_path,
        DMDOptions(**dict(OPTS, iterations=1)), progress=False)
    with pytest.raises(ConfigError, match="holds a DMD run with another batch; use another --out"):
        dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(bundle), POOL, tmp_path,
            DMDOptions(**dict(OPTS, iterations=1, batch=2)), progress=False)


def test_one_network_as_model_and_teacher_is_refused(bundle, tmp_path):
    pipe = Pipeline.from_bundle(bundle)
    with pytest.raises(ConfigError, match="the model and the teacher are one network"):
        dmd(pipe, pipe, POOL, tmp_path, DMDOptions(**OPTS), progress=False)


def test_a_teacher_of_another_autoencoder_is_refused(bundle, tmp_path):
    other = random_bundle(tmp_path / "other", transformer="micro", seed=4,
                          defaults=SamplingDefaults(steps=2, width=32, height=32))
    with pytest.raises(ConfigError, match="has another autoencoder than the model"):
        dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(other), POOL, tmp_path / "o",
            DMDOptions(**OPTS), progress=False)


@pytest.mark.parametrize("kw, msg", [
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"batch": 0}, "batch must be an integer >= 1"),
    ({"fake_updates": 0}, "fake_updates must be an integer >= 1"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"fake_lr": -1.0}, "fake_lr must be > 0"),
    ({"teacher_cfg": 0.0}, "teacher_cfg must be > 0"),
    ({"t_range": (0.0, 0.5)}, "t_range must satisfy 0 < LO < HI < 1"),
    ({"gan": -1.0}, "gan must be >= 0"),
    ({"gan_classifier": -1.0}, "gan_classifier must be >= 0"),
    ({"classifier_lr": 0.0}, "classifier_lr must be > 0"),
    ({"gan_t_max": 0.01}, r"gan_t_max must lie in \(0.02, 1\)"),
])
def test_bad_options_are_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        DMDOptions(**kw)


def test_cli_runs_and_refuses_a_missing_prompt_file(bundle, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["tune", "dmd", "--model", str(bundle), "--teacher", str(bundle), "--prompts", "shapes",
               "--out", str(out), "--iterations", "1", "--batch", "2", "--fake-updates", "1",
               "--no-progress"])
    assert rc == 0 and (out / "bundle" / "model.json").is_file()
    assert "1 generator updates, 4 samples" in capsys.readouterr().out
    rc = main(["tune", "dmd", "--model", str(bundle), "--teacher", str(bundle), "--prompts",
               str(tmp_path / "none.txt"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "is neither a prompt file nor a named pool (shapes)" in err[0]
    rc = main(["tune", "dmd", "--model", str(bundle), "--teacher", str(bundle), "--out", str(tmp_path / "g"),
               "--gan", "0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "the GAN term needs real latents (--real CACHE" in err[0]
    rc = main(["tune", "dmd", "--model", str(bundle), "--teacher", str(bundle), "--out", str(tmp_path / "g"),
               "--gan", "0.1", "--real", str(tmp_path / "no-cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "no-cache: no manifest.json; build a cache there" in err[0]
    assert not (tmp_path / "g").exists()
    if not torch.cuda.is_available():
        rc = main(["tune", "dmd", "--model", str(bundle), "--teacher", str(bundle), "--out",
                   str(tmp_path / "g"), "--device", "cuda"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and "no CUDA device is available; use --device cpu" in err[0]


def _couplings(bundle, tmp_path, n=16, size=None):
    from rectiflow.data.couplings import CouplingsDataset
    from rectiflow.sample.couplings import PromptSource, make_couplings

    pipe = Pipeline.from_bundle(bundle)
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    source = PromptSource.from_file(tmp_path / "prompts.txt", pipe.text_encoder)
    make_couplings(pipe, source, tmp_path / "pairs", n, steps=8, batch_size=8, width=size, height=size,
                   progress=False)
    return CouplingsDataset(tmp_path / "pairs")


def test_the_regression_loss_pulls_the_first_step_onto_the_couplings(teacher, tmp_path):
    """With a large regression weight (DMD1's term dominating), the one-step estimate from the couplings'
    noise moves toward the teacher's 8-step endpoints of that noise."""
    pairs = _couplings(teacher, tmp_path)
    pipe = Pipeline.from_bundle(teacher)

    def distance(p):
        """Mean squared distance of the one-step samples from the couplings' noise to their endpoints."""
        lh, lw = pairs.z0.shape[-2:]
        velocity = p.velocity_fn(p.encode_prompts([PROMPT] * len(pairs)), None, lh, lw)
        x0 = pairs.noise - p.family.unpack(velocity(p.family.pack(pairs.noise), torch.tensor(1.0)), lh, lw)
        return float(((x0 - pairs.z0) ** 2).mean())

    before = distance(pipe)
    dmd(pipe, Pipeline.from_bundle(teacher), POOL, tmp_path / "run", DMDOptions(
        iterations=20, batch=8, steps=1, teacher_cfg=1.0, lr=1e-3, fake_updates=1, regression=100.0),
        couplings=pairs, progress=False)
    after = distance(Pipeline.from_bundle(tmp_path / "run" / "bundle"))
    assert after < 0.5 * before, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert lines[-1]["regression"] < lines[0]["regression"]


def test_regression_without_couplings_and_couplings_of_another_size_are_refused(bundle, tmp_path):
    with pytest.raises(ConfigError, match="the regression loss needs couplings"):
        dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(bundle), POOL, tmp_path / "a",
            DMDOptions(**OPTS, regression=1.0), progress=False)
    assert not (tmp_path / "a").exists()  # a refused run leaves nothing behind
    pairs = _couplings(bundle, tmp_path, n=2, size=64)
    with pytest.raises(ConfigError, match=r"the couplings' latents are \(\d+, 8, 8\), the model samples"):
        dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(bundle), POOL, tmp_path / "b",
            DMDOptions(**OPTS, regression=1.0), couplings=pairs, progress=False)


def _flat_images(pipe, out, n=64, size=32, encoder=None):
    """A cache of n flat images of random colours, captioned PROMPT: real latents unlike the teacher's."""
    def item(i):
        rng = np.random.default_rng([5, i])
        return np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8), {"caption": [PROMPT]}, f"r{i}"

    return build_cache(ArraySource(n, item, name="flat"), pipe.autoencoder, encoder or pipe.text_encoder, out,
                       size=size, batch_size=32, shard_size=n, progress=False)


def test_the_gan_term_pulls_the_generator_toward_real_latents(teacher, tmp_path):
    """DMD2's claim in kind: with real data the generator is no longer bound to its teacher's distribution.
    The teacher draws latents N(1, 0.5^2); the real latents are flat colours (mean image near 0). DMD alone
    keeps the one-step samples at the teacher's mean image; the GAN term moves them toward the real one."""
    real = _flat_images(Pipeline.from_bundle(teacher), tmp_path / "real")
    cache = LatentCache(real)
    real_mean = torch.stack([cache.latents(i) for i in range(len(cache))]).float().mean(0)

    def distance(bundle):
        x = _latents(bundle, 1)
        return float((x.mean(0) - real_mean).pow(2).mean().sqrt())

    distances = {}
    for gan in (0.0, 1.0):
        dmd(Pipeline.from_bundle(teacher), Pipeline.from_bundle(teacher), POOL, tmp_path / f"gan{gan}",
            DMDOptions(iterations=30, batch=16, steps=1, teacher_cfg=1.0, lr=1.5e-4, fake_lr=1e-3,
                       fake_updates=2, gan=gan, gan_classifier=1.0), real=real if gan else None,
            progress=False)
        distances[gan] = distance(tmp_path / f"gan{gan}" / "bundle")
    start = distance(teacher)
    assert distances[0.0] > 0.9 * start, (start, distances)  # DMD alone stays with the teacher
    assert distances[1.0] < 0.5 * distances[0.0], (start, distances)
    history = [json.loads(x) for x in (tmp_path / "gan1.0" / "history.jsonl").read_text().splitlines()]
    assert {"gan", "classifier"} <= history[0].keys()
    card = json.loads((tmp_path / "gan1.0" / "bundle" / "model.json").read_text())
    assert card["dmd"]["options"]["gan"] == 1.0


def test_the_gan_term_without_real_latents_or_with_foreign_ones_is_refused(bundle, tmp_path):
    with pytest.raises(ConfigError, match="the GAN term needs real latents"):
        dmd(Pipeline.from_bundle(bundle), Pipeline.from_bundle(bundle), POOL, tmp_path / "a",
            DMDOptions(**OPTS, gan=0.1), progress=False)
    assert not (tmp_path / "a").exists()
    pipe = Pipeline.from_bundle(bundle)
    big = _flat_images(pipe, tmp_path / "big", n=4, size=64)
    with pytest.raises(ConfigError, match=r"real latents \(--real\) are read only by the GAN term"):
        dmd(pipe, Pipeline.from_bundle(bundle), POOL, tmp_path / "b", DMDOptions(**OPTS), real=big,
            progress=False)
    with pytest.raises(ConfigError, match=r"the real latents in .* are \(\d+, 8, 8\); the model samples"):
        dmd(pipe, Pipeline.from_bundle(bundle), POOL, tmp_path / "b", DMDOptions(**OPTS, gan=0.1), real=big,
            progress=False)
    def wide_or_square(i):
        return np.zeros((32, 96 if i % 2 else 32, 3), np.uint8), {"caption": [PROMPT]}, f"m{i}"

    mixed = build_cache(ArraySource(4, wide_or_square, name="mixed"), pipe.autoencoder, pipe.text_encoder,
                        tmp_path / "mixed", buckets=Buckets(((32, 32), (48, 16))), batch_size=4, shard_size=4,
                        progress=False)
    with pytest.raises(ConfigError, match="come in 2 image sizes; cache one size, the model's default"):
        dmd(pipe, Pipeline.from_bundle(bundle), POOL, tmp_path / "b", DMDOptions(**OPTS, gan=0.1), real=mixed,
            progress=False)
    foreign = _flat_images(pipe, tmp_path / "foreign", n=4, encoder=load_text_encoder("minilm:8"))
    with pytest.raises(RectiflowError, match="cache made by other encoders: text encoder"):
        dmd(pipe, Pipeline.from_bundle(bundle), POOL, tmp_path / "c", DMDOptions(**OPTS, gan=0.1),
            real=foreign, progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _forward_twice(model, forward, tokens):
    with last_hidden_states(model) as seen:
        forward()
    assert len(seen) == 1 and tuple(seen[0].shape) == (2, tokens, model.params.hidden_size)
    forward()
    assert len(seen) == 1 and not model.final_layer._forward_pre_hooks  # the hook is gone after the block


def test_last_hidden_states_are_the_final_layers_input_in_flux_and_sd3(bundle):
    """The classifier reads [B, L_img, hidden] in both families."""
    pipe = Pipeline.from_bundle(bundle)  # 32 px, 8x downsampling, 2x2 patches: 4 image tokens
    velocity = pipe.velocity_fn(pipe.encode_prompts([PROMPT] * 2), None, 4, 4)
    x = torch.randn(2, 4, pipe.transformer.params.in_channels)
    _forward_twice(pipe.transformer, lambda: velocity(x, torch.tensor(0.5)), 4)
    sd3 = MMDiT("sd3-micro")  # 8x8 latents, 2x2 patches: 16 image tokens
    args = (torch.randn(2, 16, 8, 8), torch.rand(2), torch.randn(2, 384), torch.randn(2, 5, 384))
    _forward_twice(sd3, lambda: sd3(*args), 16)


def test_the_gan_losses_are_the_non_saturating_ones():
    zero = torch.zeros(3)
    assert abs(float(classifier_loss(zero, zero)) - 2 * np.log(2.0)) < 1e-6  # chance: log 2 each
    sure = torch.full((3,), 20.0)
    assert classifier_loss(sure, -sure) < 1e-6 and generator_gan_loss(-sure) > 19.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_term_at_once_on_each_device(bundle, tmp_path, device):
    """Two steps, the regression and the GAN term together; on a GPU every tensor has to follow the networks
    there (the noise, couplings and real latents are drawn on the CPU)."""
    pairs = _couplings(bundle, tmp_path, n=4)
    real = _flat_images(Pipeline.from_bundle(bundle), tmp_path / "real", n=8)
    pipe = Pipeline.from_bundle(bundle, device, torch.float32)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    s = dmd(pipe, Pipeline.from_bundle(bundle, device, torch.float32), POOL, tmp_path / "run",
            DMDOptions(**OPTS, steps=2, gan=0.5, regression=1.0), couplings=pairs, real=real, progress=False)
    after = pipe.transformer.state_dict()
    assert all(v.device.type == device for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after) and s["iterations"] == 4
    h = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])
    assert {"dmd", "gan", "regression", "fake", "classifier", "gap"} <= h.keys()

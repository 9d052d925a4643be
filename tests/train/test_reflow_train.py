"""k-RF training (data.couplings): x_t on the straight line between the PAIRED noise and endpoint."""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_OVERRIDES, TINY_TOML, _item, cli_train
from rectiflow.data.cache_writer import build_cache
from rectiflow.data.sources import ArraySource
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.models.transformer import image_ids, pack, text_ids
from rectiflow.sample import Pipeline, random_bundle
from rectiflow.sample.couplings import PromptSource, make_couplings
from rectiflow.train.config import load_config
from rectiflow.train.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return random_bundle(tmp_path_factory.mktemp("teacher") / "b", transformer="micro", seed=1)


@pytest.fixture(scope="module")
def couplings(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("couplings")
    (root / "prompts.txt").write_text("a photo of a red circle\na photo of two squares\n")
    pipe = Pipeline.from_bundle(teacher)
    make_couplings(pipe, PromptSource.from_file(root / "prompts.txt", pipe.text_encoder), root / "c", 8,
                   steps=2, width=32, height=32, progress=False)
    return root / "c"


def _overrides(couplings, out, *extra):
    # data.cache = "": tiny.toml names a real-data cache (mixed in only with data.mix_cache=true)
    return [*TEST_OVERRIDES, 'data.cache=""', f'data.couplings="{couplings}"', f'train.out_dir="{out}"',
            "model.preset=micro",
            "checkpoint.every=0", *extra]


def test_the_loss_uses_the_paired_noise(couplings, teacher, tmp_path):
    tr = Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path, "data.caption_dropout=0",
                                                   f'model.init="{teacher / "transformer.safetensors"}"')))
    batch = tr.load_batch([0, 3, 5, 6])
    t = torch.tensor([1.0, 0.7, 0.3, 0.05])
    fresh = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = tr.forward_loss(batch, t, fresh)
        assert float(tr.forward_loss(batch, t, torch.zeros_like(fresh))) == float(loss)  # eps is ignored
        z0, z1 = pack(batch["latents"]), pack(batch["noise"])
        x_t = (1 - t)[:, None, None] * z0 + t[:, None, None] * z1
        b, _, h, w = batch["latents"].shape
        out = tr.model(x_t, image_ids(b, h, w), batch["txt"], text_ids(b, batch["txt"].shape[1]), t,
                       batch["vec"], None)
        want = ((out - (z1 - z0)) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    # initialised from the teacher: the couplings' data is its own ODE's endpoints
    assert tr.cache.teacher["hash"] and len(tr.cache) == 8


def test_caption_dropout_uses_the_stored_empty_embedding(couplings, tmp_path):
    tr = Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path, "data.caption_dropout=1.0")))
    batch = tr.load_batch([0, 1])
    txt0, vec0 = tr.cache.text(tr.cache.empty_caption_index)
    assert torch.equal(batch["txt"][1], txt0) and torch.equal(batch["vec"][0], vec0)


def test_couplings_of_another_latent_shape_are_refused(couplings, tmp_path):
    bad = 'model.params={in_channels = 32, out_channels = 32}'
    with pytest.raises(ConfigError, match=r"^couplings .* does not fit the model: latent / text / pooled"):
        Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path, bad)))


def test_couplings_exclude_cache_validation(couplings, tmp_path):
    with pytest.raises(ConfigError, match="validation.holdout"):
        load_config(TINY_TOML, _overrides(couplings, tmp_path, "validation.holdout=2"))
    with pytest.raises(ConfigError, match="set both"):
        load_config(TINY_TOML, [*TEST_OVERRIDES, "data.mix_cache=true"])


def test_cli_reflow_training_exports_a_bundle(couplings, teacher, tmp_path, train_env):
    out = tmp_path / "run"
    init = f'model.init="{teacher / "transformer.safetensors"}"'
    r = cli_train(_overrides(couplings, out, "train.steps=3", init,
                             f'model.autoencoder="{teacher / "ae.safetensors"}"'), train_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "export" / "bundle" / "model.json").is_file()
    Pipeline.from_bundle(out / "export" / "bundle")


def test_cli_guidance_distilled_student_is_steered_by_generate_guidance(couplings, teacher, tmp_path,
                                                                        train_env):
    out, weights = tmp_path / "run", teacher / "transformer.safetensors"
    r = cli_train(_overrides(couplings, out, "train.steps=3", f'model.init="{weights}"', "optim.lr=1e-2",
                             f'guidance_distill.teacher="{weights}"', "model.guidance=2.5",
                             f'model.autoencoder="{teacher / "ae.safetensors"}"'), train_env)
    assert r.returncode == 0, r.stderr[-2000:]
    pipe = Pipeline.from_bundle(out / "export" / "bundle")
    assert pipe.transformer.params.guidance_embed and pipe.defaults.guidance == 2.5
    assert pipe.defaults.cfg_scale == 1.0
    kw = {"steps": 2, "width": 32, "height": 32, "progress": False}
    low, high = (pipe("a photo of a red circle", guidance=g, **kw).latents for g in (1.0, 5.0))
    assert (low - high).abs().max() > 1e-4


def test_mixing_in_the_real_data_loss(couplings, teacher, tiny_cache, tmp_path):
    with pytest.raises(RectiflowError, match="text encoder"):  # the test cache's hash-word embeddings
        Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path, f'data.cache="{tiny_cache}"',
                                                  "data.mix_cache=true")))
    pipe = Pipeline.from_bundle(teacher)  # a cache of the same encoders as the couplings
    cache = build_cache(ArraySource(6, _item, name="squares"), pipe.autoencoder, pipe.text_encoder,
                        tmp_path / "cache", size=32, batch_size=6, shard_size=6)
    tr = Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path, f'data.cache="{cache}"',
                                                   "data.mix_cache=true", "data.caption_dropout=0")))
    pairs = 8
    assert len(tr.cache) == pairs + 6 and len(tr.stream.indices) == pairs + 6
    batch = tr.load_batch([1, pairs + 2])  # a pair, then a cache row with fresh (seeded) noise
    assert torch.equal(batch["noise"][0], tr.cache.noise[1])
    assert torch.equal(batch["latents"][1], tr.cache.data.latents(2))
    again = tr.load_batch([pairs + 2])["noise"][0]
    assert torch.equal(batch["noise"][1], again)  # the same noise within an epoch (resumable) ...
    tr.cache.set_epoch(1)
    assert not torch.equal(tr.load_batch([pairs + 2])["noise"][0], again)  # ... and new noise the next
    tr.train_step()


def test_lee_et_al_settings_pseudo_huber_on_the_paired_line(couplings, teacher, tmp_path):
    """flow.loss = "pseudo_huber" (Lee et al. 2024's 2-RF metric) is sqrt(mse + c^2) - c of the same
    residual per sample, then averaged; flow.timesteps = "u_shaped" is accepted and a bad loss is one line."""
    extra = ("data.caption_dropout=0", f'model.init="{teacher / "transformer.safetensors"}"',
             'flow.timesteps="u_shaped"', "flow.timestep_params={a = 4.0}")
    mse_tr = Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path / "a", *extra)))
    huber = ('flow.loss="pseudo_huber"', "flow.loss_params={c = 0.01}")
    hub_tr = Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path / "b", *extra, *huber)))
    batch = mse_tr.load_batch([0, 3, 5, 6])
    t = torch.tensor([1.0, 0.7, 0.3, 0.05])
    with torch.no_grad():
        mses = torch.stack([mse_tr.forward_loss({k: v[i:i + 1] for k, v in batch.items()}, t[i:i + 1], None)
                            for i in range(4)])
        huber = hub_tr.forward_loss(batch, t, None)
    torch.testing.assert_close(huber, ((mses + 1e-4).sqrt() - 0.01).mean(), rtol=1e-5, atol=1e-7)
    assert hub_tr.train_step().loss > 0  # a step runs with u-shaped timesteps
    with pytest.raises(ConfigError, match="unknown loss 'huber'"):
        Trainer(load_config(TINY_TOML, _overrides(couplings, tmp_path / "c", 'flow.loss="huber"')))

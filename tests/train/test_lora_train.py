"""LoRA training ([lora]): only the adapters train, optimizer state and checkpoints hold only them (plus the
base hash), resume is exact, the export writes kohya and diffusers files that load back."""

import fnmatch

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TOML, assert_same_checkpoint, overrides
from rectiflow.convert.lora import read_lora
from rectiflow.convert.transformer import build_transformer, load_transformer, save_transformer
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.train.checkpoint import load_checkpoint
from rectiflow.train.config import load_config
from rectiflow.train.trainer import Trainer


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "micro.safetensors"
    return save_transformer(build_transformer("micro"), path)


def _cfg(cache, out, base, *extra):
    return load_config(TINY_TOML, overrides(
        cache, out, "model.preset=micro", f'model.init="{base}"', "lora.rank=2", "lora.alpha=4",
        'lora.targets=["attn", "mlp"]', "train.steps=6", "checkpoint.every=3", "train.progress=false",
        "lora.trigger=sks", *extra))


def test_only_adapters_train_and_are_checkpointed(tiny_cache, base_file, tmp_path):
    t = Trainer(_cfg(tiny_cache, tmp_path / "run", base_file))
    trained = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trained and all(".lora.default." in n for n in trained)
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in t.model.named_parameters() if p.requires_grad}
    result = t.fit()
    base = load_transformer(base_file)
    from rectiflow.nn.lora import base_state_dict

    after = base_state_dict(t.model)
    assert all(torch.equal(after[k], v) for k, v in base.state_dict().items())  # the base never moved
    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt.model.keys() == set(trained) and ckpt.ema.keys() == set(trained)
    assert ckpt.state["lora_base_hash"] == t.lora_base_hash
    assert len(ckpt.optimizer["state"]) == len(trained)  # AdamW moments for the adapters only
    ups = [v for k, v in ckpt.model.items() if k.endswith("up.weight")]
    assert any(v.abs().max() > 0 for v in ups)  # the adapters learned something
    files = {p.name: p for p in result["exports"]}
    assert set(files) == {"lora-kohya.safetensors", "lora-diffusers.safetensors"}
    k = read_lora(files["lora-kohya.safetensors"])
    d = read_lora(files["lora-diffusers.safetensors"], base.params)
    assert k.info["base_hash"] == t.lora_base_hash and k.metadata["modelspec.trigger_phrase"] == "sks"
    assert k.adapters.keys() == d.adapters.keys()
    for m in k.adapters:
        assert torch.equal(k.adapters[m].up, d.adapters[m].up) and k.adapters[m].alpha == 4.0
        assert torch.equal(k.adapters[m].up, ckpt.ema[f"{m}.lora.default.up.weight"])  # the EMA is exported


def test_resume_is_exact(tiny_cache, base_file, tmp_path):
    whole = tmp_path / "whole"
    Trainer(_cfg(tiny_cache, whole, base_file)).fit()
    part = tmp_path / "part"
    Trainer(_cfg(tiny_cache, part, base_file, "train.steps=3")).fit()
    t = Trainer(_cfg(tiny_cache, part, base_file))
    t.resume()
    assert t.step == 3
    t.fit()
    name = "checkpoints/step-000000006"
    assert_same_checkpoint(part / name, whole / name)
    assert load_file(str(part / name / "model.safetensors")).keys() == \
        load_file(str(whole / name / "model.safetensors")).keys()


def test_resume_onto_other_base_is_refused(tiny_cache, base_file, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_cache, out, base_file, "train.steps=3")).fit()
    torch.manual_seed(1)
    other = save_transformer(build_transformer("micro"), tmp_path / "other.safetensors")
    t = Trainer(_cfg(tiny_cache, out, other))
    with pytest.raises(RectiflowError, match="holds adapters for base weights"):
        t.resume()


def test_empty_target_set_is_a_config_error(tiny_cache, base_file, tmp_path):
    with pytest.raises(ConfigError, match="lora.targets is empty"):
        _cfg(tiny_cache, tmp_path, base_file, "lora.targets=[]")
    with pytest.raises(ConfigError, match="matches no linear layer"):
        Trainer(_cfg(tiny_cache, tmp_path, base_file, 'lora.targets=["no_such_layer"]'))


@pytest.mark.slow
def test_ddp_lora_matches_one_process(tiny_cache, base_file, tmp_path):
    """2 processes (torchrun, gloo) train the same adapters as 1 process with the same global batch."""
    from test_distributed import _assert_losses_close, _losses, _one_process, torchrun

    args = ("model.preset=micro", f'model.init="{base_file}"', "lora.rank=2", "train.steps=7",
            "checkpoint.every=0", 'lora.formats=["kohya"]')
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _one_process(tiny_cache, single, args)
    r = torchrun(overrides(tiny_cache, ddp, *args, "distributed.mode=ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_losses_close(_losses(ddp), _losses(single), rtol=1e-6)
    a = load_file(str(single / "checkpoints" / "step-000000007" / "model.safetensors"))
    b = load_file(str(ddp / "checkpoints" / "step-000000007" / "model.safetensors"))
    assert a.keys() == b.keys() and all(".lora.default." in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_validation_with_ema_adapters(tiny_cache, base_file, tmp_path):
    t = Trainer(_cfg(tiny_cache, tmp_path / "run", base_file, "validation.every=3", "validation.holdout=4",
                     "validation.use_ema=true", "train.steps=3"))
    t.fit()
    assert t.validator is not None
    from rectiflow.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl", "val")] == [3]


_ID_GLOB = "sample-00[0-3]"  # 4 of the tiny cache's first 8 ids


def test_preserved_samples_learn_the_base_models_own_prediction(tiny_cache, base_file, tmp_path):
    """lora.preserve: matching samples' target is the base model's output with the adapters off. The adapters
    start as zero deltas (up = 0), so a LoRA model equals its base: with every sample preserved the loss is 0
    and nothing moves; with some preserved, only the others' data loss remains."""
    from rectiflow.nn.lora import lora_modules

    everything = Trainer(_cfg(tiny_cache, tmp_path / "all", base_file, 'lora.preserve="*"'))
    before = {n: a.up.weight.detach().clone() for n, a in lora_modules(everything.model)}
    for _ in range(3):
        assert everything.train_step().loss == 0.0
    assert all(torch.equal(a.up.weight, before[n]) for n, a in lora_modules(everything.model))

    plain = Trainer(_cfg(tiny_cache, tmp_path / "plain", base_file, "data.caption_dropout=0"))
    some = Trainer(_cfg(tiny_cache, tmp_path / "some", base_file, "data.caption_dropout=0",
                        f'lora.preserve="{_ID_GLOB}"'))
    batch = plain.load_batch(list(range(8)))
    kept = torch.tensor([fnmatch.fnmatchcase(i, _ID_GLOB) for i in batch["id"]])
    assert 0 < kept.sum() < 8
    t = torch.linspace(0.1, 0.9, 8)
    eps = torch.randn((8, *batch["latents"].shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_sample = torch.stack([plain.forward_loss(plain.load_batch([i]), t[i:i + 1], eps[i:i + 1])
                                  for i in range(8)])
        got = some.forward_loss(batch, t, eps)
    torch.testing.assert_close(got, (per_sample * ~kept).mean(), rtol=1e-5, atol=1e-7)


def test_preserve_needs_a_lora(tiny_cache, tmp_path):
    with pytest.raises(ConfigError, match="lora.preserve='prior-\\*' needs lora.rank > 0"):
        load_config(TINY_TOML, overrides(tiny_cache, tmp_path, 'lora.preserve="prior-*"'))
    with pytest.raises(ConfigError, match=r"^lora.guide=2.0 needs lora.rank > 0$"):
        load_config(TINY_TOML, overrides(tiny_cache, tmp_path, "lora.guide=2.0"))


def test_guided_target_is_cfg_of_the_data_velocity_and_the_models_unconditional_output(tiny_cache, base_file,
                                                                                         tmp_path):
    """lora.guide = g: target = v_u + g (v - v_u), v the data velocity, v_u the model's own output for the
    cached "" caption; preserved samples keep the base's output instead."""
    from rectiflow.flow import training_pair

    tr = Trainer(_cfg(tiny_cache, tmp_path / "g", base_file, "lora.guide=2.5", f'lora.preserve="{_ID_GLOB}"'))
    batch = tr.load_batch(list(range(8)))
    lat = batch["latents"]
    b, _, h, w = lat.shape
    t = torch.linspace(0.1, 0.9, b)
    eps = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
    x_t, v = training_pair(tr.path, tr.family.pack(lat), tr.family.pack(eps), t)
    x_in = tr.path.model_input(x_t, t)
    txt0, vec0 = tr.cache.text(tr.cache.empty_caption_index)
    with torch.no_grad():
        v_u = tr.model_forward(x_in, t, txt0.expand(b, *txt0.shape), vec0.expand(b, *vec0.shape), h, w, None)
        base = tr.model_forward(x_in, t, batch["txt"], batch["vec"], h, w, None)  # adapters are zero at init
        got = tr.lora_targets(batch["id"], v, x_in, t, batch["txt"], batch["vec"], h, w, None)
    kept = torch.tensor([fnmatch.fnmatchcase(i, _ID_GLOB) for i in batch["id"]])
    torch.testing.assert_close(got[~kept], (v_u + 2.5 * (v - v_u))[~kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[kept], base[kept], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="lora.guide=0.5"):
        _cfg(tiny_cache, tmp_path / "bad", base_file, "lora.guide=0.5")

"""`rectiflow train` smoke tests: a few steps write logs, checkpoint, exports; bad input: one-line errors."""

import json
import subprocess

import pytest
import torch

from conftest import PYTHON, TINY_TOML, overrides
from rectiflow.cli.main import main
from rectiflow.convert.transformer import load_transformer
from rectiflow.train.checkpoint import load_checkpoint
from rectiflow.train.metrics import read_metrics


def test_train_cli_smoke(tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(tiny_cache, out, "train.steps=4", "checkpoint.every=2", "logging.tensorboard=true",
                     'export.formats=["rectiflow", "bfl", "diffusers"]')
    assert main(["train", str(TINY_TOML), *args]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    rows = read_metrics(out / "logs" / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = out / "checkpoints" / "step-000000004"
    c = load_checkpoint(ckpt)
    assert c.step == 4 and c.config["train"]["steps"] == 4 and c.state["data"]["position"] == 4
    assert (ckpt / "config.toml").read_text().startswith("[model]")
    # the checkpoint's weights are a loadable rectiflow transformer file carrying the run config
    m = load_transformer(ckpt / "model.safetensors")
    assert all(torch.equal(v, c.model[k]) for k, v in m.state_dict().items())
    from rectiflow.io.safetensors_io import read_metadata

    saved = json.loads(read_metadata(ckpt / "model.safetensors")["rectiflow.train_config"])
    assert saved["data"]["batch_size"] == 4
    # exports: EMA weights in all three layouts, same numbers
    exp = out / "export"
    a = load_transformer(exp / "transformer.safetensors")
    assert all(torch.equal(v, c.ema[k]) for k, v in a.state_dict().items())
    for other in (load_transformer(exp / "transformer-bfl.safetensors"),
                  load_transformer(exp / "transformer-diffusers")):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in a.state_dict().items())
    # a second run into the same directory must not silently overwrite it
    assert main(["train", str(TINY_TOML), *args]) == 2
    assert "already has checkpoints; pass --resume" in capsys.readouterr().err
    # --resume of a finished run: nothing to do, still succeeds
    assert main(["train", str(TINY_TOML), *args, "--resume"]) == 0


def test_resolved_config_reruns(tiny_cache, tmp_path, capsys):
    args = overrides(tiny_cache, tmp_path, "optim.lr=3e-4")
    assert main(["train", str(TINY_TOML), *args, "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "saved.toml").write_text(text)
    assert main(["train", str(tmp_path / "saved.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text and "lr = 0.0003" in text


@pytest.mark.parametrize("args, message", [
    (["optim.lrr=1"], "error: unknown config key optim.lrr; valid keys in [optim]: lr,"),
    (["optim.lr=fast"], "error: optim.lr: expected float, got str 'fast'"),
    (["nosection.x=1"], "error: unknown config section 'nosection'"),
    (["train.steps"], "error: bad override 'train.steps'; write section.key=value"),
    (["optim.schedule=exp"], "error: optim.schedule='exp'; choose one of"),
    (["model.preset=huge"], "error: unknown transformer preset 'huge'"),
    (["flow.timesteps=gauss"], "error: unknown timestep sampler 'gauss'"),
    (["data.batch_size=5", "optim.accumulation=2"], "error: data.batch_size=5 is not divisible"),
    (["data.batch_size=64"], "error: no latent-size bucket of the cache has data.batch_size=64"),
    (["model.params={context_in_dim=128}"], "error: cache "),
    (["validation.holdout=24", "validation.every=1"], "error: validation.holdout=24 leaves no training"),
])
def test_bad_config_one_line_error(tiny_cache, tmp_path, capsys, args, message):
    base = overrides(tiny_cache, tmp_path / "run", "train.steps=1")
    assert main(["train", str(TINY_TOML), *base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


def test_bad_paths_one_line_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "config file" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[optim\nlr = 1")
    assert main(["train", str(tmp_path / "bad.toml")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert main(["train", str(TINY_TOML), f'data.cache="{tmp_path}"']) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["train", str(TINY_TOML), f'data.cache="{tmp_path}"', "--resume", str(tmp_path / "x")]) == 2


def test_subprocess_error_exit_code(cli_env):
    r = subprocess.run([PYTHON, "-m", "rectiflow", "train", str(TINY_TOML), "optim.lrr=1"], env=cli_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown config key optim.lrr")



@pytest.mark.parametrize("shift, expected", [("", None), ("3", 3.0), ("flux", "flux")])
def test_exported_bundle_takes_the_validation_sampling(tmp_path, shift, expected):
    """export.bundle: the bundle's sampling defaults are the validation sampler's, time shift included."""
    from types import SimpleNamespace

    from rectiflow.convert.transformer import build_transformer
    from rectiflow.sample.random_model import random_bundle
    from rectiflow.train.config import load_config
    from rectiflow.train.export import _bundle

    bundle = random_bundle(tmp_path / "random")
    cfg = load_config(TINY_TOML, [f"model.autoencoder={bundle / 'ae.safetensors'}",
                                  "validation.sample_steps=6", f'validation.shift="{shift}"',
                                  "validation.cfg_scale=2.5"])
    spec = json.loads((bundle / "model.json").read_text())["text_encoder"]
    cache = SimpleNamespace(manifest={"text_encoder": {"spec": spec}, "shards": [{"size": [32, 48]}]})
    _bundle(build_transformer("micro"), tmp_path / "out", cfg, cache.manifest)
    d = json.loads((tmp_path / "out" / "model.json").read_text())["defaults"]
    assert (d["steps"], d["shift"], d["cfg_scale"], d["width"], d["height"]) == (6, expected, 2.5, 32, 48)


@pytest.mark.parametrize("extra, cfg_scale, why", [
    ([], 4.0, "the guided default 4: trained with caption dropout 0.1"),  # configs/tiny.toml: dropout 0.1
    (["validation.cfg_scale=3.0"], 3.0, "validation.cfg_scale (trained with caption dropout 0.1)"),
    (["data.caption_dropout=0.0"], 1.0, "trained without caption dropout"),
    (['distill.teacher="t.safetensors"', "distill.teacher_cfg=3.0"], 1.0, "distilled into the model"),
])
def test_exported_bundle_cfg_default_follows_caption_dropout(tmp_path, extra, cfg_scale, why):
    """A model trained with caption dropout exports a guided default; the card says which and why; the bundle
    is named after the run (model.json, hence the PNG metadata's model name)."""
    from rectiflow.convert.bundle import load_bundle
    from rectiflow.convert.transformer import build_transformer
    from rectiflow.sample.random_model import random_bundle
    from rectiflow.train.config import load_config
    from rectiflow.train.export import _bundle

    bundle = random_bundle(tmp_path / "random")
    cfg = load_config(TINY_TOML, [f"model.autoencoder={bundle / 'ae.safetensors'}",
                                  f'train.out_dir="{tmp_path / "my-icons"}"', *extra])
    spec = json.loads((bundle / "model.json").read_text())["text_encoder"]
    manifest = {"text_encoder": {"spec": spec}, "shards": [{"size": [32, 32]}]}
    _bundle(build_transformer("micro"), tmp_path / "out", cfg, manifest)
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    assert card["defaults"]["cfg_scale"] == cfg_scale
    assert why in card["training"]["cfg_scale_default"]
    assert card["name"] == "my-icons" and load_bundle(tmp_path / "out").name == "my-icons"

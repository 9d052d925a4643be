"""train-ae: loss decreases, resume is exact, outputs load with data-derived scale/shift, CLI smoke."""

import json
import subprocess
import sys

import pytest
import torch

from rectiflow.convert.autoencoder import load_autoencoder
from rectiflow.errors import ConfigError
from rectiflow.train.autoencoder import AETrainConfig, latent_stats, train_autoencoder

TINY = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4, "z_channels": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rectiflow.data.shapes import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("shapes") / "data", 40, size=16, seed=1, progress=False)


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), preset=TINY, size=16, steps=30, batch_size=8, lr=3e-3, warmup=5,
                holdout=8, checkpoint_every=10, log_every=5, seed=3)
    base.update(kw)
    return AETrainConfig(**base)


def test_trains_and_writes_a_normalised_autoencoder(data, tmp_path):
    report = train_autoencoder(_cfg(data, tmp_path / "a", steps=60), progress=False)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert losses[-1] < 0.6 * losses[0]
    ae = load_autoencoder(tmp_path / "a" / "ae.safetensors")
    p = report["params"]
    assert ae.params.scale_factor == p["scale_factor"] and ae.params.shift_factor == p["shift_factor"]
    assert ae.params.resolution == 16 and report["heldout_psnr_db"] > 10
    from rectiflow.train.autoencoder import load_images

    imgs = load_images(str(data), 16, progress=False)[4:]  # the training images (holdout = min(8, 40 // 10))
    m, s = latent_stats(ae, imgs)
    assert abs(m - p["shift_factor"]) < 1e-5 and abs(1 / s - p["scale_factor"]) < 1e-4
    with torch.no_grad():
        z = torch.cat([ae.encode(imgs[i:i + 16].float() / 127.5 - 1) for i in range(0, len(imgs), 16)])
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-2  # unit-variance latents
    assert (tmp_path / "a" / "recon.png").is_file()


def test_resume_is_exact(data, tmp_path):
    import shutil

    train_autoencoder(_cfg(data, tmp_path / "full"), progress=False)
    # a run stopped after step 20 (its last checkpoint), resumed with the same config
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000000020",
                    tmp_path / "part" / "checkpoints" / "step-000000020")
    train_autoencoder(_cfg(data, tmp_path / "part"), resume=True, progress=False)
    a = load_autoencoder(tmp_path / "full" / "ae.safetensors").state_dict()
    b = load_autoencoder(tmp_path / "part" / "ae.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_config(data, tmp_path):
    with pytest.raises(ConfigError, match="unknown autoencoder preset"):
        _cfg(data, tmp_path, preset="nope")
    with pytest.raises(ConfigError, match="steps"):
        _cfg(data, tmp_path, steps=0)
    with pytest.raises(ConfigError, match="crop"):
        _cfg(data, tmp_path, crop=12)


def test_crop_resume_is_exact(data, tmp_path):
    import shutil

    train_autoencoder(_cfg(data, tmp_path / "full", crop=8), progress=False)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000000020",
                    tmp_path / "part" / "checkpoints" / "step-000000020")
    train_autoencoder(_cfg(data, tmp_path / "part", crop=8), resume=True, progress=False)
    a = load_autoencoder(tmp_path / "full" / "ae.safetensors").state_dict()
    b = load_autoencoder(tmp_path / "part" / "ae.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli(data, tmp_path, cli_env):
    r = subprocess.run([sys.executable, "-m", "rectiflow", "train-ae", "--data", str(data), "--out",
                        str(tmp_path / "o"), "--preset", json.dumps(TINY), "--size", "16", "--crop", "8",
                        "--steps", "4", "--batch-size", "4", "--no-progress"], capture_output=True, text=True,
                       env=cli_env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "held-out PSNR" in r.stdout and (tmp_path / "o" / "ae.safetensors").is_file()
    r = subprocess.run([sys.executable, "-m", "rectiflow", "train-ae", "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o2")], capture_output=True, text=True, env=cli_env,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1

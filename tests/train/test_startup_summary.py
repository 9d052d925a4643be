"""`train` says at start what it will do (model size, data, held-out split, steps) and, after the first
logged steps, the measured throughput and the time the rest will take."""

import logging

from conftest import TINY_TOML, overrides
from rectiflow.cli.main import main


def test_train_prints_a_startup_summary_and_the_expected_time(tiny_cache, tmp_path, caplog):
    args = overrides(tiny_cache, tmp_path / "run", "model.preset=micro", "train.steps=4", "train.log_every=2",
                     "validation.holdout=4", "validation.every=4")
    with caplog.at_level(logging.INFO):
        assert main(["train", str(TINY_TOML), *args]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "model: micro transformer, " in text and "M parameters (hidden " in text
    assert "data: 24 samples in " in text
    assert ": 20 to train on, 4 held out for validation; latents 16x4x4 (4 image tokens)" in text
    assert "steps: 4 of batch 4 (0.8 epochs), 4 to go from step 0; validation every 4" in text
    rates = [r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput:")]
    assert len(rates) == 1 and "samples/s" in rates[0] and "for the remaining 2 steps" in rates[0]


def test_our_autoencoder_files_are_called_rectiflow_layout(tmp_path, caplog):
    from rectiflow.convert.autoencoder import build_autoencoder, load_autoencoder, save_autoencoder

    path = save_autoencoder(build_autoencoder("tiny"), tmp_path / "ae.safetensors")
    with caplog.at_level(logging.INFO):
        load_autoencoder(path)
    assert any("(rectiflow layout," in r.getMessage() for r in caplog.records)

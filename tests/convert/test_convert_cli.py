"""`rectiflow convert`: exact conversions in every direction, dtype casts, one-line errors."""

import dataclasses
import json
import subprocess

import pytest
import torch

from rectiflow.cli.convert import parse_size
from rectiflow.cli.main import main
from rectiflow.convert.transformer import load_transformer, save_transformer
from rectiflow.errors import ConfigError
from rectiflow.io import safetensors_io as sio


def test_round_trip_via_cli_is_bit_exact(tmp_path, tiny, tiny_model, assert_same, capsys):
    ref = tiny_model.state_dict()
    src = save_transformer(tiny_model, tmp_path / "0.safetensors")  # rectiflow
    (tmp_path / "cfg.json").write_text(json.dumps(tiny.to_dict()))
    steps = [("bfl", "1.safetensors"), ("diffusers", "2"), ("diffusers", "3"), ("rectiflow", "4.safetensors"),
             ("bfl", "5.safetensors"), ("rectiflow", "6.safetensors")]
    for to, name in steps:
        dst = tmp_path / name
        args = ["convert", str(src), str(dst), "--to", to]
        if src.suffix and sio.read_metadata(src).get("rectiflow.format_version") is None:
            args += ["--config", str(tmp_path / "cfg.json")]  # a BFL file does not record TINY's axes_dim
        if name == "3":
            args += ["--max-shard-size", "30KB"]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and out.startswith(f"converted {src} (") and f"({to})" in out
        config = tiny if to == "bfl" else None
        assert_same(ref, load_transformer(dst, config=config).state_dict())
        src = dst
    assert len(list((tmp_path / "3").glob("*-of-*.safetensors"))) > 1
    # the BFL file is exactly the model's state dict under BFL names
    assert_same(ref, sio.load_tensors(tmp_path / "5.safetensors"))


def test_pipeline_folder_source_and_preset_config(tmp_path, make_model, assert_same):
    from rectiflow.models.transformer import TRANSFORMER_PRESETS

    m = make_model(TRANSFORMER_PRESETS["micro"])
    save_transformer(m, tmp_path / "pipe" / "transformer", "diffusers")
    assert main(["convert", str(tmp_path / "pipe"), str(tmp_path / "m.safetensors"), "--to", "bfl",
                 "--config", "micro"]) == 0
    assert_same(m.state_dict(), sio.load_tensors(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_cast(tmp_path, tiny_model, flag, dtype):
    src = save_transformer(tiny_model, tmp_path / "m.safetensors")
    assert main(["convert", str(src), str(tmp_path / "d"), "--to", "diffusers", "--dtype", flag]) == 0
    got = load_transformer(tmp_path / "d", dtype=None).state_dict()
    for k, v in tiny_model.state_dict().items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "back.safetensors"), "--to", "rectiflow",
                 "--dtype", "fp32"]) == 0
    back = load_transformer(tmp_path / "back.safetensors", dtype=None).state_dict()
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], got[k].float()) for k in got)


def test_subprocess_smoke(tmp_path, tiny_model, cli_env, python):
    src = save_transformer(tiny_model, tmp_path / "m.safetensors")
    r = subprocess.run([python, "-m", "rectiflow", "convert", str(src), str(tmp_path / "out"), "--to",
                        "diffusers"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("converted ") and "(diffusers)" in r.stdout and "parameters" in r.stdout
    assert "reading" in r.stderr and "writing" in r.stderr  # progress lines
    assert (tmp_path / "out" / "config.json").is_file()


def _error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err


def test_errors_are_one_line(tmp_path, tiny, make_model, tiny_model, capsys):
    src = str(save_transformer(tiny_model, tmp_path / "m.safetensors"))
    assert "does not exist" in _error(["convert", str(tmp_path / "nope"), "x", "--to", "bfl"], capsys)
    assert "--max-shard-size applies to --to diffusers only" in _error(
        ["convert", src, str(tmp_path / "x.safetensors"), "--to", "bfl", "--max-shard-size", "1GB"], capsys)
    assert "not a size" in _error(
        ["convert", src, str(tmp_path / "d"), "--to", "diffusers", "--max-shard-size", "lots"], capsys)
    assert "known presets" in _error(["convert", src, str(tmp_path / "x"), "--to", "bfl", "--config",
                                      "flux-pro"], capsys)
    assert "is a file" in _error(["convert", src, src, "--to", "diffusers"], capsys)
    sincos = save_transformer(make_model(dataclasses.replace(tiny, pos_embed="sincos")),
                              tmp_path / "s.safetensors")
    err = _error(["convert", str(sincos), str(tmp_path / "y"), "--to", "bfl"], capsys)
    assert "format='rectiflow'" in err
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    assert "pickle" in _error(["convert", str(tmp_path / "m.ckpt"), "x", "--to", "bfl"], capsys)
    # a bad --to is argparse's job: usage + exit 2
    with pytest.raises(SystemExit) as e:
        main(["convert", src, "x", "--to", "ckpt"])
    assert e.value.code == 2


def test_parse_size():
    assert parse_size("10GB") == 10**10 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2**31
    assert parse_size("1024") == 1024 and parse_size("1.5KB") == 1500
    for bad in ("", "GB", "-1MB", "5 parsecs"):
        with pytest.raises(ConfigError):
            parse_size(bad)

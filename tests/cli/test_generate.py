"""`rectiflow generate`: PNGs with both metadata chunks, byte-identical reruns, naming, errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from rectiflow.cli.generate import NO_DEFAULT_MODEL, output_paths
from rectiflow.cli.main import main
from rectiflow.convert.bundle import DEFAULT_MODEL_ENV, SamplingDefaults
from rectiflow.sample import random_bundle

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle") / "tiny-random"
    return random_bundle(root, defaults=SamplingDefaults(steps=2, width=32, height=32), name="tiny-random")


def _chunks(path):
    with Image.open(path) as im:
        return dict(im.text)


def test_generate_writes_png_with_both_chunks_and_is_deterministic(model, tmp_path, capsys):
    out1, out2 = tmp_path / "a.png", tmp_path / "b.png"
    args = ["generate", "a red circle", "--model", str(model), "--seed", "3", *FAST]
    assert main([*args, "-o", str(out1)]) == 0
    assert main([*args, "-o", str(out2)]) == 0
    assert capsys.readouterr().out.split() == [str(out1), str(out2)]
    assert out1.read_bytes() == out2.read_bytes()
    with Image.open(out1) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    text = _chunks(out1)
    lines = text["parameters"].splitlines()
    assert lines[0] == "a red circle"
    assert lines[1].startswith("Steps: 2, Sampler: euler, CFG scale: 1.0, Seed: 3, Size: 32x32, Model hash: ")
    assert "Model: tiny-random" in lines[1]
    js = json.loads(text["rectiflow"])
    assert js["prompt"] == "a red circle" and js["seed"] == 3 and js["steps"] == 2
    assert js["model"] == "tiny-random"
    assert len(js["model_hash"]) == 12 and js["sampler"] == "euler" and js["rectiflow_version"]
    assert main(["generate", "a red circle", "--model", str(model), "--seed", "4", *FAST,
                 "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes() != out1.read_bytes()


def test_generate_several_images_naming_and_cfg(model, tmp_path):
    rc = main(["generate", "a square", "--model", str(model), "-n", "2", "--cfg", "3", "--negative-prompt",
               "blur", "--sampler", "heun", "-o", str(tmp_path / "x.png"), *FAST])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["x-0.png", "x-1.png"]
    js = [json.loads(_chunks(tmp_path / f)["rectiflow"]) for f in files]
    assert [j["seed"] for j in js] == [0, 1]
    assert js[0]["negative_prompt"] == "blur" and js[0]["cfg_scale"] == 3.0 and js[0]["sampler"] == "heun"
    assert "Negative prompt: blur" in _chunks(tmp_path / "x-0.png")["parameters"]
    rc = main(["generate", "one", "two", "--model", str(model), "-o", str(tmp_path / "dir"), *FAST])
    assert rc == 0 and sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["image-0.png", "image-1.png"]


def test_output_paths():
    assert [p.name for p in output_paths("o.png", 1)] == ["o.png"]
    assert [p.name for p in output_paths("o.PNG", 2)] == ["o-0.PNG", "o-1.PNG"]
    assert [str(p) for p in output_paths("outdir", 2)] == ["outdir/image-0.png", "outdir/image-1.png"]


@pytest.mark.parametrize("extra, msg", [
    (["--width", "100"], "error: width 100 is not a positive multiple of 16; use e.g. 96"),
    (["--steps", "0"], "error: steps must be an integer >= 1, got 0"),
    (["-n", "0"], "error: -n must be >= 1"),
    (["--int8", "--dtype", "bf16"], "error: --int8 is a CPU float32 option"),
])
def test_bad_input_is_one_line(model, tmp_path, capsys, extra, msg):
    rc = main(["generate", "x", "--model", str(model), *FAST, *extra, "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(msg), err


def test_bad_sampler_is_refused_by_the_parser(model, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--model", str(model), "--sampler", "dpm"])
    assert e.value.code == 2 and "invalid choice: 'dpm'" in capsys.readouterr().err


def test_missing_or_wrong_model_path(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "nope"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "x", "--model", str(tmp_path / "empty"), *FAST]) == 2
    assert "is not a model bundle: expected model.json" in capsys.readouterr().err


def test_default_model_missing_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    import rectiflow.convert.bundle as bundle

    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)
    monkeypatch.setattr(bundle, "default_bundle_path", lambda: tmp_path / "no-assets")
    assert main(["generate", "x", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {NO_DEFAULT_MODEL}" and "recipes/shapes/run.sh" in err and "--model PATH" in err


def test_default_model_env_pointing_nowhere(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(tmp_path / "nowhere"))
    assert main(["generate", "x", *FAST]) == 2
    assert DEFAULT_MODEL_ENV in capsys.readouterr().err
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(tmp_path / "nowhere"))
    assert main(["generate", "x", *FAST]) == 2
    assert DEFAULT_MODEL_ENV in capsys.readouterr().err


def test_default_model_override_and_subprocess(model, tmp_path, cli_env):
    env = dict(cli_env, **{DEFAULT_MODEL_ENV: str(model)})
    out = tmp_path / "d.png"
    r = subprocess.run([sys.executable, "-m", "rectiflow", "generate", "a star", "-o", str(out), *FAST],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert json.loads(_chunks(out)["rectiflow"])["model"] == "tiny-random"


@pytest.mark.parametrize("value, recorded", [("none", None), ("flux", "flux"), ("3", 3.0)])
def test_shift_option(model, tmp_path, value, recorded):
    out = tmp_path / "s.png"
    assert main(["generate", "x", "--model", str(model), "--shift", value, *FAST, "-o", str(out)]) == 0
    assert json.loads(_chunks(out)["rectiflow"])["shift"] == recorded


def test_bad_shift_is_refused_by_the_parser(model, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", str(model), "--shift", "-2"])
    assert "the shift must be > 0" in capsys.readouterr().err


def test_cfg_interval_option_is_recorded_and_bad_values_refused(model, tmp_path, capsys):
    out = tmp_path / "i.png"
    assert main(["generate", "x", "--model", str(model), "--cfg", "3", "--cfg-interval", "0.5,1", *FAST,
                 "-o", str(out)]) == 0
    assert json.loads(_chunks(out)["rectiflow"])["cfg_interval"] == [0.5, 1.0]
    bad_values = (("0.8,0.2", "0 <= LO <= HI <= 1"), ("0.5", "two times LO,HI"), ("a,b", "two times LO,HI"))
    for bad, msg in bad_values:
        with pytest.raises(SystemExit):
            main(["generate", "x", "--model", str(model), "--cfg", "3", "--cfg-interval", bad])
        err = capsys.readouterr().err
        assert "--cfg-interval" in err and msg in err

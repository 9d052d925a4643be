"""`rectiflow lora info / merge / extract / convert / export` and `rectiflow generate --lora`."""

import json

import pytest
import torch

from rectiflow.cli.main import main
from rectiflow.convert.lora import load_lora, read_lora, save_lora
from rectiflow.convert.transformer import build_transformer, load_transformer, save_transformer
from rectiflow.nn.lora import add_lora, lora_modules


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    base = build_transformer("micro")
    save_transformer(base, tmp_path / "base.safetensors")
    add_lora(base, "x", rank=2, alpha=4, targets=["attn", "mlp"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in lora_modules(base):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.1)
    lora = save_lora(base, tmp_path / "x.safetensors", metadata={"trigger": "sks"})
    return tmp_path, tmp_path / "base.safetensors", lora


def test_info_convert_merge_extract(files, capsys):
    d, base, lora = files
    assert main(["lora", "info", str(lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["rank"] == 2 and info["alpha"] == 4.0
    assert info["targets"] == {"attn": 6, "mlp": 4} and info["trigger"] == "sks"
    assert main(["lora", "info", str(lora)]) == 0
    assert "kohya LoRA, 10 modules, rank 2, alpha 4.0" in capsys.readouterr().out

    assert main(["lora", "convert", str(lora), str(d / "x-d.safetensors"), "--to", "diffusers"]) == 0
    a, b = read_lora(lora).adapters, read_lora(d / "x-d.safetensors").adapters
    assert a.keys() == b.keys() and all(torch.equal(a[k].up, b[k].up) for k in a)

    assert main(["lora", "merge", str(base), str(lora), str(d / "merged.safetensors"), "--scale", "0.5"]) == 0
    merged = load_transformer(d / "merged.safetensors")
    ref = load_lora(load_transformer(base), lora, scale=0.5)
    mods = dict(ref.named_modules())
    for name, m in merged.named_modules():
        if name in a:
            want = mods[name].weight + 0.5 * 2.0 * a[name].up @ a[name].down
            torch.testing.assert_close(m.weight, want, rtol=1e-6, atol=1e-7)

    capsys.readouterr()
    assert main(["lora", "extract", str(base), str(d / "merged.safetensors"), str(d / "ex.safetensors"),
                 "--rank", "2", "--min-change", "1e-9"]) == 0
    out = capsys.readouterr().out
    assert "kept energy 1.0000" in out  # the difference is exactly rank 2
    ex = read_lora(d / "ex.safetensors").adapters
    assert ex.keys() == a.keys()
    for k in a:  # the extracted update reproduces the merged one
        torch.testing.assert_close(ex[k].up @ ex[k].down, a[k].up @ a[k].down, rtol=1e-4, atol=1e-6)


def test_bad_inputs_print_one_line(files, capsys):
    d, base, lora = files
    assert main(["lora", "extract", str(base), str(base), str(d / "e.safetensors"), "--rank", "100"]) == 2
    assert "error: --rank 100 is larger than layer" in capsys.readouterr().err
    assert main(["lora", "merge", str(base), str(lora), str(d / "m.safetensors"), "--scale", "lots"]) == 2
    assert "error: LoRA scale must be a number, got 'lots'" in capsys.readouterr().err
    assert main(["lora", "info", str(d / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (d / "x.pt").write_bytes(b"\x80\x04K\x01.")
    assert main(["lora", "info", str(d / "x.pt")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_generate_with_lora_changes_the_image_and_records_it(files, tmp_path, capsys):
    from PIL import Image

    from rectiflow.sample.png import read_png_settings

    d, base, lora = files
    bundle = tmp_path / "bundle"
    from rectiflow.convert.autoencoder import build_autoencoder
    from rectiflow.convert.bundle import SamplingDefaults, save_bundle

    save_bundle(bundle, load_transformer(base), build_autoencoder("tiny"), {"kind": "minilm"},
                SamplingDefaults(steps=2, width=32, height=32))
    common = ["generate", "a red circle", "--model", str(bundle), "--no-progress", "--seed", "3"]
    assert main([*common, "-o", str(tmp_path / "plain.png")]) == 0
    two = ["--lora", f"{lora}:0.8", "--lora", str(lora)]
    assert main([*common, "-o", str(tmp_path / "lora.png"), *two]) == 0
    import numpy as np

    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("plain", "lora"))
    assert np.abs(a - b).max() > 0
    _, settings = read_png_settings(tmp_path / "lora.png")
    assert [x["scale"] for x in settings["loras"]] == [0.8, 1.0]
    capsys.readouterr()
    assert main([*common, "-o", str(tmp_path / "x.png"), "--lora", f"{lora}:strong"]) == 2
    assert "error: LoRA scale must be a number" in capsys.readouterr().err

"""Bad input to the transformer loader: each case is a one-line RectiflowError, checked before any data is
used. Pickles are refused without being unpickled."""

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from rectiflow.convert.transformer import build_transformer, load_transformer, save_transformer
from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.io import safetensors_io as sio


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


class Sentinel:
    """Unpickling this creates a file: proof that a loader did (or did not) unpickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickle_file(path: Path, sentinel: Path, kind: str) -> Path:
    payload = {"state_dict": {"img_in.weight": Sentinel(sentinel)}}
    if kind == "zip":  # what torch.save writes: a zip archive with a pickle inside
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=kind))
    # the sentinel does work: unpickling really would create the file
    assert not sentinel.exists()
    return path


@pytest.mark.parametrize("name,kind", [
    ("model.ckpt", 2), ("model.pt", "zip"), ("pytorch_model.bin", 4), ("model.pth", 5),
    ("disguised.safetensors", 4), ("disguised-zip.safetensors", "zip"),
])
def test_pickle_refused_without_unpickling(tmp_path, name, kind):
    sentinel = tmp_path / "UNPICKLED"
    path = _pickle_file(tmp_path / name, sentinel, kind)
    with pytest.raises(FormatError) as e:
        load_transformer(path)
    assert "pickle" in one_line(e) and "safetensors" in one_line(e)
    assert not sentinel.exists()
    if kind != "zip":  # control: the same bytes, unpickled, do trigger the sentinel
        pickle.loads(path.read_bytes())
        assert sentinel.exists()


def test_diffusers_folder_with_only_bin_weights_refused(tmp_path):
    sentinel = tmp_path / "UNPICKLED"
    d = tmp_path / "transformer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    _pickle_file(d / "diffusion_pytorch_model.bin", sentinel, 4)
    with pytest.raises(FormatError, match="pickle") as e:
        load_transformer(tmp_path)
    one_line(e)
    assert not sentinel.exists()


def test_truncated_safetensors(tmp_path):
    path = save_transformer(build_transformer("micro"), tmp_path / "m.safetensors", "bfl")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="truncated") as e:
        load_transformer(path)
    assert "100 missing" in one_line(e)
    path.write_bytes(data[:50])  # cut inside the JSON header
    with pytest.raises(FormatError, match="truncated") as e:
        load_transformer(path)
    one_line(e)


@pytest.mark.parametrize("content,match", [
    (b"", "too short"),
    (b"\x00" * 64, "not a safetensors file"),
    (b"GGUF" + b"\x00" * 60, "GGUF"),
    ((12).to_bytes(8, "little") + b"not json!!!!", "bad JSON"),
])
def test_not_a_safetensors_file(tmp_path, content, match):
    path = tmp_path / "weird.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=match) as e:
        load_transformer(path)
    one_line(e)


def test_corrupt_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    text = json.dumps(header).encode()
    path = tmp_path / "c.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x00" * 12)
    with pytest.raises(FormatError, match="overlap or gap") as e:
        sio.read_header(path)
    one_line(e)


def _fake(tmp_path, keys: dict[str, tuple], name="x.safetensors") -> Path:
    return sio.save_safetensors({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / name)


@pytest.mark.parametrize("keys,match", [
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3),
      "decoder.conv_out.weight": (3, 8, 3, 3)}, "FLUX autoencoder \\(ae.safetensors\\)"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "encoder.down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
      "decoder.conv_out.weight": (3, 8, 3, 3)}, "diffusers AutoencoderKL"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2),
      "model.diffusion_model.x_embedder.proj.weight": (2, 16, 2, 2)}, "SD3"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
      "model.diffusion_model.label_emb.0.0.weight": (4, 4)}, "SDXL UNet"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}, "SD 1.x / 2.x UNet"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (4, 4)}, "CLIP text encoder"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 4)}, "LoRA"),
    ({"foo.weight": (3,), "bar.bias": (2,)}, "not a FLUX transformer checkpoint.*foo.weight"),
])
def test_other_architectures_are_named(tmp_path, keys, match):
    with pytest.raises(FormatError, match=match) as e:
        load_transformer(_fake(tmp_path, keys))
    one_line(e)


def test_wrong_config_reports_keys_and_guess(tmp_path):
    m = build_transformer("micro")
    path = save_transformer(m, tmp_path / "m.safetensors", "bfl")
    bigger = {**m.params.to_dict(), "guidance_embed": True, "depth": 2}
    with pytest.raises(FormatError) as e:
        load_transformer(path, config=bigger)
    msg = one_line(e)
    assert "28 missing (guidance_in.in_layer.weight" in msg and "the file looks like micro" in msg
    wider = {**m.params.to_dict(), "vec_in_dim": 32}
    with pytest.raises(FormatError, match=r"mis-shaped \(vector_in.in_layer.weight \[64, 384\] vs expected"):
        load_transformer(path, config=wider)


def test_incomplete_file_lists_missing_keys(tmp_path):
    sd = build_transformer("micro").state_dict()
    del sd["single_blocks.0.linear2.weight"], sd["final_layer.linear.bias"]
    sd["extra.weight"] = torch.zeros(2)
    path = sio.save_safetensors(sd, tmp_path / "m.safetensors")
    with pytest.raises(FormatError) as e:
        load_transformer(path, config="micro")
    msg = one_line(e)
    assert "2 missing" in msg and "1 unexpected (extra.weight)" in msg


def test_unknown_preset(tmp_path):
    path = save_transformer(build_transformer("micro"), tmp_path / "m.safetensors")
    for call in (lambda: load_transformer(path, config="flux-pro"), lambda: build_transformer("flux-pro")):
        with pytest.raises(ConfigError, match="flux-schnell, flux-dev") as e:
            call()
        one_line(e)


@pytest.mark.parametrize("name", ["nope.safetensors", "nope_dir"])
def test_missing_path(tmp_path, name):
    with pytest.raises(FormatError, match="does not exist") as e:
        load_transformer(tmp_path / name)
    one_line(e)


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="without config.json"):
        load_transformer(tmp_path / "empty")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FormatError, match="AutoencoderKL, not a FluxTransformer2DModel"):
        load_transformer(vae)
    # an index naming a shard that is not there
    save_transformer(build_transformer("micro"), tmp_path / "t", "diffusers", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "t").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FormatError, match="missing from") as e:
        load_transformer(tmp_path / "t")
    one_line(e)


def test_save_refuses_wrong_targets(tmp_path):
    m = build_transformer("micro")
    (tmp_path / "f.safetensors").write_bytes(b"x")
    with pytest.raises(FormatError, match="is a file"):
        save_transformer(m, tmp_path / "f.safetensors", "diffusers")
    with pytest.raises(FormatError, match="is a directory"):
        save_transformer(m, tmp_path, "bfl")
    with pytest.raises(FormatError, match="unknown format"):
        save_transformer(m, tmp_path / "x", "ckpt")
    with pytest.raises(RectiflowError, match="rectiflow Flux model"):
        save_transformer(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")

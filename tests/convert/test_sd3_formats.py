"""SD3 / SD3.5 checkpoints: Stability single files (plain and all-in-one), diffusers folders and rectiflow
files, family detection in load_transformer, `rectiflow convert` for SD3, one-line errors."""

import dataclasses
import json

import pytest
import torch

from rectiflow.cli.main import main
from rectiflow.convert.sd3 import infer_sd3_params, inspect_sd3
from rectiflow.convert.transformer import build_transformer, load_transformer, save_transformer
from rectiflow.errors import FormatError
from rectiflow.io import safetensors_io as sio
from rectiflow.models.sd3 import MMDiT, SD3Params

# Not presets. Head dim 64 (Stability's), so the shapes alone determine the config even without QK-norm.
MEDIUM = SD3Params(hidden_size=128, num_heads=2, depth=3, in_channels=4, out_channels=4, context_in_dim=40,
                   vec_in_dim=24, pos_embed_max_size=12, sample_size=24)
MEDIUM35 = dataclasses.replace(MEDIUM, qk_norm=True, dual_attention_layers=(0, 1))


def random_sd3(params: SD3Params, seed: int = 0) -> MMDiT:
    model = build_transformer(params)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():  # parameters and the position table
            t.copy_(torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize("params", [MEDIUM, MEDIUM35], ids=["sd3-medium-like", "sd3.5-medium-like"])
def test_round_trips_bit_exact(tmp_path, params, assert_same):
    model = random_sd3(params)
    ref = model.state_dict()
    single = save_transformer(model, tmp_path / "sd3.safetensors", format="stability")
    keys = sio.read_header(single).tensors
    assert all(k.startswith("model.diffusion_model.") for k in keys) and len(keys) == len(ref)
    src = single
    for fmt, name in [("diffusers", "d"), ("rectiflow", "r.safetensors"), ("stability", "s.safetensors"),
                      ("diffusers", "d2")]:
        loaded = load_transformer(src)
        assert isinstance(loaded, MMDiT)
        assert loaded.params.dual_attention_layers == params.dual_attention_layers
        assert_same(ref, loaded.state_dict())
        src = save_transformer(loaded, tmp_path / name, format=fmt)
    assert_same(ref, load_transformer(src).state_dict())
    # single files do not record sample_size (only the fresh table's scale); rectiflow files keep it
    assert load_transformer(tmp_path / "r.safetensors").params == dataclasses.replace(params, sample_size=128)
    assert load_transformer(save_transformer(model, tmp_path / "x.safetensors")).params == params


def test_diffusers_folder_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = random_sd3(MEDIUM35)
    save_transformer(model, tmp_path / "pipe" / "transformer", format="diffusers")
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 6, generator=g), torch.rand(1, generator=g)
    y, ctx = torch.randn(1, 24, generator=g), torch.randn(1, 5, 40, generator=g)
    with torch.no_grad():
        out = model(x, t, y=y, context=ctx)
        expect = ref(hidden_states=x, timestep=1000 * t, pooled_projections=y,
                     encoder_hidden_states=ctx).sample
    assert ((out - expect).norm() / expect.norm()).item() <= 1e-5
    assert load_transformer(tmp_path / "pipe").params == MEDIUM35  # the pipeline folder works too


def test_all_in_one_single_file(tmp_path, assert_same):
    """Stability's all-in-one files hold the text encoders and the autoencoder beside the transformer."""
    model = random_sd3(MEDIUM)
    tensors = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    clip_l = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"
    tensors |= {clip_l: torch.ones(3, 2),
                "text_encoders.t5xxl.transformer.shared.weight": torch.ones(3, 2),
                "first_stage_model.decoder.conv_in.weight": torch.ones(2, 2)}
    sio.save_safetensors(tensors, tmp_path / "sd3_medium_incl_clips_t5xxlfp8.safetensors")
    src = inspect_sd3(tmp_path / "sd3_medium_incl_clips_t5xxlfp8.safetensors")
    assert src.format == "stability" and src.prefix == "model.diffusion_model." and len(src.tensors) == len(
        model.state_dict())
    assert_same(model.state_dict(), load_transformer(src.path).state_dict())


def test_config_inferred_from_shapes():
    for p in (MEDIUM, MEDIUM35, dataclasses.replace(MEDIUM35, num_heads=4)):  # head dim 32 from ln_q
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in MMDiT(p).state_dict().items()}
        assert infer_sd3_params(shapes) == dataclasses.replace(p, sample_size=128)


def test_sd3_file_with_a_flux_config(tmp_path):
    path = save_transformer(random_sd3(MEDIUM), tmp_path / "sd3.safetensors", format="stability")
    with pytest.raises(FormatError, match=r"is an SD3 transformer \(a custom SD3 .*not FLUX: config 'tiny'"):
        load_transformer(path, config="tiny")


def test_flux_file_with_an_sd3_config(tmp_path, tiny_model):
    path = save_transformer(tiny_model, tmp_path / "flux.safetensors")
    with pytest.raises(FormatError, match=r"is a FLUX transformer .*not SD3: config 'sd3-micro'"):
        load_transformer(path, config="sd3-micro")


def test_sd35_medium_file_with_a_config_lacking_dual_attention(tmp_path):
    path = save_transformer(random_sd3(MEDIUM35), tmp_path / "sd35m.safetensors", format="stability")
    with pytest.raises(FormatError) as e:
        load_transformer(path, config=dataclasses.replace(MEDIUM35, dual_attention_layers=()).to_dict())
    msg = str(e.value)
    assert "\n" not in msg
    assert "dual attention in blocks [0, 1] in the file, none in the config; " in msg
    assert "mis-shaped" in msg and "unexpected (joint_blocks.0.x_block.attn2." in msg


def test_wrong_format_names(tmp_path, tiny_model):
    with pytest.raises(FormatError, match="bfl is FLUX's single-file format; SD3's is stability"):
        save_transformer(random_sd3(MEDIUM), tmp_path / "x.safetensors", format="bfl")
    with pytest.raises(FormatError, match="stability is SD3's single-file format"):
        save_transformer(tiny_model, tmp_path / "y.safetensors", format="stability")


def test_convert_cli(tmp_path, capsys, assert_same):
    model = random_sd3(MEDIUM35)
    src = save_transformer(model, tmp_path / "sd35.safetensors", format="stability")
    assert main(["convert", str(src), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "r.safetensors"), "--to", "rectiflow",
                 "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "(diffusers) -> " in out and "(rectiflow)" in out
    assert_same(model.state_dict(), load_transformer(tmp_path / "d").state_dict())
    loaded = load_transformer(tmp_path / "r.safetensors", dtype=None)
    assert loaded.x_embedder.proj.weight.dtype == torch.bfloat16
    cfg = json.loads(sio.read_metadata(tmp_path / "r.safetensors")["rectiflow.config"])
    assert cfg["dual_attention_layers"] == [0, 1]

"""FLUX autoencoder: parity with diffusers' AutoencoderKL on identical random weights, formats, errors."""

import json

import pytest
import torch

from rectiflow.convert.autoencoder import (
    bfl_to_diffusers_ae,
    build_autoencoder,
    diffusers_to_bfl_ae,
    load_autoencoder,
    save_autoencoder,
)
from rectiflow.errors import ConfigError, FormatError
from rectiflow.models.autoencoder import AE_PRESETS, AutoEncoderParams

diffusers = pytest.importorskip("diffusers")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _diffusers_ae(p: AutoEncoderParams):
    n = len(p.ch_mult)
    torch.manual_seed(0)
    ae = diffusers.AutoencoderKL(
        in_channels=p.in_channels, out_channels=p.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks, latent_channels=p.z_channels, norm_num_groups=p.norm_groups,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor, sample_size=p.resolution)
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping cannot hide
        for name, t in ae.named_parameters():
            if "norm" in name:
                t.add_(0.1 * torch.randn_like(t))
            elif name.endswith("bias"):
                t.normal_(0, 0.05)
    return ae.eval()


PARAMS = [AE_PRESETS["tiny"], AutoEncoderParams(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=16,
                                                norm_groups=8)]


@pytest.mark.parametrize("p", PARAMS, ids=["tiny", "3-level"])
def test_parity_with_diffusers(p, tmp_path):
    ref = _diffusers_ae(p)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "vae").eval()
    assert ours.params == p
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        want_z = (mean - p.shift_factor) * p.scale_factor  # diffusers' FluxPipeline latent normalisation
        z = ours.encode(x)
        assert z.shape == (2, p.z_channels, 32 // p.downsample, 48 // p.downsample)
        assert _rel(z, want_z) < 1e-5
        want_x = ref.decode(z / p.scale_factor + p.shift_factor).sample
        assert _rel(ours.decode(z), want_x) < 1e-5


def test_key_conversion_round_trips_bit_exactly(tmp_path):
    p = PARAMS[1]
    torch.manual_seed(0)
    ae = build_autoencoder(p)
    sd = ae.state_dict()
    back = diffusers_to_bfl_ae(bfl_to_diffusers_ae(sd, p), p)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    ref = _diffusers_ae(p)
    assert set(bfl_to_diffusers_ae(sd, p)) == set(ref.state_dict())  # names diffusers itself uses


@pytest.mark.parametrize("fmt", ["rectiflow", "bfl", "diffusers"])
def test_save_load_round_trip(fmt, tmp_path):
    p = AutoEncoderParams(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4, scale_factor=0.5,
                          shift_factor=0.25)
    torch.manual_seed(1)
    ae = build_autoencoder(p)
    dst = tmp_path / ("vae" if fmt == "diffusers" else "ae.safetensors")
    save_autoencoder(ae, dst, format=fmt)
    config = p if fmt == "bfl" else None  # BFL files carry no norm_groups / scale / shift
    back = load_autoencoder(dst, config=config)
    assert back.params == p
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), back.state_dict().values()))


def test_bfl_file_without_config_infers_flux_defaults(tmp_path):
    p = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1)  # no preset; norm_groups 32 as FLUX
    save_autoencoder(build_autoencoder(p), tmp_path / "ae.safetensors", format="bfl")
    back = load_autoencoder(tmp_path / "ae.safetensors")
    assert back.params == p and back.params.scale_factor == 0.3611 and back.params.shift_factor == 0.1159


def test_flux_preset_matches_published_ae():
    m = build_autoencoder("flux", device="meta")
    sd = m.state_dict()
    # BFL ae.safetensors: 244 tensors, 83.8M parameters; spot-check published shapes.
    assert len(sd) == 244
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert abs(sum(t.numel() for t in sd.values()) - 83_819_683) == 0


def test_any_size_divisible_by_8_and_errors():
    ae = build_autoencoder("tiny").eval()
    with torch.no_grad():
        assert ae.encode(torch.zeros(1, 3, 24, 40)).shape == (1, 16, 3, 5)
        assert ae.decode(torch.zeros(1, 16, 3, 5)).shape == (1, 3, 24, 40)
    with pytest.raises(ConfigError, match="divisible by 8"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ConfigError, match=r"\[B, 16, H, W\]"):
        ae.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ConfigError, match="unknown autoencoder preset"):
        build_autoencoder("nope")
    with pytest.raises(ConfigError, match="norm_groups"):
        AutoEncoderParams(ch=12, norm_groups=32)


def test_sampling_uses_the_generator():
    ae = build_autoencoder("tiny").eval()
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and not torch.equal(a, ae.encode(x))


def test_bad_files(tmp_path):
    (tmp_path / "ae.ckpt").write_bytes(b"\x80\x04junk")
    with pytest.raises(FormatError):
        load_autoencoder(tmp_path / "ae.ckpt")
    from rectiflow.convert.transformer import build_transformer, save_transformer

    save_transformer(build_transformer("micro"), tmp_path / "t.safetensors", format="bfl")
    with pytest.raises(FormatError, match="not a FLUX autoencoder"):
        load_autoencoder(tmp_path / "t.safetensors")
    save_autoencoder(build_autoencoder("tiny"), tmp_path / "ae.safetensors", format="rectiflow")
    with pytest.raises(FormatError, match="does not match"):
        load_autoencoder(tmp_path / "ae.safetensors", config="small")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FormatError, match="quant_conv"):
        load_autoencoder(tmp_path / "sd")
    with pytest.raises(FormatError, match="does not exist"):
        load_autoencoder(tmp_path / "missing")

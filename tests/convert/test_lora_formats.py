"""LoRA files: parity with diffusers' FluxPipeline.load_lora_weights, exact round trips, every bad input."""

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from rectiflow.convert.flux_keys import bfl_to_diffusers
from rectiflow.convert.lora import load_lora, parse_lora_arg, read_lora, save_lora, write_lora
from rectiflow.errors import ConfigError, FormatError
from rectiflow.models.transformer import TRANSFORMER_PRESETS, Flux, image_ids, text_ids
from rectiflow.nn.lora import add_lora, lora_modules, remove_lora

diffusers = pytest.importorskip("diffusers")

# hidden 128, 2 heads, 2 + 2 blocks
P = dataclasses.replace(
    TRANSFORMER_PRESETS["micro"], hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2
)
# what diffusers' kohya reader applies at this size: it drops the global layers (keys without its
# `transformer.` prefix) and splits linear1 only at FLUX's 3072 width (lora_conversion_utils.py)
KOHYA_PARITY_TARGETS = [
    "*_attn.qkv",
    "*_attn.proj",
    "single_blocks.*.linear2",
    "mlp",
    "*_mod.lin",
    "*.modulation.lin",
]


def _ours(seed=0):
    torch.manual_seed(seed)
    m = Flux(P).eval()
    with torch.no_grad():
        for t in m.parameters():
            t.normal_(0.0, 0.5 if t.ndim == 1 else 1.0 / t.shape[1] ** 0.5)
    return m


def _pipe(model):
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=P.in_channels,
        out_channels=P.out_channels,
        num_layers=P.depth,
        num_single_layers=P.depth_single_blocks,
        attention_head_dim=P.head_dim,
        num_attention_heads=P.num_heads,
        joint_attention_dim=P.context_in_dim,
        pooled_projection_dim=P.vec_in_dim,
        guidance_embeds=False,
        axes_dims_rope=P.axes_dim,
    )
    from rectiflow.nn.lora import base_state_dict

    ref.load_state_dict(bfl_to_diffusers(base_state_dict(model), P), strict=True)
    return diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=ref.eval(),
    )


def _x(b=2):
    g = torch.Generator().manual_seed(1)
    return dict(
        img=torch.randn(b, 24, P.in_channels, generator=g),
        txt=torch.randn(b, 5, P.context_in_dim, generator=g),
        y=torch.randn(b, P.vec_in_dim, generator=g),
        t=torch.rand(b, generator=g),
    )


@torch.no_grad()
def _run_ours(m, x):
    b = x["img"].shape[0]
    return m(x["img"], image_ids(b, 8, 12), x["txt"], text_ids(b, 5), x["t"], x["y"])


@torch.no_grad()
def _run_ref(pipe, x):
    b = x["img"].shape[0]
    return pipe.transformer(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["t"],
        img_ids=image_ids(b, 8, 12)[0],
        txt_ids=text_ids(b, 5)[0],
        return_dict=False,
    )[0]


def _trained(m, name="t", rank=4, alpha=8.0, targets="all", seed=3):
    add_lora(m, name, rank=rank, alpha=alpha, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lora_modules(m, name):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.2)
    return m


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("fmt,targets", [("diffusers", "all"), ("kohya", KOHYA_PARITY_TARGETS)])
def test_diffusers_load_lora_weights_matches_ours(tmp_path, fmt, targets):
    m = _trained(_ours(), targets=targets)
    path = save_lora(m, tmp_path / f"x-{fmt}.safetensors", format=fmt)
    pipe = _pipe(m)
    x = _x()
    base = _run_ref(pipe, x)
    pipe.load_lora_weights(str(path))
    expect, got = _run_ref(pipe, x), _run_ours(m, x)
    assert (expect - base).abs().max() > 1e-2 * base.abs().max()  # the LoRA changes the output
    _close(got, expect)
    # and the file read back onto a fresh model gives the same
    fresh = load_lora(_ours(), path)
    _close(_run_ours(fresh, x), expect)


def _foreign_diffusers_file(path, with_alpha_keys):
    """A diffusers-layout file as other trainers write it: split q/k/v of different ranks (k absent in one
    stream), proj_mlp, norm layers, a `transformer.` prefix, alphas as keys or not at all."""
    g = torch.Generator().manual_seed(5)
    h, mlp = P.hidden_size, int(P.hidden_size * P.mlp_ratio)
    mods = {
        "transformer_blocks.0.attn.to_q": (2, h, h),
        "transformer_blocks.0.attn.to_k": (3, h, h),
        "transformer_blocks.0.attn.to_v": (2, h, h),
        "transformer_blocks.1.attn.add_q_proj": (2, h, h),
        "transformer_blocks.1.attn.add_v_proj": (4, h, h),
        "transformer_blocks.0.norm1.linear": (2, h, 6 * h),
        "single_transformer_blocks.1.attn.to_q": (2, h, h),
        "single_transformer_blocks.1.proj_mlp": (3, h, mlp),
        "single_transformer_blocks.0.proj_out": (2, h + mlp, h),
        "norm_out.linear": (2, h, 2 * h),
        "x_embedder": (2, P.in_channels, h),
    }
    sd = {}
    for i, (m, (r, fin, fout)) in enumerate(mods.items()):
        sd[f"transformer.{m}.lora_A.weight"] = torch.randn(r, fin, generator=g) * 0.3
        sd[f"transformer.{m}.lora_B.weight"] = torch.randn(fout, r, generator=g) * 0.3
        if with_alpha_keys:
            sd[f"transformer.{m}.alpha"] = torch.tensor(float(r * (1 + i % 3)))
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("with_alpha_keys", [False, True], ids=["no-alpha", "alpha-keys"])
def test_foreign_diffusers_file_split_qkv_lands_in_fused_rows(tmp_path, with_alpha_keys):
    path = tmp_path / "foreign.safetensors"
    sd = _foreign_diffusers_file(path, with_alpha_keys)
    m = _ours()
    pipe = _pipe(m)
    pipe.load_lora_weights(str(path))
    x = _x()
    _close(_run_ours(load_lora(m, path), x), _run_ref(pipe, x))
    if not with_alpha_keys:  # written back as diffusers: the very same tensors
        back = load_file(str(save_lora(m, tmp_path / "back.safetensors", format="diffusers")))
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def _same_adapters(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up), k
        assert a[k].alpha == b[k].alpha, k


def _xlabs_file(path):
    g = torch.Generator().manual_seed(7)
    h, r = P.hidden_size, 4
    sd = {}
    for i in range(P.depth):
        for n, out in (("qkv_lora1", 3 * h), ("qkv_lora2", 3 * h), ("proj_lora1", h), ("proj_lora2", h)):
            sd[f"double_blocks.{i}.processor.{n}.down.weight"] = torch.randn(r, h, generator=g) * 0.3
            sd[f"double_blocks.{i}.processor.{n}.up.weight"] = torch.randn(out, r, generator=g) * 0.3
    sd["single_blocks.1.processor.qkv_lora.down.weight"] = torch.randn(r, h, generator=g) * 0.3
    sd["single_blocks.1.processor.qkv_lora.up.weight"] = torch.randn(3 * h, r, generator=g) * 0.3
    save_file(sd, str(path))


def _bfl_peft_file(path, prefix):
    g = torch.Generator().manual_seed(8)
    h = P.hidden_size
    sd = {
        f"{prefix}double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, h, generator=g),
        f"{prefix}double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * h, 4, generator=g) * 0.1,
        f"{prefix}double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0),
        f"{prefix}single_blocks.1.linear1.lora_A.weight": torch.randn(4, h, generator=g),
        f"{prefix}single_blocks.1.linear1.lora_B.weight": torch.randn(7 * h, 4, generator=g) * 0.1,
    }
    save_file(sd, str(path))
    return sd


def test_xlabs_file_matches_diffusers(tmp_path):
    path = tmp_path / "xlabs.safetensors"
    _xlabs_file(path)
    m = _ours()
    pipe = _pipe(m)
    pipe.load_lora_weights(str(path))
    x = _x()
    _close(_run_ours(load_lora(m, path), x), _run_ref(pipe, x))


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer."])
def test_bfl_named_peft_file(tmp_path, prefix):
    path = tmp_path / "bfl.safetensors"
    sd = _bfl_peft_file(path, prefix)
    f = read_lora(path, P)
    assert f.format == "bfl"
    a = f.adapters["double_blocks.0.img_attn.qkv"]
    assert torch.equal(a.up, sd[f"{prefix}double_blocks.0.img_attn.qkv.lora_B.weight"]) and a.alpha == 2.0
    assert f.adapters["single_blocks.1.linear1"].alpha == 4.0  # no alpha key: alpha = rank
    m = load_lora(_ours(), path)
    ref = _ours()
    with torch.no_grad():
        for name, t in f.adapters.items():
            dict(ref.named_modules())[name].weight += t.alpha / t.down.shape[0] * t.up @ t.down
    x = _x()
    _close(_run_ours(m, x), _run_ours(ref, x))


def test_every_read_layout_round_trips_through_every_written_one(tmp_path):
    ours = _trained(_ours(), targets="all")
    sources = {
        "kohya": save_lora(ours, tmp_path / "k.safetensors", format="kohya"),
        "diffusers": save_lora(ours, tmp_path / "d.safetensors", format="diffusers"),
        "xlabs": tmp_path / "x.safetensors",
        "bfl": tmp_path / "b.safetensors",
        "foreign-diffusers": tmp_path / "f.safetensors",
    }
    _xlabs_file(sources["xlabs"])
    _bfl_peft_file(sources["bfl"], "diffusion_model.")
    _foreign_diffusers_file(sources["foreign-diffusers"], with_alpha_keys=True)
    for name, src in sources.items():
        first = read_lora(src, P).adapters
        for fmt in ("kohya", "diffusers"):
            out = write_lora(first, tmp_path / f"{name}-{fmt}.safetensors", fmt, P)
            _same_adapters(read_lora(out, P).adapters, first)
            again = write_lora(read_lora(out).adapters, tmp_path / f"{name}-{fmt}-2.safetensors", fmt)
            _same_adapters(read_lora(again, P).adapters, first)  # params inferred from the file itself


def test_metadata_is_modelspec_with_our_fields(tmp_path):
    m = _trained(_ours(), rank=4, alpha=8.0, targets="attn")
    path = save_lora(m, tmp_path / "m.safetensors", metadata={"trigger": "sks", "targets": ["attn"]})
    f = read_lora(path)
    assert f.metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert f.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert f.metadata["modelspec.trigger_phrase"] == "sks"
    assert f.metadata["ss_network_dim"] == "4" and f.metadata["ss_network_alpha"] == "8.0"
    assert f.info["base_hash"] and f.info["targets"] == ["attn"]


def test_stacked_files_with_scales(tmp_path):
    a = save_lora(_trained(_ours(), "a", seed=3), tmp_path / "a.safetensors")
    b = save_lora(
        _trained(_ours(), "b", rank=2, alpha=2.0, targets="mlp", seed=4), tmp_path / "b.safetensors"
    )
    m = load_lora(load_lora(_ours(), a, scale=0.5), b, scale=-1.0)
    ref = _ours()
    with torch.no_grad():
        for f, s in ((a, 0.5), (b, -1.0)):
            for name, t in read_lora(f, P).adapters.items():
                dict(ref.named_modules())[name].weight += s * t.alpha / t.down.shape[0] * t.up @ t.down
    x = _x()
    _close(_run_ours(m, x), _run_ours(ref, x))
    remove_lora(m)
    _close(_run_ours(m, x), _run_ours(_ours(), x))


# ---------------------------------------------------------------------------------------------- bad input
def test_sdxl_unet_lora_is_named(tmp_path):
    p = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        },
        str(p),
    )
    with pytest.raises(FormatError, match="Stable Diffusion 1.5 / SDXL UNet"):
        load_lora(_ours(), p)


def test_other_flux_size_names_key_and_shapes(tmp_path):
    big = dataclasses.replace(P, hidden_size=256, num_heads=4)
    torch.manual_seed(0)
    other = _trained(Flux(big), targets="attn")
    p = save_lora(other, tmp_path / "big.safetensors")
    with pytest.raises(
        FormatError,
        match=r"module double_blocks\.0\.img_attn\.proj updates a \[256, 256\] weight "
        r"but the model's is \[128, 128\]; the LoRA is for another FLUX size",
    ):
        load_lora(_ours(), p)


def test_unknown_keys_are_named(tmp_path):
    p = tmp_path / "odd.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 128),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(384, 2),
            "lora_unet_double_blocks_0_img_attn_frob.lora_down.weight": torch.zeros(2, 128),
            "lora_unet_double_blocks_0_img_attn_frob.lora_up.weight": torch.zeros(384, 2),
        },
        str(p),
    )
    with pytest.raises(FormatError, match="unknown key.*img_attn_frob"):
        load_lora(_ours(), p)


def test_pickle_lora_refused_unopened(tmp_path):
    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(FormatError, match="pickle"):
        load_lora(_ours(), p)


def test_scale_that_is_not_a_number():
    with pytest.raises(ConfigError, match="must be a number"):
        parse_lora_arg("style.safetensors:strong")
    assert parse_lora_arg("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_lora_arg("dir:x/style.safetensors") == ("dir:x/style.safetensors", 1.0)
    with pytest.raises(ConfigError, match="must be a number"):
        load_lora(_ours(), "whatever.safetensors", scale="x")


def test_missing_file():
    with pytest.raises(FormatError, match="does not exist"):
        load_lora(_ours(), "no/such/lora.safetensors")


def test_text_encoder_tensors_are_skipped_with_a_count(tmp_path, caplog):
    m = _trained(_ours(), targets="attn")
    p = save_lora(m, tmp_path / "k.safetensors")
    sd = load_file(str(p))
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    save_file(sd, str(p))
    with caplog.at_level("WARNING"):
        f = read_lora(p)
    assert f.skipped == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert "skipped 1 text-encoder tensor" in caplog.text


def test_diffusers_metadata_is_a_peft_config(tmp_path):
    m = _trained(_ours(), targets="attn")
    f = read_lora(save_lora(m, tmp_path / "d.safetensors", format="diffusers"))
    cfg = json.loads(f.metadata["lora_adapter_metadata"])
    assert cfg["transformer.r"] == 4 and cfg["transformer.lora_alpha"] == 8.0
    assert "transformer_blocks.0.attn.to_q" in cfg["transformer.target_modules"]

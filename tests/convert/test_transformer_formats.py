"""Transformer checkpoint formats: exact round trips, diffusers files, ComfyUI prefix, config inference,
variants, published key sets, and the one-copy memory property of loading."""

import dataclasses
import json
import subprocess
import textwrap

import pytest
import torch

from rectiflow.convert.identify import flux_dims, flux_variant
from rectiflow.convert.transformer import (
    build_transformer,
    infer_params,
    inspect_transformer,
    load_transformer,
    save_transformer,
)
from rectiflow.errors import ConfigError, FormatError
from rectiflow.io import safetensors_io as sio
from rectiflow.models.transformer import TRANSFORMER_PRESETS, image_ids, text_ids


def meta_shapes(params, layout="bfl"):
    from rectiflow.convert.flux_keys import bfl_to_diffusers

    sd = build_transformer(params, device="meta").state_dict()
    if layout == "diffusers":
        sd = bfl_to_diffusers(sd, params)
    return {k: tuple(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_through_every_format_is_bit_exact(tmp_path, tiny, tiny_model, assert_same):
    ref = tiny_model.state_dict()
    m = tiny_model
    for i, fmt in enumerate(["rectiflow", "bfl", "diffusers", "rectiflow", "diffusers", "bfl"]):
        dst = tmp_path / (f"{i}-{fmt}" + ("" if fmt == "diffusers" else ".safetensors"))
        save_transformer(m, dst, fmt)
        # a BFL file has no config and TINY's head dim 32 leaves axes_dim open: the caller supplies it
        m = load_transformer(dst, config=tiny if fmt == "bfl" else None)
        assert m.params == tiny
        assert_same(ref, m.state_dict())


def test_dtype_on_load_and_keep_stored(tmp_path, tiny_model):
    path = save_transformer(tiny_model.to(torch.bfloat16), tmp_path / "m.safetensors")
    kept = load_transformer(path, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    up = load_transformer(path)  # default float32, converted per tensor
    for (k, a), b in zip(tiny_model.state_dict().items(), up.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), k


def test_rectiflow_file_metadata(tmp_path, tiny_model, tiny):
    path = save_transformer(tiny_model, tmp_path / "m.safetensors", metadata={"step": 7})
    meta = sio.read_metadata(path)
    assert meta["rectiflow.format_version"] == "1" and meta["rectiflow.model"] == "flux-transformer"
    assert json.loads(meta["rectiflow.config"]) == tiny.to_dict() and meta["step"] == "7"
    # the safetensors library reads our files, and we read its files
    from safetensors.torch import load_file, save_file

    lib = load_file(path)
    assert all(torch.equal(lib[k], v) for k, v in tiny_model.state_dict().items())
    save_file(lib, tmp_path / "lib.safetensors")
    assert all(torch.equal(lib[k], v) for k, v in sio.load_tensors(tmp_path / "lib.safetensors").items())


@pytest.mark.parametrize("change", [dict(pos_embed="sincos"), dict(text_pos="index"),
                                    dict(pooled_text=False), dict(text_refiner=1)])
def test_ablations_only_in_rectiflow_format(tmp_path, tiny, make_model, change):
    m = make_model(dataclasses.replace(tiny, **change))
    save_transformer(m, tmp_path / "ok.safetensors")
    loaded = load_transformer(tmp_path / "ok.safetensors").params
    assert all(getattr(loaded, k) == v for k, v in change.items())
    for fmt in ("bfl", "diffusers"):
        with pytest.raises(FormatError, match="format='rectiflow'"):
            save_transformer(m, tmp_path / f"x-{fmt}", fmt)


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, tiny_model, monkeypatch):
    path = save_transformer(tiny_model, tmp_path / "m.safetensors", "bfl")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(sio, "_write_safetensors", boom)
    with pytest.raises(OSError):
        save_transformer(tiny_model, path, "bfl")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ------------------------------------------------------------------------------------------ diffusers files


@pytest.fixture
def diffusers_ref(tiny):
    diffusers = pytest.importorskip("diffusers")
    p = tiny
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim,
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random everything (norm scales start at 1, some layers at 0)
        for t in model.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * (0.5 if t.ndim == 1 else t.shape[1] ** -0.5))
    return model.eval()


def _forward_both(ours, ref, p):
    g = torch.Generator().manual_seed(1)
    b, h, w, lt = 2, 8, 6, 5
    img = torch.randn(b, h * w // 4, p.in_channels, generator=g)
    txt = torch.randn(b, lt, p.context_in_dim, generator=g)
    y = torch.randn(b, p.vec_in_dim, generator=g)
    t, gd = torch.rand(b, generator=g), torch.tensor([3.5, 1.0])
    iid, tid = image_ids(b, h, w), text_ids(b, lt)
    with torch.no_grad():
        out = ours(img, iid, txt, tid, t, y, gd)
        expect = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                     img_ids=iid[0], txt_ids=tid[0], guidance=gd, return_dict=False)[0]
    return out, expect


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_loads_folder_saved_by_diffusers(tmp_path, tiny, diffusers_ref, shard):
    kwargs = {"max_shard_size": shard} if shard else {}
    diffusers_ref.save_pretrained(tmp_path / "pipe" / "transformer", **kwargs)
    files = sorted(f.name for f in (tmp_path / "pipe" / "transformer").iterdir())
    assert ("diffusion_pytorch_model.safetensors.index.json" in files) == bool(shard), files
    src = inspect_transformer(tmp_path / "pipe")  # the pipeline folder is accepted too
    assert src.format == "diffusers" and src.params == tiny
    ours = load_transformer(tmp_path / "pipe").eval()
    out, expect = _forward_both(ours, diffusers_ref, tiny)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


def test_folder_we_save_loads_in_diffusers(tmp_path, tiny, tiny_model):
    diffusers = pytest.importorskip("diffusers")
    with torch.no_grad():  # keep activations in range for the comparison
        for t in tiny_model.parameters():
            t.mul_(0.5 if t.ndim == 1 else t.shape[-1] ** -0.5)
    save_transformer(tiny_model, tmp_path / "t", "diffusers", max_shard_bytes=30_000)
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "t").eval()
    out, expect = _forward_both(tiny_model.eval(), ref, tiny)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


def test_single_file_with_diffusers_keys(tmp_path, tiny, tiny_model, assert_same):
    from rectiflow.convert.flux_keys import bfl_to_diffusers

    sd = bfl_to_diffusers(tiny_model.state_dict(), tiny)
    sio.save_safetensors(sd, tmp_path / "d.safetensors")
    loaded = load_transformer(tmp_path / "d.safetensors", config=tiny)
    assert_same(tiny_model.state_dict(), loaded.state_dict())


# ------------------------------------------------------------------------------------ prefixes, inference


def test_comfyui_prefix_and_bundled_components(tmp_path, tiny, tiny_model, assert_same):
    sd = {f"model.diffusion_model.{k}": v for k, v in tiny_model.state_dict().items()}
    sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)  # a bundled VAE is ignored
    sd["text_encoders.clip_l.logit_scale"] = torch.zeros(())
    sio.save_safetensors(sd, tmp_path / "comfy.safetensors")
    src = inspect_transformer(tmp_path / "comfy.safetensors")
    assert src.prefix == "model.diffusion_model." and len(src.tensors) == len(tiny_model.state_dict())
    m = load_transformer(tmp_path / "comfy.safetensors", config=tiny)
    assert_same(tiny_model.state_dict(), m.state_dict())


def test_infer_params_head_dim_128_assumes_flux_axes(tmp_path, tiny, make_model):
    p = dataclasses.replace(tiny, hidden_size=256, num_heads=2, axes_dim=(16, 56, 56), depth=1,
                            depth_single_blocks=1, mlp_ratio=2.0, qkv_bias=False, guidance_embed=False,
                            in_channels=128, out_channels=64)
    path = save_transformer(make_model(p), tmp_path / "m.safetensors", "bfl")
    assert load_transformer(path).params == p  # every field recovered from shapes (+ FLUX's axes, theta)


def test_infer_params_other_head_dim_needs_config(tmp_path, tiny, tiny_model):
    path = save_transformer(tiny_model, tmp_path / "m.safetensors", "bfl")
    with pytest.raises(ConfigError, match="axes_dim") as e:
        load_transformer(path)
    assert "\n" not in str(e.value)
    assert load_transformer(path, config=tiny.to_dict()).params == tiny


def test_infer_params_matches_presets(tmp_path, make_model):
    path = save_transformer(make_model(TRANSFORMER_PRESETS["micro"]), tmp_path / "m.safetensors", "bfl")
    assert load_transformer(path).params is TRANSFORMER_PRESETS["micro"]
    for name in ("flux-schnell", "flux-dev"):
        for layout in ("bfl", "diffusers"):
            assert infer_params(meta_shapes(name, layout), layout) == TRANSFORMER_PRESETS[name]


# ------------------------------------------------------------------------------------------ variants


@pytest.mark.parametrize("name,in_channels,guidance,variant", [
    ("flux-schnell", 64, False, "flux-schnell"),
    ("flux-dev", 64, True, "flux-dev"),
    ("flux-dev", 384, True, "flux-dev-fill"),  # BFL util.py configs["flux-dev-fill"]: in_channels=384
    ("flux-dev", 128, True, "flux-dev-canny/depth"),  # configs["flux-dev-canny" / "flux-dev-depth"]: 128
])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_variant_detection(name, in_channels, guidance, variant, layout):
    p = dataclasses.replace(TRANSFORMER_PRESETS[name], in_channels=in_channels, guidance_embed=guidance)
    shapes = meta_shapes(p, layout)
    assert flux_variant(flux_dims(shapes, layout)) == variant
    inferred = infer_params(shapes, layout)
    assert inferred == p and inferred.out_channels == 64


def test_variant_with_extra_input_channels_loads(tmp_path, tiny, make_model, assert_same, caplog):
    """Fill / Canny / Depth only widen img_in; such a model loads (with a warning about conditioning)."""
    p = dataclasses.replace(TRANSFORMER_PRESETS["flux-dev"], hidden_size=256, num_heads=2, depth=1,
                            depth_single_blocks=1, context_in_dim=32, vec_in_dim=32, in_channels=384)
    m = make_model(p)
    save_transformer(m, tmp_path / "m", "diffusers")
    with caplog.at_level("WARNING"):
        loaded = load_transformer(tmp_path / "m")
    assert_same(m.state_dict(), loaded.state_dict())
    assert loaded.params.in_channels == 384 and loaded.params.out_channels == 64
    assert "conditioning" in caplog.text


# ------------------------------------------------------------------------------------------ published keys


@pytest.mark.parametrize("name,count,params", [
    ("flux-schnell", 776, 11_891_178_560),
    # FLUX.1-dev: diffusers index total_size 23,802,816,640 bytes in bf16 = 11,901,408,320 parameters
    ("flux-dev", 780, 11_901_408_320),
])
def test_published_checkpoint_keys_and_shapes(name, count, params):
    m = build_transformer(name, device="meta")
    sd = m.state_dict()
    assert len(sd) == count and all(t.device.type == "meta" for t in sd.values())
    assert sum(t.numel() for t in sd.values()) == params
    # shapes of flux1-dev.safetensors / flux1-schnell.safetensors
    expect = {
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
        "vector_in.in_layer.weight": (3072, 768), "double_blocks.18.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "double_blocks.0.img_mod.lin.weight":
        (18432, 3072), "double_blocks.0.txt_mlp.0.weight": (12288, 3072),
        "single_blocks.37.linear1.weight": (21504, 3072), "single_blocks.37.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.lin.weight": (9216, 3072), "final_layer.linear.weight": (64, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert ("guidance_in.in_layer.weight" in sd) == (name == "flux-dev")
    assert sum(k.startswith("double_blocks.") for k in sd) == 19 * 24
    assert sum(k.startswith("single_blocks.") for k in sd) == 38 * 8


def test_meta_model_cannot_be_saved(tmp_path):
    with pytest.raises(FormatError, match="meta"):
        save_transformer(build_transformer("micro", device="meta"), tmp_path / "m.safetensors")


# ------------------------------------------------------------------------------------------ memory

_MEASURE = textwrap.dedent("""
    import sys, torch
    from rectiflow.convert.transformer import load_transformer
    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    load_transformer(sys.argv[3], dtype=None)  # warm-up: lazy imports, allocator
    before = hwm()
    if sys.argv[1] == "ours":
        m = load_transformer(sys.argv[2], dtype=None)
    else:  # control: the file's bytes in memory, then tensors made from them, as safetensors.torch.load does
        import safetensors.torch
        with open(sys.argv[2], "rb") as f:
            sd = safetensors.torch.load(f.read())
    print(before, hwm())
""")


def test_load_holds_one_copy_of_the_weights(tmp_path, tiny, make_model, cli_env, python):
    # ~36M parameters (144 MB fp32): large against allocator noise, fast to write and read.
    p = dataclasses.replace(tiny, hidden_size=512, num_heads=4, axes_dim=(16, 56, 56), depth=2,
                            depth_single_blocks=4, guidance_embed=False)
    model = make_model(p)
    nbytes = sum(t.numel() * t.element_size() for t in model.parameters())
    path = save_transformer(model, tmp_path / "big.safetensors", "bfl")
    small = save_transformer(make_model(TRANSFORMER_PRESETS["micro"]), tmp_path / "s.safetensors", "bfl")
    growth = {}
    for mode in ("ours", "control"):
        r = subprocess.run([python, "-c", _MEASURE, mode, str(path), str(small)], env=cli_env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        before, after = map(int, r.stdout.split())
        growth[mode] = (after - before) / nbytes
    print(f"peak RSS growth loading {nbytes / 1e6:.0f} MB: ours {growth['ours']:.2f}x, "
          f"bytes-then-tensors control {growth['control']:.2f}x")
    assert growth["control"] > 1.7, growth  # the measurement does see a second copy
    assert 0.9 < growth["ours"] < 1.25, growth  # one copy

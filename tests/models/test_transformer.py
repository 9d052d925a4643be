"""Flux model: config invariants, presets, input validation, token helpers, position-embedding modes."""

import dataclasses

import pytest
import torch

from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.models.transformer import (
    TRANSFORMER_PRESETS,
    Flux,
    FluxParams,
    image_ids,
    pack,
    text_ids,
    transformer_params,
    unpack,
)

MICRO = TRANSFORMER_PRESETS["micro"]


def _inputs(p: FluxParams, b=2, h=8, w=6, lt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(b, h * w // 4, p.in_channels, generator=g), img_ids=image_ids(b, h, w),
        txt=torch.randn(b, lt, p.context_in_dim, generator=g), txt_ids=text_ids(b, lt),
        timesteps=torch.rand(b, generator=g), y=torch.randn(b, p.vec_in_dim, generator=g),
    )


def test_published_presets_exact():
    s = TRANSFORMER_PRESETS["flux-schnell"]
    assert (s.in_channels, s.out_channels, s.vec_in_dim, s.context_in_dim, s.hidden_size, s.mlp_ratio) == (
        64, 64, 768, 4096, 3072, 4.0)
    assert (s.num_heads, s.depth, s.depth_single_blocks, s.axes_dim, s.theta, s.qkv_bias) == (
        24, 19, 38, (16, 56, 56), 10_000, True)
    assert not s.guidance_embed and TRANSFORMER_PRESETS["flux-dev"].guidance_embed


@pytest.mark.parametrize("name,count", [("flux-schnell", 776), ("flux-dev", 780)])
def test_checkpoint_tensor_counts_on_meta(name, count):
    with torch.device("meta"):
        model = Flux(name)
    sd = model.state_dict()
    assert len(sd) == count
    assert 11.8e9 < sum(t.numel() for t in sd.values()) < 12.0e9
    for key in ("img_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias", "txt_in.weight",
                "double_blocks.18.img_attn.norm.query_norm.scale", "double_blocks.0.txt_mlp.2.weight",
                "single_blocks.37.linear1.weight", "single_blocks.0.modulation.lin.bias",
                "final_layer.adaLN_modulation.1.weight"):
        assert key in sd, key
    assert sd["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    assert ("guidance_in.in_layer.weight" in sd) == (name == "flux-dev")


@pytest.mark.parametrize("name,lo,hi", [("tiny", 8e6, 12e6), ("small", 130e6, 170e6)])
def test_cpu_preset_sizes(name, lo, hi):
    with torch.device("meta"):
        model = Flux(name)
    assert lo < sum(p.numel() for p in model.parameters()) < hi


def test_transformer_params_inputs():
    assert transformer_params("tiny") is TRANSFORMER_PRESETS["tiny"]
    assert transformer_params(MICRO) is MICRO
    d = MICRO.to_dict()
    assert isinstance(d["axes_dim"], list) and transformer_params(d) == MICRO  # JSON-able round trip
    with pytest.raises(ConfigError, match="known presets: flux-schnell, flux-dev"):
        transformer_params("flux-pro")
    with pytest.raises(ConfigError, match="unknown FluxParams field"):
        transformer_params({**d, "depth_blocks": 3})
    with pytest.raises(ConfigError, match="missing field"):
        transformer_params({k: v for k, v in d.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="expected a preset name"):
        transformer_params(3)


@pytest.mark.parametrize("change,match", [
    (dict(hidden_size=100, num_heads=3), "not divisible by num_heads"),
    (dict(axes_dim=(8, 28, 20)), "sums to 56"),
    (dict(axes_dim=(9, 27, 28)), "positive even"),
    (dict(pos_embed="alibi"), "pos_embed"),
    (dict(text_pos="absolute"), "text_pos"),
    (dict(text_pos="index", pos_embed="sincos"), "needs pos_embed='rope'"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(depth=-1), "depth"),
    (dict(in_channels=0), "in_channels"),
    (dict(theta=0), "theta"),
    (dict(patch_size=3), "for 16-channel latents set in_channels = out_channels = 144"),
    (dict(patch_size=4, in_channels=256, out_channels=72), "patch_size 4"),
    (dict(patch_size=0), "patch_size 0"),
])
def test_invariants(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(MICRO, **change)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MICRO.depth = 3


def test_forward_shapes_and_ids_broadcast():
    torch.manual_seed(0)
    model = Flux(MICRO).eval()
    x = _inputs(MICRO)
    with torch.no_grad():
        out = model(**x)
        shared = model(**{**x, "img_ids": x["img_ids"][:1], "txt_ids": x["txt_ids"][:1]})
        mixed = model(**{**x, "txt_ids": x["txt_ids"][:1]})  # shared text ids, per-image image ids
    assert out.shape == (2, 12, 64) and torch.isfinite(out).all()
    torch.testing.assert_close(shared, out, rtol=0, atol=0)
    torch.testing.assert_close(mixed, out, rtol=0, atol=0)


def test_text_pos_index_makes_word_order_visible():
    """FLUX's text ids are all zero, so the transformer itself cannot see the order of the text tokens (only
    the text encoder's contextual features carry it); text_pos='index' gives token i the RoPE id (i, 0, 0)."""
    torch.manual_seed(0)
    flux = Flux(MICRO).eval()
    indexed = Flux(dataclasses.replace(MICRO, text_pos="index")).eval()
    indexed.load_state_dict(flux.state_dict())  # no extra weights
    x = _inputs(MICRO)
    flipped = {**x, "txt": x["txt"].flip(1)}
    shifted = {**x, "txt_ids": x["txt_ids"] + torch.tensor([1.0, 0.0, 0.0])}
    with torch.no_grad():
        torch.testing.assert_close(flux(**flipped), flux(**x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(indexed(**flipped), indexed(**x), atol=1e-4)
        # the same as FLUX fed ids (i, 0, 0) by hand
        order = torch.arange(x["txt"].shape[1], dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.0, 0.0])
        torch.testing.assert_close(indexed(**x), flux(**{**x, "txt_ids": x["txt_ids"] + order}),
                                   rtol=0, atol=0)
        by_hand = {**shifted, "txt_ids": shifted["txt_ids"] + order}
        torch.testing.assert_close(indexed(**shifted), flux(**by_hand), rtol=0, atol=0)


def test_pooled_text_false_routes_text_through_attention_only():
    """pooled_text=False drops vector_in: y no longer changes the output, the text tokens still do, and the
    rest of the network is FLUX's (same weights, same output when FLUX's vector_in contributes nothing)."""
    torch.manual_seed(0)
    p = dataclasses.replace(MICRO, pooled_text=False)
    flux, bare = Flux(MICRO).eval(), Flux(p).eval()
    assert bare.vector_in is None and "vector_in.in_layer.weight" not in bare.state_dict()
    missing, unexpected = bare.load_state_dict(flux.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == sorted(k for k in flux.state_dict()
                                                          if k.startswith("vector_in"))
    x = _inputs(MICRO)
    with torch.no_grad():
        out = bare(**x)
        torch.testing.assert_close(bare(**{**x, "y": torch.randn_like(x["y"])}), out, rtol=0, atol=0)
        assert not torch.allclose(bare(**{**x, "txt": torch.randn_like(x["txt"])}), out, atol=1e-4)
        torch.nn.init.zeros_(flux.vector_in.out_layer.weight)
        torch.nn.init.zeros_(flux.vector_in.out_layer.bias)
        torch.testing.assert_close(flux(**x), out, rtol=0, atol=0)
    with pytest.raises(RectiflowError, match="pooled text vector"):
        bare(**{**x, "y": x["y"][:, :-1]})  # y is still checked


@pytest.mark.parametrize("text_pos", ["none", "index"])
def test_text_refiner_is_a_single_stream_stack_over_the_text_alone(text_pos):
    """text_refiner = n runs n single-stream blocks over txt_in's output, with the adaLN vector and the text's
    own RoPE rows, before the joint blocks: the same as FLUX (same weights) with those blocks spliced in by
    hand after txt_in; and FLUX exactly when the refiner's modulation is zero (its gates are closed)."""
    torch.manual_seed(0)
    base = dataclasses.replace(MICRO, text_pos=text_pos)
    refined = Flux(dataclasses.replace(base, text_refiner=2)).eval()
    for q in refined.txt_refiner.parameters():
        torch.nn.init.normal_(q, std=0.1)
    flux = Flux(base).eval()
    missing, unexpected = flux.load_state_dict(refined.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith("txt_refiner.") for k in unexpected)
    x = _inputs(base)
    parts = {}
    flux.time_in.register_forward_hook(lambda m, i, o: parts.__setitem__("t", o))
    flux.vector_in.register_forward_hook(lambda m, i, o: parts.__setitem__("y", o))

    def splice(module, inputs, txt):
        ids = x["txt_ids"].clone()
        if text_pos == "index":
            ids[..., 0] += torch.arange(ids.shape[1])
        pe = flux.pe_embedder(ids)
        for block in refined.txt_refiner:
            txt = block(txt, parts["t"] + parts["y"], pe)
        return txt

    with torch.no_grad():
        out = refined(**x)
        assert not torch.allclose(out, flux(**x), atol=1e-4)
        hook = flux.txt_in.register_forward_hook(splice)
        torch.testing.assert_close(flux(**x), out, rtol=1e-5, atol=1e-6)
        hook.remove()
        for block in refined.txt_refiner:
            torch.nn.init.zeros_(block.modulation.lin.weight)
            torch.nn.init.zeros_(block.modulation.lin.bias)
        torch.testing.assert_close(refined(**x), flux(**x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="text_refiner must be >= 0"):
        dataclasses.replace(base, text_refiner=-1)


@pytest.mark.parametrize("pooled_text", [True, False])
def test_gradients_reach_every_parameter(pooled_text):
    torch.manual_seed(0)
    p = dataclasses.replace(MICRO, depth=1, depth_single_blocks=1, guidance_embed=True,
                            pooled_text=pooled_text, text_refiner=1)
    model = Flux(p)
    for q in model.parameters():  # adaLN-style nets are often zero-initialised; random keeps grads alive
        torch.nn.init.normal_(q, std=0.1)
    model(**_inputs(p), guidance=torch.tensor([3.5, 1.0])).square().mean().backward()
    dead = [n for n, q in model.named_parameters() if q.grad is None or q.grad.abs().sum() == 0]
    assert dead == []


def test_every_linear_is_called_as_a_module():
    """LoRA and int8 are applied by swapping / wrapping nn.Linear modules (docs/design.md section 3): a
    forward that read a linear's weight directly would silently bypass them."""
    p = dataclasses.replace(MICRO, guidance_embed=True)
    model = Flux(p)
    called = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lambda m, i, o, name=name: called.add(name))
    model(**_inputs(p), guidance=torch.ones(2))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and called == linears


def test_positions_and_time_change_the_output():
    torch.manual_seed(0)
    model = Flux(MICRO).eval()
    x = _inputs(MICRO)
    with torch.no_grad():
        base = model(**x)
        moved = model(**{**x, "img_ids": x["img_ids"] + torch.tensor([0.0, 1.0, 0.0])})
        later = model(**{**x, "timesteps": x["timesteps"] + 0.01})
    assert not torch.allclose(base, later)
    # RoPE is relative: shifting every image position by one row changes the joint attention with text
    # (text ids stay at 0), so the output changes
    assert not torch.allclose(base, moved)


def test_sincos_mode():
    torch.manual_seed(0)
    p = dataclasses.replace(MICRO, pos_embed="sincos")
    model = Flux(p).eval()
    x = _inputs(p)
    with torch.no_grad():
        base = model(**x)
        # absolute embedding: a row shift of all image tokens changes the output too
        moved = model(**{**x, "img_ids": x["img_ids"] + torch.tensor([0.0, 1.0, 0.0])})
        # but the text ids are unused (no RoPE)
        same = model(**{**x, "txt_ids": x["txt_ids"] + 3.0})
    assert not torch.allclose(base, moved)
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert len(model.state_dict()) == len(Flux(MICRO).state_dict())  # no extra weights


def test_bf16_forward_runs():
    torch.manual_seed(0)
    model = Flux(MICRO).to(torch.bfloat16).eval()
    x = {k: (v.bfloat16() if k in ("img", "txt", "y") else v) for k, v in _inputs(MICRO).items()}
    with torch.no_grad():
        out = model(**x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("key,value,match", [
    ("img", torch.randn(2, 12), "img must be"),
    ("img", torch.randn(2, 12, 63), "last dimension 63 should be 64"),
    ("txt", torch.randn(2, 5, 100), "txt must be"),
    ("y", torch.randn(2, 1, 384), "y must be"),
    ("img_ids", torch.zeros(2, 11, 3), "img_ids has 11 positions but there are 12 tokens"),
    ("txt_ids", torch.zeros(2, 5, 2), "txt_ids must be"),
    ("txt_ids", torch.zeros(3, 5, 3), "txt_ids has batch size 3"),
    ("timesteps", torch.rand(2, 1), "timesteps must be"),
    ("timesteps", torch.rand(3), "timesteps has batch size 3"),
    ("txt", torch.randn(3, 5, 384), "txt has batch size 3"),
])
def test_bad_inputs(key, value, match):
    model = Flux(MICRO)
    with pytest.raises(RectiflowError, match=match):
        model(**{**_inputs(MICRO), key: value})


def test_guidance_required_for_distilled_model():
    p = dataclasses.replace(MICRO, guidance_embed=True)
    model = Flux(p)
    with pytest.raises(RectiflowError, match="guidance-distilled"):
        model(**_inputs(p))
    with pytest.raises(RectiflowError, match="guidance must have shape"):
        model(**_inputs(p), guidance=torch.ones(3))
    model(**_inputs(p), guidance=torch.ones(2))


def test_pack_unpack_and_ids():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack(x)
    assert tokens.shape == (2, 15, 64)
    # token (row 1, col 2) holds channels c of pixels (2..3, 4..5) in (c, ph, pw) order
    torch.testing.assert_close(tokens[:, 1 * 5 + 2].view(2, 16, 2, 2), x[:, :, 2:4, 4:6], rtol=0, atol=0)
    assert torch.equal(unpack(tokens, 6, 10), x)
    ids = image_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3)
    assert ids[0, 1 * 5 + 2].tolist() == [0.0, 1.0, 2.0] and ids[..., 0].abs().sum() == 0
    assert text_ids(2, 7).shape == (2, 7, 3) and text_ids(2, 7).abs().sum() == 0


@pytest.mark.parametrize("call,match", [
    (lambda: pack(torch.randn(1, 16, 5, 4)), "not divisible by 2"),
    (lambda: pack(torch.randn(16, 4, 4)), "pack expects"),
    (lambda: unpack(torch.randn(1, 4, 64), 6, 4), "do not fit"),
    (lambda: unpack(torch.randn(1, 4, 64), 3, 4), "not divisible"),
    (lambda: image_ids(1, 7, 4), "not divisible"),
])
def test_helper_errors(call, match):
    with pytest.raises(RectiflowError, match=match):
        call()


def test_patch_size_one_packs_a_token_per_latent_pixel():
    """patch_size 1 (rectiflow's ablation): 64 tokens of 16 channels for an 8 x 8 latent, positions (0, row,
    col) per latent pixel; the family packs, counts and calls it so; BFL's layout (2x2) is the default."""
    from rectiflow.models.family import FLUX, family_of

    x = torch.randn(2, 16, 8, 6)
    tokens = pack(x, 1)
    assert tokens.shape == (2, 48, 16)
    torch.testing.assert_close(tokens[:, 1 * 6 + 2], x[:, :, 1, 2], rtol=0, atol=0)
    assert torch.equal(unpack(tokens, 8, 6, 1), x)
    assert image_ids(1, 8, 6, patch=1)[0, 1 * 6 + 2].tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(unpack(pack(x, 2), 8, 6, 2), x) and pack(x, 2).shape == (2, 12, 64)

    p1 = dataclasses.replace(MICRO, patch_size=1, in_channels=16, out_channels=16)
    assert p1.latent_channels == 16 == MICRO.latent_channels
    fam = family_of(p1)
    assert fam is not FLUX and fam.patch == 1 and family_of(MICRO) is FLUX
    assert family_of({**p1.to_dict()}).patch == 1
    assert fam.image_tokens(8, 6) == 48 and FLUX.image_tokens(8, 6) == 12
    torch.manual_seed(0)
    model = Flux(p1).eval()
    txt, vec = torch.randn(2, 5, p1.context_in_dim), torch.randn(2, p1.vec_in_dim)
    with torch.no_grad():
        v = fam.unpack(fam.forward(model, fam.pack(x), torch.rand(2), txt, vec, 8, 6), 8, 6)
    assert v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(RectiflowError, match="not divisible by 4; use image sizes divisible by 32"):
        pack(x, 4)

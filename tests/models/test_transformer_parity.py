"""Parity with diffusers' FluxTransformer2DModel on identical random weights, and exact key conversion."""

import dataclasses

import pytest
import torch

from rectiflow.convert.flux_keys import bfl_to_diffusers, diffusers_to_bfl
from rectiflow.errors import FormatError
from rectiflow.models.transformer import TRANSFORMER_PRESETS, Flux, FluxParams, image_ids, text_ids

diffusers = pytest.importorskip("diffusers")

TINY = dataclasses.replace(TRANSFORMER_PRESETS["micro"], hidden_size=128, num_heads=2, depth=2,
                           depth_single_blocks=2)
# "mid-size": FLUX's head dim 128 and axes (16, 56, 56), 3 heads, 3 + 4 blocks (~15M parameters)
MID = dataclasses.replace(TRANSFORMER_PRESETS["micro"], hidden_size=384, num_heads=3, depth=3,
                          depth_single_blocks=4, axes_dim=(16, 56, 56), vec_in_dim=96, context_in_dim=160)


def diffusers_model(p: FluxParams, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim,
    )
    with torch.no_grad():  # random everything, norms' scales included (they are initialised to 1)
        for t in model.parameters():
            t.normal_(0.0, 0.5 if t.ndim == 1 else 1.0 / t.shape[1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("base", [TINY, MID], ids=["tiny", "mid"])
@pytest.mark.parametrize("guidance", [False, True], ids=["schnell-like", "dev-like"])
def test_forward_parity(base, guidance):
    p = dataclasses.replace(base, guidance_embed=guidance)
    ref = diffusers_model(p)
    ours = Flux(p).eval()
    ours.load_state_dict(diffusers_to_bfl(ref.state_dict(), p), strict=True)

    g = torch.Generator().manual_seed(1)
    b, h, w, lt = 2, 16, 12, 9
    img = torch.randn(b, h * w // 4, p.in_channels, generator=g)
    txt = torch.randn(b, lt, p.context_in_dim, generator=g)
    y = torch.randn(b, p.vec_in_dim, generator=g)
    t = torch.rand(b, generator=g)
    gd = torch.tensor([3.5, 1.0]) if guidance else None
    iid, tid = image_ids(b, h, w), text_ids(b, lt)
    tid[:, :, 0] = torch.arange(lt)  # non-trivial text positions exercise the first RoPE axis as well
    with torch.no_grad():
        out = ours(img, iid, txt, tid, t, y, gd)
        expect = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                     img_ids=iid[0], txt_ids=tid[0], guidance=gd, return_dict=False)[0]
    assert out.shape == expect.shape
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    # the comparison is not vacuous: the timestep matters at this tolerance
    with torch.no_grad():
        other = ours(img, iid, txt, tid, t + 1e-3, y, gd)
    assert (other - expect).abs().max() > 1e-3 * expect.abs().max()


def _inputs(p: FluxParams, b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w, lt = 8, 12, 5
    return dict(
        img=torch.randn(b, h * w // 4, p.in_channels, generator=g),
        txt=torch.randn(b, lt, p.context_in_dim, generator=g),
        y=torch.randn(b, p.vec_in_dim, generator=g), t=torch.rand(b, generator=g), iid=image_ids(b, h, w),
        tid=text_ids(b, lt), gd=torch.full((b,), 3.5) if p.guidance_embed else None,
    )


def _run_both(ours, ref, x):
    out = ours(x["img"], x["iid"], x["txt"], x["tid"], x["t"], x["y"], x["gd"])
    expect = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["t"], img_ids=x["iid"][0], txt_ids=x["tid"][0], guidance=x["gd"],
                 return_dict=False)[0]
    return out, expect


@pytest.mark.parametrize("batch", [1, 3])
def test_gradient_parity(batch):
    """Training needs the same gradients: compare every parameter's gradient after converting the names.
    Batch 1 also exercises the fused affine-LayerNorm modulation path."""
    p = dataclasses.replace(TINY, guidance_embed=True)
    ref = diffusers_model(p, seed=2)
    ours = Flux(p)
    ours.load_state_dict(diffusers_to_bfl(ref.state_dict(), p), strict=True)
    x = _inputs(p, batch)
    out, expect = _run_both(ours, ref, x)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    (expect * w).sum().backward()
    ref_grads = diffusers_to_bfl({n: q.grad for n, q in ref.named_parameters()}, p)
    for name, q in ours.named_parameters():
        scale = ref_grads[name].abs().max().item() + 1e-12
        torch.testing.assert_close(q.grad, ref_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("guidance", [False, True])
def test_round_trips_bit_exact(guidance):
    p = dataclasses.replace(TINY, guidance_embed=guidance, mlp_ratio=3.0)
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) for k, v in Flux(p).state_dict().items()}
    dsd = bfl_to_diffusers(sd, p)
    assert dsd.keys() == diffusers_model(p).state_dict().keys()
    back = diffusers_to_bfl(dsd, p)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = bfl_to_diffusers(back, p)
    assert all(torch.equal(again[k], dsd[k]) for k in dsd)
    # outputs never share storage (safetensors refuses shared tensors)
    ptrs = [t.untyped_storage().data_ptr() for t in dsd.values()]
    assert len(set(ptrs)) == len(ptrs)


def test_final_layer_shift_scale_swap():
    p = TINY
    sd = Flux(p).state_dict()
    w = sd["final_layer.adaLN_modulation.1.weight"]
    dsd = bfl_to_diffusers(sd, p)
    h = p.hidden_size
    assert torch.equal(dsd["norm_out.linear.weight"][:h], w[h:])  # diffusers: (scale, shift)
    assert torch.equal(dsd["norm_out.linear.weight"][h:], w[:h])


def test_qkv_bias_false_round_trip_and_refusal():
    p = dataclasses.replace(TINY, qkv_bias=False)
    sd = Flux(p).state_dict()
    assert "double_blocks.0.img_attn.qkv.bias" not in sd
    dsd = bfl_to_diffusers(sd, p)
    assert dsd["transformer_blocks.0.attn.to_q.bias"].abs().sum() == 0
    back = diffusers_to_bfl(dsd, p)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and back.keys() == sd.keys()
    dsd["transformer_blocks.0.attn.add_k_proj.bias"] = torch.ones(p.hidden_size)
    with pytest.raises(FormatError, match="qkv_bias=False"):
        diffusers_to_bfl(dsd, p)


def test_mismatched_config_is_reported():
    sd = Flux(TINY).state_dict()
    with pytest.raises(FormatError, match="unexpected key"):
        bfl_to_diffusers(sd, dataclasses.replace(TINY, depth=1))
    with pytest.raises(FormatError, match="missing key 'guidance_in.in_layer.weight'"):
        bfl_to_diffusers(sd, dataclasses.replace(TINY, guidance_embed=True))
    dsd = bfl_to_diffusers(sd, TINY)
    del dsd["single_transformer_blocks.1.proj_mlp.bias"]
    with pytest.raises(FormatError, match="missing key 'single_transformer_blocks.1.proj_mlp.bias'"):
        diffusers_to_bfl(dsd, TINY)

"""The SD3 / SD3.5 MM-DiT against diffusers' SD3Transformer2DModel on identical random weights, and exact
key conversion (Stability <-> diffusers)."""

import dataclasses

import pytest
import torch

from rectiflow.convert.sd3_keys import diffusers_to_stability, stability_to_diffusers
from rectiflow.errors import FormatError, RectiflowError
from rectiflow.models.sd3 import SD3_PRESETS, MMDiT, SD3Params

diffusers = pytest.importorskip("diffusers")

# Tiny configs shaped like the three published families: SD3 Medium (plain), SD3.5 Large (RMS QK-norm) and
# SD3.5 Medium (QK-norm + MMDiT-X dual attention in the first blocks). Head dim 32, 3 blocks.
MEDIUM = SD3Params(hidden_size=64, num_heads=2, depth=3, in_channels=4, out_channels=4, context_in_dim=40,
                   vec_in_dim=24, pos_embed_max_size=12, sample_size=16)
LARGE = dataclasses.replace(MEDIUM, qk_norm=True)
MEDIUM35 = dataclasses.replace(MEDIUM, qk_norm=True, dual_attention_layers=(0, 1))
CONFIGS = {"sd3-medium-like": MEDIUM, "sd3.5-large-like": LARGE, "sd3.5-medium-like": MEDIUM35}


def diffusers_model(p: SD3Params, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=p.sample_size, patch_size=p.patch_size, in_channels=p.in_channels,
        num_layers=p.depth, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, caption_projection_dim=p.hidden_size,
        pooled_projection_dim=p.vec_in_dim, out_channels=p.out_channels,
        pos_embed_max_size=p.pos_embed_max_size, dual_attention_layers=p.dual_attention_layers,
        qk_norm="rms_norm" if p.qk_norm else None,
    )
    with torch.no_grad():  # random everything (zero-initialised modulations and unit norm scales too)
        for t in model.parameters():
            t.normal_(0.0, 0.5 if t.ndim == 1 else 1.0 / t[0].numel() ** 0.5)
    return model


def _inputs(p: SD3Params, b: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, p.in_channels, h, w, generator=g), torch.rand(b, generator=g),
            torch.randn(b, p.vec_in_dim, generator=g), torch.randn(b, 7, p.context_in_dim, generator=g))


def _pair(p: SD3Params, seed: int = 0):
    ref = diffusers_model(p, seed)
    ours = MMDiT(p)
    ours.load_state_dict(diffusers_to_stability(ref.state_dict(), p), strict=True)
    return ours, ref


def _run_ref(ref, x, t, y, ctx, **kw):
    # diffusers and Stability's reference take the timestep as 1000 t
    return ref(hidden_states=x, timestep=1000 * t, pooled_projections=y, encoder_hidden_states=ctx,
               return_dict=False, **kw)[0]


@pytest.mark.parametrize("size", [(8, 8), (6, 10)], ids=["square", "non-square"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_parity(name, size):
    p = CONFIGS[name]
    ours, ref = _pair(p)
    x, t, y, ctx = _inputs(p, 2, *size)
    with torch.no_grad():
        out = ours(x, t, y=y, context=ctx)
        expect = _run_ref(ref, x, t, y, ctx)
    assert out.shape == x.shape == expect.shape
    assert ((out - expect).norm() / expect.norm()).item() <= 1e-5
    with torch.no_grad():  # the comparison is not vacuous: the timestep matters at this tolerance
        other = ours(x, t + 1e-3, y=y, context=ctx)
    assert ((other - expect).norm() / expect.norm()).item() > 1e-4


def test_fresh_position_table_equals_diffusers():
    for p in CONFIGS.values():
        assert torch.equal(MMDiT(p).pos_embed, diffusers_model(p).pos_embed.pos_embed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_parity(name):
    p = CONFIGS[name]
    ours, ref = _pair(p, seed=2)
    x, t, y, ctx = _inputs(p, 3, 6, 8)
    out, expect = ours(x, t, y=y, context=ctx), _run_ref(ref, x, t, y, ctx)
    assert ((out - expect).norm() / expect.norm()).item() <= 1e-5
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    (expect * w).sum().backward()
    grads = diffusers_to_stability({n: q.grad for n, q in ref.named_parameters()}
                                   | {"pos_embed.pos_embed": ref.pos_embed.pos_embed}, p)
    for n, q in ours.named_parameters():
        # The last block's context queries feed only discarded outputs: both gradients are exactly zero.
        assert (q.grad - grads[n]).norm().item() <= 1e-5 * grads[n].norm().item(), n


def test_skip_layer_parity():
    """Skip-layer guidance drops whole joint blocks (mmditx.py layer_drops, diffusers skip_layers)."""
    p = dataclasses.replace(MEDIUM35, depth=4)
    ours, ref = _pair(p)
    x, t, y, ctx = _inputs(p, 2, 8, 8)
    with torch.no_grad():
        out = ours(x, t, y=y, context=ctx, skip_layers=(1, 2))
        expect = _run_ref(ref, x, t, y, ctx, skip_layers=[1, 2])
        full = ours(x, t, y=y, context=ctx)
    assert ((out - expect).norm() / expect.norm()).item() <= 1e-5
    assert ((out - full).norm() / full.norm()).item() > 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trips_bit_exact(name):
    p = CONFIGS[name]
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) for k, v in MMDiT(p).state_dict().items()}
    dsd = stability_to_diffusers(sd, p)
    assert dsd.keys() == diffusers_model(p).state_dict().keys()
    back = diffusers_to_stability(dsd, p)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    ptrs = [t.untyped_storage().data_ptr() for t in dsd.values()]
    assert len(set(ptrs)) == len(ptrs)  # safetensors refuses shared storage


def test_pre_only_and_final_shift_scale_swap():
    p = MEDIUM
    sd = MMDiT(p).state_dict()
    dsd = stability_to_diffusers(sd, p)
    h = p.hidden_size
    for ours_key, theirs in (("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight"),
                             ("joint_blocks.2.context_block.adaLN_modulation.1.weight",
                              "transformer_blocks.2.norm1_context.linear.weight")):
        assert torch.equal(dsd[theirs][:h], sd[ours_key][h:])  # diffusers: (scale, shift)
        assert torch.equal(dsd[theirs][h:], sd[ours_key][:h])
    assert "joint_blocks.2.context_block.mlp.fc1.weight" not in sd  # pre-only: no MLP, no proj
    assert "joint_blocks.2.context_block.attn.proj.weight" not in sd


def test_mismatched_config_is_reported():
    sd = MMDiT(MEDIUM35).state_dict()
    with pytest.raises(FormatError, match="unexpected key.*SD3"):
        stability_to_diffusers(sd, MEDIUM)  # attn2 and ln_q/ln_k left over


def test_published_sizes_on_meta():
    """Parameter counts equal diffusers' for the published configs and round to the published sizes: SD3
    Medium 2.0B and SD3.5 Large 8.1B parameters; SD3.5 Medium's "2.5B" counts its 384 x 384 position table
    (2.24B parameters + 0.23B table elements = 2.47B)."""
    published = {"sd3-medium": (2.0e9, False), "sd3.5-large": (8.1e9, False), "sd3.5-medium": (2.5e9, True)}
    for name, (size, with_table) in published.items():
        p = SD3_PRESETS[name]
        with torch.device("meta"):
            ours = MMDiT(p)
            ref = diffusers.SD3Transformer2DModel(
                num_layers=p.depth, num_attention_heads=p.num_heads, caption_projection_dim=p.hidden_size,
                pos_embed_max_size=p.pos_embed_max_size, dual_attention_layers=p.dual_attention_layers,
                qk_norm="rms_norm" if p.qk_norm else None)
        n = sum(q.numel() for q in ours.parameters())
        assert n == sum(q.numel() for q in ref.parameters())
        if with_table:
            n += ours.pos_embed.numel()
        assert round(n / 1e8) == round(size / 1e8), (name, n)  # equal to the published two digits


def test_bad_inputs_one_line():
    m = MMDiT("sd3-micro")
    x, t, y, ctx = torch.zeros(1, 16, 8, 8), torch.zeros(1), torch.zeros(1, 384), torch.zeros(1, 3, 384)
    with pytest.raises(RectiflowError, match="not divisible by 2; use image sizes divisible by 16"):
        m(torch.zeros(1, 16, 8, 9), t, y, ctx)
    with pytest.raises(RectiflowError, match="exceeds this model's position grid"):
        m(torch.zeros(1, 16, 66, 8), t, y, ctx)
    with pytest.raises(RectiflowError, match="context must be text tokens"):
        m(x, t, y, torch.zeros(1, 3, 10))
    with pytest.raises(RectiflowError, match="y has batch size 2"):
        m(x, t, torch.zeros(2, 384), ctx)


def test_patch_size_one_gives_a_token_per_latent_pixel():
    """An MM-DiT with 1 x 1 patches (64 image tokens on an 8 x 8 latent, studies/default-cpu.toml) runs,
    keeps the latent's shape, and the family counts its tokens (the summary line and the shift read them)."""
    from rectiflow.models.family import FLUX, family_of
    from rectiflow.models.sd3 import sd3_params

    p1 = sd3_params({**sd3_params("sd3-micro").to_dict(), "patch_size": 1, "sample_size": 32})
    m = MMDiT(p1)
    out = m(torch.randn(2, 16, 8, 8), torch.rand(2), torch.zeros(2, 384), torch.zeros(2, 3, 384))
    assert out.shape == (2, 16, 8, 8)
    assert m.x_embedder.proj.kernel_size == (1, 1)
    fam = family_of(m)
    assert fam.image_tokens(8, 8, p1) == 64
    assert fam.image_tokens(8, 8, sd3_params("sd3-micro")) == 16 == FLUX.image_tokens(8, 8)

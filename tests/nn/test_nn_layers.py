"""Embeddings, norms, modulation: closed forms and diffusers' components with identical weights."""

import math

import pytest
import torch

from rectiflow.nn.embeddings import MLPEmbedder, sincos_2d_embedding, timestep_embedding
from rectiflow.nn.modulation import Modulation, modulate
from rectiflow.nn.norms import QKNorm, RMSNorm


def test_timestep_embedding_closed_form_and_x1000():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    half = 4
    for b, tv in enumerate(t.tolist()):
        for i in range(half):
            a = 1000 * tv * math.exp(-math.log(10000) * i / half)
            assert emb[b, i].item() == pytest.approx(math.cos(a), abs=1e-4)
            assert emb[b, half + i].item() == pytest.approx(math.sin(a), abs=1e-4)
    assert timestep_embedding(t, 9).shape == (3, 9) and timestep_embedding(t, 9)[:, -1].abs().sum() == 0


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import Timesteps

    t = torch.rand(5, generator=torch.Generator().manual_seed(0))
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t * 1000)
    torch.testing.assert_close(timestep_embedding(t, 256), ref, rtol=1e-5, atol=1e-5)


def test_mlp_embedder_names_and_math():
    m = MLPEmbedder(4, 6)
    assert sorted(n for n, _ in m.named_parameters()) == [
        "in_layer.bias", "in_layer.weight", "out_layer.bias", "out_layer.weight"]
    x = torch.randn(3, 4)
    ref = m.out_layer(torch.nn.functional.silu(m.in_layer(x)))
    torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("shape", [(4, 4), (3, 5)])
def test_sincos_2d_matches_diffusers(shape):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    h, w = shape
    rows = torch.arange(h)[:, None].expand(h, w).reshape(1, -1).float()
    cols = torch.arange(w)[None, :].expand(h, w).reshape(1, -1).float()
    ours = sincos_2d_embedding(rows, cols, 32)[0]  # [h*w, 32]
    # diffusers' grid is (height, width) = grid_size; base_size == grid_size leaves positions unscaled.
    # get_2d_sincos_pos_embed lays tokens out row-major (row, col) only for square grids; compare per token.
    if h == w:
        ref = get_2d_sincos_pos_embed(32, (h, w), base_size=h).float()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    ref_col = get_1d_sincos_pos_embed_from_grid(16, cols[0]).float()
    ref_row = get_1d_sincos_pos_embed_from_grid(16, rows[0]).float()
    torch.testing.assert_close(ours, torch.cat([ref_col, ref_row], -1), rtol=1e-5, atol=1e-6)


def test_sincos_bad_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_embedding(torch.zeros(1, 2), torch.zeros(1, 2), 6)


def test_rmsnorm_matches_torch_and_computes_in_float32():
    n = RMSNorm(16)
    with torch.no_grad():
        n.scale.normal_()
    x = torch.randn(3, 5, 16)
    ref = torch.nn.functional.rms_norm(x, (16,), n.scale, eps=1e-6)
    torch.testing.assert_close(n(x), ref, rtol=1e-5, atol=1e-6)
    # bf16 input: statistics in float32, then cast, then scaled (BFL): equals the float32 result rounded
    xb = (x * 1e3).bfloat16()
    expect = (torch.nn.functional.rms_norm(xb.float(), (16,), eps=1e-6).bfloat16() * n.scale.bfloat16())
    nb = RMSNorm(16).bfloat16()
    with torch.no_grad():
        nb.scale.copy_(n.scale)
    assert torch.equal(nb(xb), expect)


def test_qknorm_names_and_dtype():
    q = QKNorm(8)
    assert sorted(n for n, _ in q.named_parameters()) == ["key_norm.scale", "query_norm.scale"]
    a, b = q(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))
    assert a.dtype == b.dtype == torch.float64


def test_modulation_order_and_modulate():
    m = Modulation(4, double=True)
    vec = torch.randn(2, 4)
    mod1, mod2 = m(vec)
    raw = m.lin(torch.nn.functional.silu(vec))  # [2, 24] = (shift, scale, gate) x 2
    assert torch.equal(mod1.shift[:, 0], raw[:, 0:4]) and torch.equal(mod2.gate[:, 0], raw[:, 20:24])
    single, none = Modulation(4, double=False)(vec)
    assert none is None and single.gate.shape == (2, 1, 4)
    for b in (2, 1):  # batch of one takes the fused affine-LayerNorm path
        x = torch.randn(b, 3, 4)
        ref = (1 + mod1.scale[:b]) * torch.nn.functional.layer_norm(x, (4,), eps=1e-6) + mod1.shift[:b]
        torch.testing.assert_close(modulate(x, mod1.shift[:b], mod1.scale[:b]), ref)

"""RoPE: against the closed form (complex rotation) and diffusers' FLUX RoPE with the same ids."""

import math

import pytest
import torch

from rectiflow.nn.attention import attention, qk_norm_rope
from rectiflow.nn.norms import rms_norm
from rectiflow.nn.rope import EmbedND, RopeTable, apply_rope, rope_angles


def test_angles_closed_form():
    pos = torch.tensor([[0.0, 1.0, 5.0]])
    ang = rope_angles(pos, 8, 10_000)  # [1, 3, 4]
    for j, p in enumerate([0.0, 1.0, 5.0]):
        for i in range(4):
            assert ang[0, j, i].item() == pytest.approx(p * 10_000 ** (-2 * i / 8), rel=1e-12)


def test_apply_rope_is_complex_multiplication():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)  # [B, L, H, D]
    ids = torch.randint(0, 20, (2, 5, 2), generator=g).float()
    pe = EmbedND(8, 10_000, (4, 4))(ids)
    assert pe.cos.shape == (2, 5, 1, 1, 8) and pe.sin.shape == (2, 5, 1, 1, 4)
    out = apply_rope(x, _per_head(pe))
    ang = torch.cat([rope_angles(ids[..., i], 4, 10_000) for i in range(2)], -1)  # [B, L, 4]
    z = torch.view_as_complex(x.double().reshape(2, 5, 3, 4, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[:, :, None]).reshape(2, 5, 3, 8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # a rotation keeps the norm of every pair
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


def _per_head(pe: RopeTable) -> RopeTable:
    """Tables [B, L, 1, 1, *] -> [B, L, 1, *] to broadcast against x [B, L, H, D]."""
    return RopeTable(pe.cos[:, :, 0], pe.sin[:, :, 0])


def test_matches_diffusers_flux_rope():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.zeros(4, 3), torch.randint(0, 64, (12, 3), generator=g).float()])  # [L, 3]
    x = torch.randn(1, 16, 2, 32, generator=g)  # [B, L, H, D]
    pe = EmbedND(32, 10_000, (4, 14, 14))(ids[None])
    ref = apply_rotary_emb(x, FluxPosEmbed(10_000, [4, 14, 14])(ids), sequence_dim=1)
    torch.testing.assert_close(apply_rope(x, _per_head(pe)), ref, rtol=1e-5, atol=1e-6)


def test_relative_positions_only():
    """q.k after RoPE depends on the position difference only (the point of RoPE)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    emb = EmbedND(16, 10_000, (16,))

    def dot(pq, pk):
        rq = apply_rope(q, _per_head(emb(torch.tensor([[[pq]]]))))
        rk = apply_rope(k, _per_head(emb(torch.tensor([[[pk]]]))))
        return (rq * rk).sum().item()

    assert dot(3.0, 1.0) == pytest.approx(dot(12.0, 10.0), rel=1e-4)
    assert dot(3.0, 1.0) != pytest.approx(dot(3.0, 2.0), rel=1e-4)


def test_attention_matches_explicit_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=g) for _ in range(3))  # [B, L, H, D]
    out = attention(q, k, v)  # [B, L, H * D]
    w = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(8), dim=-1)
    ref = torch.einsum("bhlm,bmhd->blhd", w, v).reshape(2, 6, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_bad_axes():
    with pytest.raises(ValueError, match="sum"):
        EmbedND(16, 10_000, (4, 4))
    with pytest.raises(ValueError, match="axes"):
        EmbedND(8, 10_000, (4, 4))(torch.zeros(1, 2, 3))


def _reference_qk(qk, scale, pe):
    """BFL's order: RMSNorm (float32 stats, cast, times scale) per q / k, then RoPE."""
    outs = []
    for i in range(2):
        n = rms_norm(qk[:, :, i], scale[i])
        outs.append(n if pe is None else apply_rope(n, _per_head(pe)))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("with_rope", [True, False])
def test_fused_qk_norm_rope_matches_reference_and_gradients(with_rope):
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 7, 3, 3, 16, generator=g)  # [B, L, 3, H, D] as viewed from a fused projection
    scale = (torch.rand(2, 16, generator=g) + 0.5).requires_grad_()
    x = qkv[:, :, :2].clone().requires_grad_()
    ids = torch.randint(0, 9, (2, 7, 3), generator=g).float()
    pe = EmbedND(16, 10_000, (4, 6, 6))(ids) if with_rope else None
    out = qk_norm_rope(x, scale, pe)
    ref = _reference_qk(x, scale, pe)
    assert out.is_contiguous() and out.shape == (2, 7, 2, 3, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=g)
    gx, gs = torch.autograd.grad((out * w).sum(), (x, scale))
    rx, rs = torch.autograd.grad((ref * w).sum(), (x, scale))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gs, rs, rtol=1e-4, atol=1e-4)

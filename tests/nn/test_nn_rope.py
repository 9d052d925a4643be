"""RoPE: against the closed form (complex rotation) and diffusers' FLUX RoPE with the same ids."""

import math

import pytest
import torch

from rectiflow.nn.attention import attention
from rectiflow.nn.rope import EmbedND, apply_rope, rope_angles


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
    cos, sin = EmbedND(8, 10_000, (4, 4))(ids)  # [B, L, 1, 4]
    out = apply_rope(x, cos, sin)
    ang = torch.cat([rope_angles(ids[..., i], 4, 10_000) for i in range(2)], -1)  # [B, L, 4]
    z = torch.view_as_complex(x.double().reshape(2, 5, 3, 4, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[:, :, None]).reshape(2, 5, 3, 8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # a rotation keeps the norm of every pair
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_matches_diffusers_flux_rope():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.zeros(4, 3), torch.randint(0, 64, (12, 3), generator=g).float()])  # [L, 3]
    x = torch.randn(1, 16, 2, 32, generator=g)  # [B, L, H, D]
    cos, sin = EmbedND(32, 10_000, (4, 14, 14))(ids[None])
    ref = apply_rotary_emb(x, FluxPosEmbed(10_000, [4, 14, 14])(ids), sequence_dim=1)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, rtol=1e-5, atol=1e-6)


def test_relative_positions_only():
    """q.k after RoPE depends on the position difference only (the point of RoPE)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    emb = EmbedND(16, 10_000, (16,))

    def dot(pq, pk):
        cq, sq = emb(torch.tensor([[[pq]]]))
        ck, sk = emb(torch.tensor([[[pk]]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert dot(3.0, 1.0) == pytest.approx(dot(12.0, 10.0), rel=1e-4)
    assert dot(3.0, 1.0) != pytest.approx(dot(3.0, 2.0), rel=1e-4)


def test_attention_matches_explicit_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=g) for _ in range(3))  # [B, L, H, D]
    out = attention(q, k, v, None)  # [B, L, H * D]
    w = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(8), dim=-1)
    ref = torch.einsum("bhlm,bmhd->blhd", w, v).reshape(2, 6, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_bad_axes():
    with pytest.raises(ValueError, match="sum"):
        EmbedND(16, 10_000, (4, 4))
    with pytest.raises(ValueError, match="axes"):
        EmbedND(8, 10_000, (4, 4))(torch.zeros(1, 2, 3))

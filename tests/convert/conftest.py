"""Fixtures for the convert tests: tiny random FLUX transformers and exact comparisons."""

import dataclasses

import pytest
import torch

from rectiflow.convert.transformer import build_transformer
from rectiflow.models.transformer import TRANSFORMER_PRESETS, FluxParams

# Not a preset (so nothing can be taken from the preset table), guidance on, head dim 32 split (8, 12, 12).
TINY = dataclasses.replace(TRANSFORMER_PRESETS["micro"], hidden_size=64, num_heads=2, depth=2,
                           depth_single_blocks=2, axes_dim=(8, 12, 12), vec_in_dim=24, context_in_dim=40,
                           guidance_embed=True)


def random_model(params: FluxParams, seed: int = 0, dtype=torch.float32):
    """A model whose every tensor is random (norm scales and zero-initialised layers included), so that any
    dropped, swapped or transposed tensor shows up in an exact comparison."""
    model = build_transformer(params, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def tiny():
    return TINY


@pytest.fixture
def make_model():
    return random_model


@pytest.fixture
def assert_same():
    return assert_same_tensors


@pytest.fixture
def tiny_model():
    return random_model(TINY)

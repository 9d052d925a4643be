"""int8 weight quantisation (rectiflow.models.quantize) on a tiny Flux."""

import pytest
import torch

from rectiflow.convert.transformer import build_transformer
from rectiflow.errors import RectiflowError
from rectiflow.models.quantize import is_quantized, quantize_int8
from rectiflow.models.transformer import image_ids, text_ids


def _inputs(b=2, side=16, l_txt=8, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return dict(
        img=torch.randn(b, (side // 2) ** 2, 64, generator=g), img_ids=image_ids(b, side, side),
        txt=torch.randn(b, l_txt, 384, generator=g), txt_ids=text_ids(b, l_txt),
        timesteps=torch.rand(b, generator=g), y=torch.randn(b, 384, generator=g),
    )


def test_int8_output_close_to_fp32_and_original_untouched():
    torch.manual_seed(0)
    model = build_transformer("tiny").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert is_quantized(q) and not is_quantized(model)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    n_q = sum(isinstance(m, DynamicQuantizedLinear) for m in q.modules())
    assert n_q == n_linear > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = _inputs()
    with torch.inference_mode():
        ref, out = model(**x), q(**x)
    rel = ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert 0 < rel < 0.05, rel  # int8 differs from fp32, but only by quantisation noise


def test_int8_inplace_returns_same_module():
    model = build_transformer("micro").eval()
    q = quantize_int8(model, inplace=True)
    assert q is model and is_quantized(model)
    with pytest.raises(RectiflowError, match="already quantised"):
        quantize_int8(model)


def test_int8_refuses_non_fp32_and_non_cpu():
    with pytest.raises(RectiflowError, match="float32"):
        quantize_int8(build_transformer("micro", dtype=torch.bfloat16))
    with pytest.raises(RectiflowError, match="CPU only"):
        quantize_int8(build_transformer("micro", device="meta"))
    with pytest.raises(RectiflowError, match="no parameters"):
        quantize_int8(torch.nn.ReLU())


def test_int8_linear_exposes_float_weight_for_direct_readers():
    """A forward that reads `linear.weight` instead of calling the module still gets a usable float weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = quantize_int8(torch.nn.Sequential(lin))[0]
    assert q.weight.dtype == torch.float32 and q.weight.shape == (32, 64)
    assert (q.weight - lin.weight).abs().max() < 0.01 * lin.weight.abs().max()
    assert torch.equal(q.bias, lin.bias)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        direct = torch.addmm(q.bias, x, q.weight.t())
        torch.testing.assert_close(q(x), direct, rtol=0.02, atol=0.02)
    assert "qint8" in repr(q)

"""Block offload (rectiflow.models.offload): hook logic tested on the CPU, memory on a GPU (marker gpu)."""

import pytest
import torch

from rectiflow.convert.transformer import build_transformer
from rectiflow.errors import RectiflowError
from rectiflow.models.offload import enable_offload, offload_blocks
from rectiflow.models.transformer import image_ids, text_ids


def _inputs(device="cpu", b=2):
    g = torch.Generator().manual_seed(0)
    x = dict(img=torch.randn(b, 16, 64, generator=g), img_ids=image_ids(b, 8, 8), txt=torch.randn(b, 4, 384,
             generator=g), txt_ids=text_ids(b, 4), timesteps=torch.rand(b, generator=g),
             y=torch.randn(b, 384, generator=g))
    return {k: v.to(device) for k, v in x.items()}


def _devices_seen(model):
    """Record, per block forward, the device of that block's weights while it runs."""
    seen = []
    for block in offload_blocks(model):
        block.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).device.type))
    return seen


def test_offload_streams_every_block_and_matches():
    torch.manual_seed(0)
    model = build_transformer("micro").eval().requires_grad_(False)
    with torch.inference_mode():
        ref = model(**_inputs())
    handle = enable_offload(model, "cpu")
    blocks = offload_blocks(model)
    assert len(blocks) == model.params.depth + model.params.depth_single_blocks
    masters = [next(b.parameters()).data for b in blocks]
    with torch.inference_mode():
        out = model(**_inputs())
        out2 = model(**_inputs())
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert handle.loads == 2 * len(blocks)  # each block uploaded once per forward, just in time
    # after the forward every block holds its master (offload-device) copy again
    assert all(next(b.parameters()).data_ptr() == m.data_ptr() for b, m in zip(blocks, masters))
    handle.remove()
    assert not hasattr(model, "_rectiflow_offload")
    with torch.inference_mode():
        assert torch.equal(model(**_inputs()), ref)
    assert handle.loads == 2 * len(blocks)  # hooks removed


def test_offload_refuses_training_and_non_block_models():
    model = build_transformer("micro")
    enable_offload(model, "cpu")
    with pytest.raises(RectiflowError, match="inference"):
        model(**_inputs())
    with pytest.raises(RectiflowError, match="already enabled"):
        enable_offload(model, "cpu")
    with pytest.raises(RectiflowError, match="no nn.ModuleList"):
        enable_offload(torch.nn.Linear(2, 2), "cpu")


@pytest.mark.gpu
def test_offload_on_cuda_keeps_blocks_off_the_gpu():
    torch.manual_seed(0)
    model = build_transformer("tiny").eval().requires_grad_(False)
    with torch.inference_mode():
        ref = model(**_inputs())
    enable_offload(model, "cuda")
    seen = _devices_seen(model)
    assert all(next(b.parameters()).device.type == "cpu" for b in offload_blocks(model))
    assert model.img_in.weight.device.type == "cuda"
    with torch.inference_mode():
        out = model(**_inputs("cuda"))
    assert set(seen) == {"cuda"}
    assert all(next(b.parameters()).device.type == "cpu" for b in offload_blocks(model))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)

"""LoRA adapters (rectiflow.nn.lora): targets, identity at init, stacking, merge / unmerge, on / off."""

import pytest
import torch

from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.models.transformer import Flux, image_ids, text_ids
from rectiflow.nn.lora import (
    add_lora,
    base_state_dict,
    enable_lora,
    lora_modules,
    lora_names,
    lora_parameters,
    merge_lora,
    remove_lora,
    resolve_targets,
    set_lora_scale,
    unmerge_lora,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return Flux("micro").eval()


def _inputs(p, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 16, p.in_channels, generator=g),
        image_ids(b, 8, 8),
        torch.randn(b, 5, p.context_in_dim, generator=g),
        text_ids(b, 5),
        torch.rand(b, generator=g),
        torch.randn(b, p.vec_in_dim, generator=g),
    )


def _randomise(model, name, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in lora_modules(model, name):
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.1)


def test_groups_select_the_documented_layers():
    m = _model()
    attn = resolve_targets(m, "attn")
    assert "double_blocks.0.img_attn.qkv" in attn and "double_blocks.0.txt_attn.proj" in attn
    assert "single_blocks.0.linear1" in attn and "single_blocks.0.linear2" in attn
    assert resolve_targets(m, "mlp") == [
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mlp.2",
        "double_blocks.0.txt_mlp.0",
        "double_blocks.0.txt_mlp.2",
    ]
    mod = resolve_targets(m, "mod")
    assert set(mod) == {
        "double_blocks.0.img_mod.lin",
        "double_blocks.0.txt_mod.lin",
        "single_blocks.0.modulation.lin",
        "final_layer.adaLN_modulation.1",
    }
    every = resolve_targets(m, "all")
    assert set(attn) | set(resolve_targets(m, "mlp")) | set(mod) < set(every)
    assert "img_in" in every and "final_layer.linear" in every
    assert resolve_targets(m, ["double_blocks.*.img_attn.qkv"]) == ["double_blocks.0.img_attn.qkv"]
    assert resolve_targets(m, "re:single_blocks\\.\\d+\\.linear[12]") == [
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    ]


def test_bad_targets_raise_one_line():
    m = _model()
    with pytest.raises(ConfigError, match="targets are empty"):
        resolve_targets(m, [])
    with pytest.raises(ConfigError, match="matches no linear layer"):
        add_lora(m, rank=2, targets="nothing.like.this")
    with pytest.raises(ConfigError, match="exceeds layer"):
        add_lora(m, rank=65, targets="attn")
    with pytest.raises(ConfigError, match="scale must be a finite number"):
        add_lora(m, rank=2, scale="big")


def test_new_adapter_is_identity_and_keeps_base_keys():
    m = _model()
    x = _inputs(m.params)
    keys = set(m.state_dict())
    with torch.no_grad():
        before = m(*x)
        add_lora(m, "a", rank=4, targets="all")
        after = m(*x)
    assert torch.equal(before, after)
    assert set(base_state_dict(m)) == keys
    assert lora_names(m) == ["a"]
    assert all(p.requires_grad for p in lora_parameters(m))


def test_stacking_equals_the_summed_update_and_merge_unmerge():
    m = _model()
    x = _inputs(m.params)
    add_lora(m, "a", rank=4, alpha=8, targets=["attn", "mlp"])
    add_lora(m, "b", rank=2, alpha=1, targets="all", scale=0.5)
    _randomise(m, "a", 2)
    _randomise(m, "b", 3)
    set_lora_scale(m, "a", 0.7)
    with torch.no_grad():
        out = m(*x)
    # the same update written into a plain model's weights by hand: W + sum scale * alpha / r * up @ down
    ref = _model()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for n, a in lora_modules(m):
            mods[n].weight += a.scale * a.alpha / a.rank * a.up.weight @ a.down.weight
        expect = ref(*x)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    assert (out - _model()(*x)).abs().max() > 1e-3  # the adapters matter

    original = {k: v.clone() for k, v in base_state_dict(m).items()}
    assert merge_lora(m) == len(list(lora_modules(m)))
    with torch.no_grad():
        merged = m(*x)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5 * out.abs().max().item())
    unmerge_lora(m)
    for k, v in base_state_dict(m).items():
        assert (v - original[k]).norm() <= 1e-6 * original[k].norm() + 1e-12, k
    with torch.no_grad():
        assert torch.allclose(m(*x), out, rtol=1e-5, atol=1e-6)


def test_enable_disable_and_remove():
    m = _model()
    x = _inputs(m.params)
    with torch.no_grad():
        base = m(*x)
    add_lora(m, "a", rank=4, targets="attn")
    _randomise(m, "a")
    with torch.no_grad():
        on = m(*x)
        enable_lora(m, "a", False)
        off = m(*x)
        enable_lora(m, "a", True)
        again = m(*x)
    assert torch.equal(off, base) and torch.equal(again, on) and not torch.equal(on, base)
    merge_lora(m, "a")
    with pytest.raises(RectiflowError, match="unmerge it first"):
        enable_lora(m, "a", False)
    unmerge_lora(m, "a")
    remove_lora(m)
    assert lora_names(m) == []
    with torch.no_grad():
        torch.testing.assert_close(m(*x), base, rtol=1e-6, atol=1e-6)
    with pytest.raises(RectiflowError, match="no LoRA"):
        merge_lora(m)


def test_dropout_acts_in_training_only():
    m = _model()
    x = _inputs(m.params)
    add_lora(m, "a", rank=4, targets="attn", dropout=0.5)
    _randomise(m, "a")
    m.train()
    torch.manual_seed(0)
    a = m(*x)
    torch.manual_seed(1)
    b = m(*x)
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m(*x), m(*x))


def test_only_adapters_get_gradients():
    m = _model()
    for p in m.parameters():
        p.requires_grad_(False)
    add_lora(m, "a", rank=2, targets="attn")
    m.train()
    m(*_inputs(m.params)).square().mean().backward()
    grads = [n for n, p in m.named_parameters() if p.grad is not None]
    assert grads and all(".lora.a." in n for n in grads)

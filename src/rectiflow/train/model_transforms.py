"""Functions applied to a built model (docs/design.md: never branches inside forward).

Both keep parameter names (and so checkpoints) unchanged: they replace each transformer block's `forward`
on the instance (activation checkpointing) or compile the block in place (nn.Module.compile).

Why not torch's checkpoint_wrapper: benchmarks/activation_checkpointing.py measures it bitwise equal in loss
and gradients and equal in activation memory, but it renames every block parameter (a
`_checkpoint_wrapped_module.` level), and the EMA, the validation's EMA swap and the export key on
named_parameters(). The name-keeping variant, torch.distributed._composable.checkpoint (also measured equal),
is a private torch module; this patch uses only the public torch.utils.checkpoint.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["transformer_blocks", "apply_activation_checkpointing", "apply_regional_compile", "unwrap"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a Flux (text refiner, double- and single-stream) or SD3 (joint) model: the units of FSDP,
    checkpointing and compile."""
    names = ("txt_refiner", "double_blocks", "single_blocks", "joint_blocks")
    return [block for name in names for block in getattr(model, name, [])]


def _checkpointed(forward, *args):
    # Non-reentrant checkpointing: works with keyword-free calls, RoPE table objects and no-grad inputs.
    return checkpoint(forward, *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass instead of storing them (memory for ~1/3
    more compute). Returns the same model."""
    for block in transformer_blocks(model):
        if not isinstance(block.forward, functools.partial):  # idempotent
            block.forward = functools.partial(_checkpointed, block.forward)
    return model


def apply_regional_compile(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each block separately (regional compilation: one compiled graph reused by identical
    blocks, far shorter compile times than the whole model). Returns the same model."""
    for block in transformer_blocks(model):
        block.compile(**compile_kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 `fully_shard` keeps the module itself)."""
    inner = getattr(model, "module", None)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return inner if is_ddp and inner is not None else model

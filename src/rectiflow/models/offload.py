"""Block-wise model offload for GPUs too small to hold the whole transformer, applied to a built model.

`enable_offload(model, device)` keeps the weights of every block of the model's block lists
(`nn.ModuleList` children, e.g. FLUX's `double_blocks` and `single_blocks`) in CPU memory and moves one
block to `device` just in time, with a forward pre-hook, and drops it again with a forward hook once the
block has run. Everything outside the block lists (embedders, final layer: a few percent of the weights)
is moved to `device` once and stays there. Peak device memory is then the resident part plus one block
plus activations.

Inference only: the CPU copy is the master copy and device copies are discarded after each block, so
weight updates made on the device would be lost (the hooks refuse to run with grad enabled on trainable
weights). On CUDA the CPU copies are pinned and copied with `non_blocking=True`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from rectiflow.errors import RectiflowError

log = logging.getLogger(__name__)


@dataclass
class OffloadHandle:
    """Returned by `enable_offload`; `remove()` undoes it (all weights back on the offload device)."""

    model: nn.Module
    device: torch.device
    offload_device: torch.device
    blocks: list[nn.Module]
    loads: int = 0  # number of block uploads so far (one per block per forward)
    _hooks: list = field(default_factory=list)
    _master: dict = field(default_factory=dict)  # id(tensor slot) -> CPU master tensor

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.model.to(self.offload_device)
        for block in self.blocks:
            _assign(block, self._master[id(block)])
        self._master.clear()
        delattr(self.model, "_rectiflow_offload")


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner module, attribute name, is_parameter) for every parameter and buffer of `module`."""
    out = []
    for mod in module.modules():
        out += [(mod, n, True) for n, p in mod._parameters.items() if p is not None]
        out += [(mod, n, False) for n, b in mod._buffers.items() if b is not None]
    return out


def _assign(block: nn.Module, tensors: list[torch.Tensor]) -> None:
    for (mod, name, is_param), t in zip(_tensors(block), tensors, strict=True):
        if is_param:
            mod._parameters[name].data = t
        else:
            mod._buffers[name] = t


def offload_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that `enable_offload` streams: the elements of every `nn.ModuleList` child of `model`."""
    return [b for child in model.children() if isinstance(child, nn.ModuleList) for b in child]


def enable_offload(model: nn.Module, device: str | torch.device,
                   offload_device: str | torch.device = "cpu") -> OffloadHandle:
    """Stream `model`'s blocks to `device` just in time during forward; returns an `OffloadHandle`.

    The model's inputs must be on `device`. Call `handle.remove()` to undo (weights end on
    `offload_device`). Raises RectiflowError when the model has no block lists or is already offloaded.
    """
    device, offload_device = torch.device(device), torch.device(offload_device)
    if hasattr(model, "_rectiflow_offload"):
        raise RectiflowError("enable_offload: offload is already enabled on this model; call remove() first")
    blocks = offload_blocks(model)
    if not blocks:
        raise RectiflowError(
            f"enable_offload: {type(model).__name__} has no nn.ModuleList of blocks to stream; "
            "offload works on block-structured models such as Flux"
        )
    handle = OffloadHandle(model, device, offload_device, blocks)
    # Resident part: everything outside the block lists goes to the device once.
    for child in model.children():
        if not isinstance(child, nn.ModuleList):
            child.to(device)
    for p in model._parameters.values():  # tensors registered on the root module itself
        if p is not None:
            p.data = p.data.to(device)
    for name, b in model._buffers.items():
        if b is not None:
            model._buffers[name] = b.to(device)
    pin = device.type == "cuda" and offload_device.type == "cpu"
    for block in blocks:
        master = []
        for mod, name, is_param in _tensors(block):
            t = (mod._parameters[name].data if is_param else mod._buffers[name]).to(offload_device)
            master.append(t.pin_memory() if pin else t)
        handle._master[id(block)] = master
        _assign(block, master)
        handle._hooks.append(block.register_forward_pre_hook(_make_load(handle, block, pin)))
        handle._hooks.append(block.register_forward_hook(_make_unload(handle, block)))
    model._rectiflow_offload = handle
    log.info("offload: %d blocks streamed to %s, the rest resident", len(blocks), device)
    return handle


def _make_load(handle: OffloadHandle, block: nn.Module, non_blocking: bool):
    def load(module, args):
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise RectiflowError(
                "offload is for inference: run under torch.no_grad()/inference_mode(), or freeze the weights"
            )
        _assign(block, [t.to(handle.device, non_blocking=non_blocking) for t in handle._master[id(block)]])
        handle.loads += 1

    return load


def _make_unload(handle: OffloadHandle, block: nn.Module):
    def unload(module, args, output):
        _assign(block, handle._master[id(block)])  # drop the device copy; the master copy is unchanged

    return unload

"""Activation checkpointing: rectiflow's per-block forward patch vs torch's checkpoint wrappers.

    python benchmarks/activation_checkpointing.py [--preset tiny] [--size 128] [--batch 2]

Why this exists: train.model_transforms.apply_activation_checkpointing wraps each block's forward in
torch.utils.checkpoint; torch also offers `checkpoint_wrapper` (torch.distributed.algorithms._checkpoint,
what torchtitan applies) and the composable `torch.distributed._composable.checkpoint`. This compares, on one
forward + backward of the same weights and batch:
  - numerics: the loss and every parameter gradient, bitwise, against the patch;
  - activation memory: the bytes of tensors kept for the backward pass during the forward (counted with
    torch.autograd.graph.saved_tensors_hooks; deterministic, unlike a peak-RSS reading on a busy machine);
  - parameter names: the EMA, the validation's EMA swap and the export key on named_parameters().
No timing: the three recompute the same blocks.
"""

from __future__ import annotations

import argparse
import copy

import torch

from _common import print_machine_info
from rectiflow.convert.transformer import build_transformer
from rectiflow.models.transformer import image_ids, pack, text_ids
from rectiflow.train.model_transforms import apply_activation_checkpointing, transformer_blocks

WRAPPED = "._checkpoint_wrapped_module"  # the prefix checkpoint_wrapper puts into parameter names


def _apply(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "patch":
        apply_activation_checkpointing(model)
    elif kind == "checkpoint_wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for blocks in (model.double_blocks, model.single_blocks):
            for i in range(len(blocks)):
                blocks[i] = checkpoint_wrapper(blocks[i])
    elif kind == "composable":
        from torch.distributed._composable import checkpoint

        for block in transformer_blocks(model):
            checkpoint(block)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (latents: size / 8)")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    print_machine_info()
    torch.manual_seed(0)
    base = build_transformer(args.preset)
    p = base.params
    b, h = args.batch, args.size // 8
    g = torch.Generator().manual_seed(1)
    x = pack(torch.randn(b, p.in_channels // 4, h, h, generator=g))  # [b, (h/2)^2, in_channels]
    txt, vec = torch.randn(b, 8, p.context_in_dim, generator=g), torch.randn(b, p.vec_in_dim, generator=g)
    t, target = torch.rand(b, generator=g), torch.randn(x.shape, generator=g)

    def run(kind: str):
        model = _apply(copy.deepcopy(base), kind)
        saved = [0]

        def keep(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda z: z):
            out = model(x, image_ids(b, h, h), txt, text_ids(b, 8), t, vec, None)
            loss = (out - target).pow(2).mean()
        loss.backward()
        return loss.item(), {n: q.grad for n, q in model.named_parameters()}, saved[0]

    print(f"preset {args.preset}, {args.size} px ({(h // 2) ** 2} image tokens), batch {args.batch}, fp32")
    results = {k: run(k) for k in ("none", "patch", "checkpoint_wrapper", "composable")}
    ref_loss, ref_grads, _ = results["patch"]
    for kind, (loss, grads, saved) in results.items():
        renamed = [n for n in grads if WRAPPED in n]
        same = all(torch.equal(gr, ref_grads[n.replace(WRAPPED, "")]) for n, gr in grads.items())
        print(f"{kind:18s} loss {loss:.9f} (== patch: {loss == ref_loss}), gradients bitwise == patch: "
              f"{same}, kept for backward {saved / 2**20:7.2f} MiB, "
              f"renamed parameters {len(renamed)}/{len(grads)}")


if __name__ == "__main__":
    main()

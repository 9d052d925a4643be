"""LoRA adapters on the linear layers of a built model (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

    y = W x + b + sum over adapters a of  scale_a * (alpha_a / rank_a) * up_a(down_a(dropout_a(x)))

`down` is [rank, in] and `up` is [out, rank] (kohya's lora_down / lora_up = PEFT's lora_A / lora_B); the
effective multiplier scale * alpha / rank is kohya's and PEFT's convention. A fresh adapter has `down`
initialised like PEFT (kaiming-uniform, a = sqrt(5)) and `up` zero, so it starts as the identity.

Applied as a function to a built model (docs/design.md: LoRA is never a branch inside forward): each targeted
module keeps its type and its parameter names (`qkv.weight` stays `qkv.weight`, so the base state dict is
unchanged); it gains a child `lora` (a ModuleDict of named adapters, so adapters move with `.to()`, with
block offloading and with DDP) and one forward hook that adds the adapters' outputs. Several named adapters
stack on one module, each with its own scale; each can be disabled, merged into the weight and unmerged.

Why not peft (the ecosystem's adapter library, installed with the test extra and used by the parity tests
through diffusers): peft replaces each targeted nn.Linear by a wrapper whose base weight is renamed
`<module>.base_layer.weight`, so the model's state dict no longer has BFL's checkpoint keys, and its
wrappers are typed by layer class (an int8 layer would need its own wrapper). A hook keeps names and types.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rectiflow.errors import ConfigError, RectiflowError

__all__ = [
    "LoraAdapter",
    "TARGET_GROUPS",
    "add_lora",
    "attach_lora",
    "lora_names",
    "lora_modules",
    "lora_parameters",
    "lora_state",
    "set_lora_scale",
    "enable_lora",
    "merge_lora",
    "unmerge_lora",
    "remove_lora",
    "resolve_targets",
    "has_lora",
    "base_state_dict",
    "base_hash",
]

LORA_ATTR = "lora"  # the child ModuleDict on a targeted module
_HOOK_ATTR = "_lora_hook_handle"

# Target groups by module name (BFL / rectiflow names; glob patterns over the dotted module path).
# attn: the attention projections of both streams and the single blocks' fused in/out projections (issue 19;
# kohya's and ai-toolkit's FLUX LoRAs train these); mlp: the double blocks' feed-forward layers; mod: adaLN's
# modulation linears; all: every linear layer of the model (embedders and the final layer included).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("*_attn.qkv", "*_attn.proj", "single_blocks.*.linear1", "single_blocks.*.linear2"),
    "mlp": ("*_mlp.0", "*_mlp.2"),
    "mod": ("*_mod.lin", "*.modulation.lin", "final_layer.adaLN_modulation.1"),
    "all": ("*",),
}


class LoraAdapter(nn.Module):
    """One low-rank update of a linear layer: down [rank, in], up [out, rank], alpha, scale, dropout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if int(rank) < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = _check_scale(scale)
        self.enabled = True
        self.merged = False
        self.down = nn.Linear(in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(self.rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # PEFT's LoraLayer.reset_lora_parameters
        nn.init.zeros_(self.up.weight)

    @property
    def multiplier(self) -> float:
        """scale * alpha / rank: what up(down(x)) is multiplied by."""
        return self.scale * self.alpha / self.rank

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged and self.scale != 0.0

    def delta_weight(self) -> torch.Tensor:
        """multiplier * up @ down, [out, in], in float32."""
        return (self.up.weight.float() @ self.down.weight.float()) * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.down(self.dropout(x.to(self.down.weight.dtype))))
        return h * self.multiplier

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, enabled={self.enabled}, "
            f"merged={self.merged}"
        )


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        raise ConfigError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _lora_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    for adapter in getattr(module, LORA_ATTR).values():
        if adapter.active:
            output = output + adapter(x).to(output.dtype)
    return output


def _features(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise RectiflowError(f"LoRA targets linear layers; {type(module).__name__} is not one")


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear and the int8 dynamic linear (rectiflow.models.quantize) both carry in/out_features
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and hasattr(module, "weight")
        and not isinstance(module, LoraAdapter)
    )


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and _is_linear(m) and f".{LORA_ATTR}." not in f".{n}."]


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the linear layers selected by group names (attn, mlp, mod, all) and/or glob patterns over
    dotted module names ("double_blocks.*.img_attn.qkv"; "re:" + a regular expression matched in full)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ConfigError("LoRA targets are empty; name groups (attn, mlp, mod, all) or module patterns")
    names = _linear_names(model)
    chosen: set[str] = set()
    for item in items:
        item = str(item).strip()
        if item.startswith("re:"):
            try:
                rx = re.compile(item[3:])
            except re.error as e:
                raise ConfigError(f"LoRA target {item!r} is not a valid regular expression: {e}") from None
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            patterns = TARGET_GROUPS.get(item, (item,))
            hits = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not hits:
            raise ConfigError(
                f"LoRA target {item!r} matches no linear layer of this model; groups are "
                f"{', '.join(TARGET_GROUPS)}, e.g. layers: {', '.join(names[:4])}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]  # model order


def attach_lora(module: nn.Module, name: str, adapter: LoraAdapter) -> LoraAdapter:
    """Add `adapter` under `name` to one linear layer (installs the hook once)."""
    in_f, out_f = _features(module)
    if adapter.down.in_features != in_f or adapter.up.out_features != out_f:
        raise RectiflowError(
            f"LoRA adapter {name!r} is [{adapter.up.out_features}, {adapter.down.in_features}] "
            f"but the layer is [{out_f}, {in_f}]"
        )
    if not hasattr(module, LORA_ATTR):
        module.add_module(LORA_ATTR, nn.ModuleDict())
        setattr(module, _HOOK_ATTR, module.register_forward_hook(_lora_hook))
    stack = getattr(module, LORA_ATTR)
    if name in stack:
        raise RectiflowError(f"a LoRA named {name!r} is already attached; pick another name or remove it")
    stack[name] = adapter
    return adapter


def add_lora(
    model: nn.Module,
    name: str = "default",
    *,
    rank: int,
    alpha: float | None = None,
    targets: str | Iterable[str] = "attn",
    dropout: float = 0.0,
    scale: float = 1.0,
) -> list[str]:
    """Attach a fresh trainable adapter `name` to every targeted linear layer; returns their names."""
    if name in lora_names(model):
        raise RectiflowError(f"a LoRA named {name!r} is already attached; pick another name or remove it")
    chosen = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    for n in chosen:
        m = modules[n]
        in_f, out_f = _features(m)
        w = m.weight
        if rank > min(in_f, out_f):
            raise ConfigError(
                f"LoRA rank {rank} exceeds layer {n} ([{out_f}, {in_f}]); use rank <= {min(in_f, out_f)}"
            )
        dtype = w.dtype if w.is_floating_point() else torch.float32
        attach_lora(
            m, name, LoraAdapter(in_f, out_f, rank, alpha, dropout, scale, device=w.device, dtype=dtype)
        )
    return chosen


def lora_modules(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, LoraAdapter]]:
    """(module name, adapter) of adapter `name` (or every adapter) in model order."""
    for n, m in model.named_modules():
        stack = getattr(m, LORA_ATTR, None)
        if isinstance(stack, nn.ModuleDict) and not isinstance(m, LoraAdapter):
            for a_name, adapter in stack.items():
                if name is None or a_name == name:
                    yield n, adapter


def lora_names(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in order of first appearance."""
    return list(
        dict.fromkeys(
            a
            for _, m in model.named_modules()
            for a in (getattr(m, LORA_ATTR, None) or {})
            if isinstance(getattr(m, LORA_ATTR, None), nn.ModuleDict)
        )
    )


def has_lora(model: nn.Module) -> bool:
    return bool(lora_names(model))


def _require(model: nn.Module, name: str | None) -> list[tuple[str, LoraAdapter]]:
    found = list(lora_modules(model, name))
    if not found:
        have = lora_names(model)
        raise RectiflowError(
            f"no LoRA named {name!r} is attached (attached: {', '.join(have) or 'none'})"
            if name is not None
            else "no LoRA is attached to this model"
        )
    return found


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    return [p for _, a in _require(model, name) for p in (a.down.weight, a.up.weight)]


def lora_state(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name -> (down [r, in], up [out, r], alpha) of adapter `name` (detached tensors)."""
    return {n: (a.down.weight.detach(), a.up.weight.detach(), a.alpha) for n, a in _require(model, name)}


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    scale = _check_scale(scale)
    for _, a in _require(model, name):
        if a.merged:
            raise RectiflowError(f"LoRA {name!r} is merged; unmerge it before changing its scale")
        a.scale = scale


def enable_lora(model: nn.Module, name: str | None = None, enabled: bool = True) -> None:
    """Switch adapter `name` (or all) on or off without removing it (merged adapters: unmerge first)."""
    for _, a in _require(model, name):
        if a.merged:
            raise RectiflowError("a merged LoRA cannot be disabled; unmerge it first")
        a.enabled = enabled


@torch.no_grad()
def merge_lora(model: nn.Module, name: str | None = None) -> int:
    """Add each enabled, unmerged adapter's update into its layer's weight (computed in float32); returns how
    many were merged. The forward then skips them; `unmerge_lora` subtracts the same update."""
    modules = dict(model.named_modules())
    count = 0
    for n, a in _require(model, name):
        if a.merged or not a.enabled:
            continue
        w = modules[n].weight
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise RectiflowError(
                f"cannot merge a LoRA into {n}: its weight is not a float parameter (int8?); "
                "merge before quantising"
            )
        w.copy_((w.float() + a.delta_weight().to(w.device)).to(w.dtype))
        a.merged = True
        count += 1
    return count


@torch.no_grad()
def unmerge_lora(model: nn.Module, name: str | None = None) -> int:
    """Subtract merged adapters' updates again (exact to float32 rounding for float32 weights)."""
    modules = dict(model.named_modules())
    count = 0
    for n, a in _require(model, name):
        if not a.merged:
            continue
        w = modules[n].weight
        w.copy_((w.float() - a.delta_weight().to(w.device)).to(w.dtype))
        a.merged = False
        count += 1
    return count


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Detach adapter `name` (or all). Merged updates stay in the weights (unmerge first to drop them)."""
    for m in list(model.modules()):
        stack = getattr(m, LORA_ATTR, None)
        if not isinstance(stack, nn.ModuleDict) or isinstance(m, LoraAdapter):
            continue
        for a_name in [a for a in stack if name is None or a == name]:
            del stack[a_name]
        if not len(stack):
            delattr(m, LORA_ATTR)
            getattr(m, _HOOK_ATTR).remove()
            delattr(m, _HOOK_ATTR)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapter tensors (the keys of the model as built)."""
    marker = f".{LORA_ATTR}."
    return {k: v for k, v in model.state_dict().items() if marker not in f".{k}"}


def base_hash(model: nn.Module) -> str:
    """16 hex digits of SHA-256 over the base weights (name, dtype, shape, bytes; adapters excluded), so a
    LoRA file or checkpoint can say which weights it was trained on."""
    import hashlib

    h = hashlib.sha256()
    sd = base_state_dict(model)
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(sd[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

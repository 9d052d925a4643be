"""LoRA fine-tuning inside the Trainer (the [lora] config section): freeze the base, train adapters only.

- `apply_training_lora(model, cfg.lora)`: every base parameter frozen, a fresh adapter named "default"
  (float32) on the targeted linears; returns the base weights' hash (rectiflow.convert.lora.base_hash),
  which checkpoints record so that a resume onto other base weights is refused.
- `LoraStateIO`: checkpoints hold the adapter tensors only (a few MB instead of the model); the optimizer
  was built over the adapters alone, so its state is theirs.
- `export_lora`: the trained adapter in every format of cfg.lora.formats (kohya and/or diffusers), with
  ModelSpec-style metadata (base hash, rank, alpha, targets, trigger word, training settings).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from rectiflow.errors import ConfigError
from rectiflow.flow import cfg_combine
from rectiflow.nn.lora import LORA_ATTR, add_lora, base_hash, enable_lora
from rectiflow.train.model_transforms import unwrap

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER",
    "apply_training_lora",
    "LoraStateIO",
    "export_lora",
    "export_checkpoint",
    "EXPORT_NAMES",
]

ADAPTER = "default"
EXPORT_NAMES = {"kohya": "lora-kohya.safetensors", "diffusers": "lora-diffusers.safetensors"}


def is_adapter_key(key: str) -> bool:
    return f".{LORA_ATTR}." in f".{key}"


def apply_training_lora(model: torch.nn.Module, lora_cfg) -> str:
    """Freeze `model`, attach the trainable adapter; returns the hash of the (frozen) base weights."""
    from rectiflow.models.quantize import is_quantized

    if is_quantized(model):
        raise ConfigError(
            "LoRA training needs a float base model; int8 layers have no gradient for their "
            "input (train on the float weights, quantise for inference)"
        )
    digest = base_hash(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = add_lora(
        model,
        ADAPTER,
        rank=lora_cfg.rank,
        alpha=lora_cfg.alpha or None,
        targets=lora_cfg.targets,
        dropout=lora_cfg.dropout,
    )
    for n, m in model.named_modules():  # adapters train in float32 whatever the base dtype
        if n in names:
            getattr(m, LORA_ATTR)[ADAPTER].float()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "LoRA rank %d on %d layers: %d trainable parameters (base %s frozen)",
        lora_cfg.rank,
        len(names),
        n_train,
        digest,
    )
    return digest


class LoraStateIO:
    """Wraps a state IO (PlainStateIO / FSDP2StateIO interface) so that model state = adapter tensors."""

    def __init__(self, inner):
        self.inner = inner

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", copy=True)
            for k, v in unwrap(model).state_dict().items()
            if is_adapter_key(k)
        }

    def state_keys(self, model: torch.nn.Module) -> set[str]:
        return {k for k in unwrap(model).state_dict() if is_adapter_key(k)}

    def load_model_state(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        want = self.state_keys(model)
        if set(sd) != want:
            missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
            raise ConfigError(
                f"the checkpoint's adapters do not match [lora] (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); resume with the config saved beside it"
            )
        # strict=False because the frozen base weights are not part of the adapter state: exactly the base
        # keys are missing (the adapter keys were matched above)
        missing, _ = unwrap(model).load_state_dict(sd, strict=False)
        assert not any(is_adapter_key(k) for k in missing)

    def optim_state(self, model, optimizer) -> dict:
        return self.inner.optim_state(model, optimizer)

    def load_optim_state(self, model, optimizer, sd: dict) -> None:
        self.inner.load_optim_state(model, optimizer, sd)

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return self.inner.full_tensor(t)

    def load_ema(self, ema: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        self.inner.load_ema(ema, full)


def _adapters(sd: dict[str, torch.Tensor], alpha: float) -> dict:
    from rectiflow.convert.lora_keys import LoraTensors

    suffix = f".{LORA_ATTR}.{ADAPTER}.down.weight"
    return {
        key[: -len(suffix)]: LoraTensors(t, sd[key[: -len("down.weight")] + "up.weight"], alpha)
        for key, t in sd.items()
        if key.endswith(suffix)
    }


def _write_all(sd, cfg, base: str, step: int, params, out: Path, formats) -> list[Path]:
    from rectiflow.convert.lora import write_lora
    from rectiflow.train.config import config_to_dict

    meta = {
        "base_hash": base,
        "targets": list(cfg.lora.targets),
        "trigger": cfg.lora.trigger,
        "training": {
            "steps": step,
            "lr": cfg.optim.lr,
            "batch_size": cfg.data.batch_size,
            "dropout": cfg.lora.dropout,
            "init": cfg.model.init,
            "cache": cfg.data.cache,
        },
        "train_config": config_to_dict(cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    adapters = _adapters(sd, float(cfg.lora.alpha or cfg.lora.rank))
    paths = []
    for fmt in formats:
        paths.append(write_lora(adapters, out / EXPORT_NAMES[fmt], format=fmt, params=params, metadata=meta))
        log.info("exported the %s LoRA to %s", fmt, paths[-1])
    return paths


class LoraTargets:
    """The [lora] section's changes to the training target (applied in this order):
    guide g != 1: every sample's target becomes v_u + g (target - v_u), v_u the model's own unconditional
        output (the cached "" caption; no gradient), a guided target for a base that samples without CFG;
    preserve (a glob of sample ids): the matching samples' target becomes the frozen base model's output at
        the same inputs (adapters off, no gradient), replacing the above for them.
    `forward(model_input, t, txt, vec, h, w, guidance)` is the trainer's model call (the family's, in its
    precision context); `uncond` = (txt [L, D], vec [Dv]) of the cached "" caption."""

    def __init__(self, lora_cfg, model: torch.nn.Module, forward: Callable[..., torch.Tensor],
                 uncond: tuple[torch.Tensor, torch.Tensor]):
        self.guide, self.preserve = float(lora_cfg.guide), lora_cfg.preserve
        self.model, self.forward = model, forward
        self.uncond = uncond

    def __call__(self, ids: list[str], target, model_input, t, txt, vec, h: int, w: int, guidance):
        if self.guide != 1.0:
            b = model_input.shape[0]
            txt0, vec0 = (u.to(txt.device, txt.dtype) for u in self.uncond)
            with torch.no_grad():
                v_u = self.forward(model_input, t, txt0.expand(b, *txt0.shape), vec0.expand(b, *vec0.shape),
                                   h, w, guidance).float()
            target = cfg_combine(target.float(), v_u, self.guide).to(target.dtype)
        keep = [fnmatch.fnmatchcase(i, self.preserve) for i in ids] if self.preserve else []
        if any(keep):
            k = torch.tensor(keep, device=target.device)
            g = None if guidance is None else guidance[k]
            base = base_prediction(
                self.model, lambda: self.forward(model_input[k], t[k], txt[k], vec[k], h, w, g))
            target = target.clone()
            target[k] = base.to(target.dtype)
        return target


def base_prediction(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`forward()` with every adapter of `model` switched off and no gradient: the frozen base model's
    output, the target of lora.preserve samples."""
    enable_lora(unwrap(model), enabled=False)
    try:
        with torch.no_grad():
            return forward()
    finally:
        enable_lora(unwrap(model), enabled=True)


def export_lora(sd: dict[str, torch.Tensor], cfg, *, base_hash: str, step: int, params,
                out: Path) -> list[Path]:
    """Write the adapter tensors `sd` (EMA or live; keys `<module>.lora.default.{down,up}.weight`) of a run
    with config `cfg` in each of cfg.lora.formats under `out`; base_hash: the base model's weights hash,
    step: the training step, params: the base model's params (all recorded in the files' metadata)."""
    return _write_all(sd, cfg, base_hash, step, params, out, cfg.lora.formats)


def export_checkpoint(path: str | Path, out: str | Path, formats=None, ema: bool = True) -> list[Path]:
    """The adapter of a LoRA training checkpoint (its EMA when it has one and `ema`) written as LoRA
    files under `out` (cfg.lora.formats unless `formats` is given): for runs that were interrupted."""
    from rectiflow.train.checkpoint import load_checkpoint
    from rectiflow.train.config import config_from_dict

    c = load_checkpoint(path)
    if "lora_base_hash" not in c.state:
        raise ConfigError(f"{path} is not a LoRA training checkpoint (no [lora] section in its run)")
    cfg = config_from_dict(c.config)
    sd = c.ema if (ema and c.ema is not None) else c.model
    return _write_all(
        sd, cfg, c.state["lora_base_hash"], c.step, None, Path(out), formats or cfg.lora.formats
    )

"""Whole-file LoRA operations behind `rectiflow lora`: describe, merge into a base, extract from two models.

`extract_lora` is kohya sd-scripts networks/extract_lora_from_models.py's method: per linear layer, the
truncated SVD of the weight difference, tuned - base = U S V^T ~ (U_r S_r) V_r^T, stored as up = U_r S_r,
down = V_r^T, alpha = rank (multiplier 1). The kept energy of a layer is sum(S_r^2) / sum(S^2), the fraction
of the difference's squared Frobenius norm that the rank-r update reproduces.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rectiflow.convert.lora import LoraFile, read_lora, write_lora
from rectiflow.convert.lora_keys import LoraTensors
from rectiflow.errors import ConfigError, FormatError
from rectiflow.nn.lora import TARGET_GROUPS

log = logging.getLogger(__name__)

__all__ = ["describe_lora", "merge_into", "extract_lora", "Extraction"]


def _groups(modules: list[str]) -> dict[str, int]:
    import fnmatch

    out = {}
    for g, patterns in TARGET_GROUPS.items():
        if g == "all":
            continue
        n = sum(any(fnmatch.fnmatchcase(m, p) for p in patterns) for m in modules)
        if n:
            out[g] = n
    grouped = sum(out.values())
    if grouped < len(modules):
        out["other"] = len(modules) - grouped
    return out


def describe_lora(f: LoraFile) -> dict:
    """What `rectiflow lora info` prints: format, ranks, alphas, targeted modules, base hints."""
    ranks = sorted(set(f.ranks.values()))
    alphas = sorted({a.alpha for a in f.adapters.values()})
    blocks = {"double": set(), "single": set()}
    hidden = None
    for m, a in f.adapters.items():
        mm = re.match(r"(double|single)_blocks\.(\d+)\.", m)
        if mm:
            blocks[mm.group(1)].add(int(mm.group(2)))
        if m.endswith(("attn.qkv", "linear1", "attn.proj", "linear2")):
            hidden = int(a.down.shape[1]) if not m.endswith("linear2") else hidden
    meta = f.metadata
    hints = {
        k: meta[k]
        for k in (
            "modelspec.architecture",
            "ss_base_model_version",
            "ss_sd_model_name",
            "modelspec.trigger_phrase",
        )
        if k in meta
    }
    info = f.info
    if info.get("base_hash"):
        hints["base_hash"] = info["base_hash"]
    if hidden:
        hints["hidden_size"] = hidden
        hints["flux_size"] = "FLUX.1 (12B)" if hidden == 3072 else "a smaller FLUX-style model"
    return {
        "file": str(f.path),
        "format": f.format,
        "modules": len(f.adapters),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "targets": _groups(list(f.adapters)),
        "blocks": {k: f"{min(v)}..{max(v)}" if v else "none" for k, v in blocks.items()},
        "parameters": sum(a.down.numel() + a.up.numel() for a in f.adapters.values()),
        "skipped_text_encoder_tensors": len(f.skipped),
        "base_hints": hints,
        "trigger": info.get("trigger") or meta.get("modelspec.trigger_phrase", ""),
    }


def merge_into(
    base: str | Path, lora: str | Path, out: str | Path, scale: float = 1.0, format: str = "rectiflow"
) -> Path:
    """Load transformer `base`, add the LoRA's update (times scale) into its weights, save it to `out`."""
    from rectiflow.convert.lora import load_lora
    from rectiflow.convert.transformer import load_transformer, save_transformer
    from rectiflow.nn.lora import merge_lora, remove_lora

    model = load_transformer(base, dtype=torch.float32)
    load_lora(model, lora, scale=scale)
    merge_lora(model)
    remove_lora(model)
    return save_transformer(model, out, format=format)


@dataclass
class Extraction:
    path: Path
    rank: int
    modules: int
    energy: float  # kept energy over all layers together
    min_energy: float  # the worst layer's
    unchanged: int  # layers whose weights are identical (no adapter written)


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    rank: int,
    format: str = "kohya",
    min_change: float = 0.0,
) -> Extraction:
    """A rank-`rank` LoRA that turns `base` into (approximately) `tuned`: truncated SVD of each linear
    layer's weight difference. Layers whose relative change |dW| / |W| is <= min_change are skipped."""
    from rectiflow.convert.transformer import load_transformer
    from rectiflow.nn.lora import base_hash, resolve_targets

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank!r}")
    a = load_transformer(base, dtype=torch.float32)
    b = load_transformer(tuned, dtype=torch.float32)
    if a.params != b.params:
        raise FormatError(
            f"{base} and {tuned} are different models ({a.params.hidden_size} / "
            f"{b.params.hidden_size} hidden, {a.params.depth} / {b.params.depth} double blocks); "
            "extract from a base and its own fine-tune"
        )
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    adapters, kept, total, worst, unchanged = {}, 0.0, 0.0, 1.0, 0
    for name in resolve_targets(a, "all"):
        wa, wb = mods_a[name].weight.detach(), mods_b[name].weight.detach()
        if rank > min(wa.shape):
            raise ConfigError(
                f"--rank {rank} is larger than layer {name} ([{wa.shape[0]}, {wa.shape[1]}]); use "
                f"--rank <= {min(wa.shape)}"
            )
        diff = wb - wa
        if float(diff.norm()) <= min_change * float(wa.norm()):
            unchanged += 1
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)  # diff = u diag(s) vh
        e = s.pow(2)
        kept += float(e[:rank].sum())
        total += float(e.sum())
        worst = min(worst, float(e[:rank].sum() / e.sum()))
        adapters[name] = LoraTensors(
            vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous(), float(rank)
        )
    if not adapters:
        raise FormatError(f"{base} and {tuned} have identical linear weights: nothing to extract")
    meta = {
        "base_hash": base_hash(a),
        "extracted_from": {"base": str(base), "tuned": str(tuned)},
        "kept_energy": kept / total,
    }
    path = write_lora(adapters, out, format, a.params, meta)
    log.info(
        "extracted a rank-%d LoRA of %d layers to %s (kept energy %.4f)",
        rank,
        len(adapters),
        path,
        kept / total,
    )
    return Extraction(path, rank, len(adapters), kept / total, worst, unchanged)


def convert_file(src: str | Path, dst: str | Path, to: str) -> Path:
    """Rewrite a LoRA file in another layout (tensors copied exactly; rectiflow metadata kept)."""
    f = read_lora(src)
    info = f.info or {}
    if not info and "modelspec.trigger_phrase" in f.metadata:
        info["trigger"] = f.metadata["modelspec.trigger_phrase"]
    info = json.loads(json.dumps(info))
    info.setdefault("converted_from", f.format)
    return write_lora(f.adapters, dst, to, None, info)

"""LoRA file layouts for FLUX <-> rectiflow's adapters keyed by BFL module name. Pure functions on dicts.

The internal form: {BFL module name: LoraTensors(down [r, in], up [out, r], alpha)}, the update being
(alpha / r) * up @ down added to that module's weight (kohya's and PEFT's convention).

Layouts (key names read from kohya sd-scripts networks/lora_flux.py and diffusers
loaders/lora_conversion_utils.py / lora_pipeline.py FluxLoraLoaderMixin.lora_state_dict):
- kohya / sd-scripts: `lora_unet_<BFL module, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha` (scalar); `lora_te1_*` keys belong to the CLIP text encoder.
- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` with diffusers'
  split q/k/v (`attn.to_q`, `attn.add_q_proj`, single blocks' `proj_mlp` ...); alphas as `<module>.alpha`
  keys or in the `lora_adapter_metadata` JSON (PEFT LoraConfig fields r, lora_alpha, rank_pattern,
  alpha_pattern), else alpha = r.
- BFL-named PEFT (ComfyUI, ai-toolkit): `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or
  a `transformer.` prefix, or lora_down / lora_up), optional `.alpha`.
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` (image stream; `qkv_lora2` text, `proj_lora1/2`),
  `single_blocks.0.processor.qkv_lora.*` (the q, k, v rows of linear1) and `proj_lora` (linear2); no alpha
  (multiplier 1).

Split modules (q, k, v; linear1's mlp rows) land in row slices of BFL's fused qkv / linear1. Parts that share
one down matrix (as a kohya file split for diffusers has) fuse back to one adapter of that rank; otherwise
the fused adapter stacks the parts' down matrices (rank = the sum) over a block-diagonal up. Writing
diffusers undoes either exactly, so every read layout round-trips through every written one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from rectiflow.convert.flux_keys import linear_module_map
from rectiflow.errors import FormatError
from rectiflow.models.transformer import FluxParams

__all__ = [
    "LoraTensors",
    "identify_layout",
    "from_kohya",
    "to_kohya",
    "from_diffusers",
    "to_diffusers",
    "from_bfl_peft",
    "from_xlabs",
    "guess_params",
    "TEXT_ENCODER_PREFIXES",
]

KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = (
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "text_encoder.",
    "text_encoder_2.",
    "te1.",
    "te2.",
)
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
# BFL module names (block-relative or global) that a kohya underscore name can stand for.
_BLOCK_MODULES = (
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "img_mod.lin",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
    "txt_mod.lin",
    "linear1",
    "linear2",
    "modulation.lin",
)
_GLOBAL_MODULES = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)
_UNET_HINTS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
_XLABS = {
    "qkv_lora1": "img_attn.qkv",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "proj_lora2": "txt_attn.proj",
    "qkv_lora": "linear1",
    "proj_lora": "linear2",
}


# Modules whose input is the hidden state (in BFL, diffusers and XLabs names): their down matrix is
# [r, hidden], which tells a LoRA file's model size.
_HIDDEN_INPUT = (
    "attn.qkv",
    "attn.proj",
    "linear1",
    "mod.lin",
    "modulation.lin",
    "mlp.0",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "proj_mlp",
    "to_out.0",
    "to_add_out",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "ff.net.0.proj",
    "ff_context.net.0.proj",
    "qkv_lora",
    "qkv_lora1",
    "qkv_lora2",
    "proj_lora1",
    "proj_lora2",
)


class LoraTensors(NamedTuple):
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float


Adapters = dict[str, LoraTensors]


def _unet_error(key: str) -> FormatError:
    return FormatError(
        f"this LoRA is for a Stable Diffusion 1.5 / SDXL UNet (key {key!r}), not a FLUX "
        "transformer; use a FLUX LoRA"
    )


def identify_layout(keys: list[str]) -> str:
    """ "kohya", "diffusers", "bfl" or "xlabs" from the tensor names (FormatError for anything else)."""
    model_keys = [k for k in keys if not k.startswith(TEXT_ENCODER_PREFIXES)]
    for k in model_keys:
        if any(h in k for h in _UNET_HINTS) or k.startswith("unet."):
            raise _unet_error(k)
    if not model_keys:
        raise FormatError(
            "this LoRA has no transformer tensors (text-encoder keys only, or empty); nothing "
            "to apply to a FLUX transformer"
        )
    if any(k.startswith(KOHYA_PREFIX) for k in model_keys):
        return "kohya"
    if any(".processor." in k for k in model_keys):
        return "xlabs"
    stripped = [_strip(k, _BFL_PREFIXES) for k in model_keys]
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in stripped):
        return "bfl"
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in stripped) or any(
        ".lora_A." in k or ".lora_B." in k for k in model_keys
    ):
        return "diffusers"
    raise FormatError(
        f"unrecognised LoRA layout (e.g. key {model_keys[0]!r}); rectiflow reads kohya, "
        "diffusers / PEFT, BFL-named PEFT and XLabs FLUX LoRAs"
    )


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _unknown(what: str, keys: list[str]) -> FormatError:
    return FormatError(
        f"{what}: {len(keys)} unknown key(s), e.g. {sorted(keys)[:4]}; not a FLUX transformer "
        "LoRA module this reader knows (nothing was applied)"
    )


def _alpha_value(t) -> float:
    return float(t.item() if torch.is_tensor(t) else t)


def _kohya_module(name: str) -> str | None:
    """BFL module for a kohya module name without the lora_unet_ prefix ("double_blocks_0_img_attn_qkv")."""
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", name)
    if m:
        sub = {s.replace(".", "_"): s for s in _BLOCK_MODULES}.get(m.group(3))
        return f"{m.group(1)}.{m.group(2)}.{sub}" if sub else None
    return {s.replace(".", "_"): s for s in _GLOBAL_MODULES}.get(name)


def _pairs(tensors: Mapping[str, torch.Tensor], down_suffix: str, up_suffix: str, what: str):
    """{module key: (down, up, alpha or None)} from keys `<m><down_suffix>`, `<m><up_suffix>`, `<m>.alpha`."""
    out, unknown = {}, []
    for k in tensors:
        if k.endswith(down_suffix):
            m = k[: -len(down_suffix)]
            if m + up_suffix not in tensors:
                raise FormatError(f"{what}: {k!r} has no matching {m + up_suffix!r}; the file is incomplete")
            alpha = tensors.get(m + ".alpha")
            out[m] = (tensors[k], tensors[m + up_suffix], None if alpha is None else _alpha_value(alpha))
    used = {m + s for m in out for s in (down_suffix, up_suffix, ".alpha")}
    unknown = [k for k in tensors if k not in used]
    if unknown:
        raise _unknown(what, unknown)
    return out


def _lt(down, up, alpha) -> LoraTensors:
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise FormatError(
            f"LoRA pair of shapes down {tuple(down.shape)} / up {tuple(up.shape)} is not a "
            "low-rank pair ([r, in] and [out, r])"
        )
    return LoraTensors(down, up, float(down.shape[0]) if alpha is None else alpha)


# ------------------------------------------------------------------------------------------------- kohya
def from_kohya(tensors: Mapping[str, torch.Tensor]) -> Adapters:
    pairs = _pairs(tensors, ".lora_down.weight", ".lora_up.weight", "kohya LoRA")
    out, unknown = {}, []
    for key, (down, up, alpha) in pairs.items():
        module = _kohya_module(key[len(KOHYA_PREFIX) :]) if key.startswith(KOHYA_PREFIX) else None
        if module is None:
            unknown.append(key)
            continue
        out[module] = _lt(down, up, alpha)
    if unknown:
        if any(h in k for k in unknown for h in _UNET_HINTS):
            raise _unet_error(unknown[0])
        raise _unknown("kohya LoRA", unknown)
    return out


def to_kohya(adapters: Adapters) -> dict[str, torch.Tensor]:
    out = {}
    for module, a in adapters.items():
        k = KOHYA_PREFIX + module.replace(".", "_")
        out[k + ".lora_down.weight"] = a.down.contiguous()
        out[k + ".lora_up.weight"] = a.up.contiguous()
        out[k + ".alpha"] = torch.tensor(float(a.alpha), dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------- BFL PEFT
def from_bfl_peft(tensors: Mapping[str, torch.Tensor]) -> Adapters:
    stripped = {_strip(k, _BFL_PREFIXES): v for k, v in tensors.items()}
    if any(k.endswith(".lora_A.weight") for k in stripped):
        pairs = _pairs(stripped, ".lora_A.weight", ".lora_B.weight", "BFL-named LoRA")
    else:
        pairs = _pairs(stripped, ".lora_down.weight", ".lora_up.weight", "BFL-named LoRA")
    known = set(_GLOBAL_MODULES)
    bad = [
        m
        for m in pairs
        if m not in known
        and not re.fullmatch(
            r"(double|single)_blocks\.\d+\.(" + "|".join(re.escape(s) for s in _BLOCK_MODULES) + ")", m
        )
    ]
    if bad:
        raise _unknown("BFL-named LoRA", bad)
    return {m: _lt(*v) for m, v in pairs.items()}


# ------------------------------------------------------------------------------------------------- xlabs
def from_xlabs(tensors: Mapping[str, torch.Tensor], params: FluxParams) -> Adapters:
    stripped = {_strip(k, _BFL_PREFIXES): v for k, v in tensors.items()}
    pairs = _pairs(stripped, ".down.weight", ".up.weight", "XLabs LoRA")
    out, unknown = {}, []
    h = params.hidden_size
    for key, (down, up, alpha) in pairs.items():
        m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", key)
        sub = _XLABS.get(m.group(3)) if m else None
        if sub is None or (m.group(1) == "double_blocks") != sub.startswith(("img", "txt")):
            unknown.append(key)
            continue
        if sub == "linear1":  # XLabs' single-block qkv_lora covers the q, k, v rows of linear1 only
            full = up.new_zeros(3 * h + int(h * params.mlp_ratio), up.shape[1])
            full[: up.shape[0]] = up
            up = full
        out[f"{m.group(1)}.{m.group(2)}.{sub}"] = _lt(down, up, alpha)
    if unknown:
        raise _unknown("XLabs LoRA", unknown)
    return out


# --------------------------------------------------------------------------------------------- diffusers
def _diffusers_alphas(modules: list[str], metadata: Mapping | None) -> dict[str, float]:
    if not metadata:
        return {}
    cfg = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    out = {}
    alpha = cfg.get("lora_alpha")
    pattern = cfg.get("alpha_pattern") or {}
    for m in modules:
        hit = [v for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?{k.lstrip('^')}", m)]
        if hit:
            out[m] = float(hit[0])
        elif alpha is not None:
            out[m] = float(alpha)
    return out


def from_diffusers(
    tensors: Mapping[str, torch.Tensor], params: FluxParams, metadata: Mapping | None = None
) -> Adapters:
    """diffusers / PEFT keys -> BFL adapters; split q/k/v (and proj_mlp) fuse into qkv / linear1."""
    stripped = {_strip(k, _DIFFUSERS_PREFIXES): v for k, v in tensors.items()}
    pairs = _pairs(stripped, ".lora_A.weight", ".lora_B.weight", "diffusers LoRA")
    table = linear_module_map(params)
    unknown = [m for m in pairs if m not in table]
    if unknown:
        raise _unknown("diffusers LoRA", unknown)
    meta_alpha = _diffusers_alphas(list(pairs), metadata)
    groups: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor, float]]] = {}
    for m, (down, up, alpha) in pairs.items():
        bfl, r0, r1, swapped = table[m]
        a = alpha if alpha is not None else meta_alpha.get(m, float(down.shape[0]))
        if up.shape[0] != r1 - r0:
            raise FormatError(
                f"diffusers LoRA key {m}.lora_B.weight has {up.shape[0]} rows but {bfl} rows "
                f"{r0}:{r1} of this model are {r1 - r0}; the LoRA is for another FLUX size"
            )
        if swapped:  # diffusers' norm_out is (scale, shift), BFL's final adaLN (shift, scale)
            sc, sh = up.chunk(2, dim=0)
            up = torch.cat([sh, sc], dim=0)
        groups.setdefault(bfl, []).append((r0, r1, down, up, a))
    rows = _fused_rows(params)
    return {bfl: _fuse(parts, rows.get(bfl)) for bfl, parts in groups.items()}


def _fused_rows(params: FluxParams) -> dict[str, int]:
    h, mlp = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    out = {}
    for i in range(params.depth):
        out[f"double_blocks.{i}.img_attn.qkv"] = out[f"double_blocks.{i}.txt_attn.qkv"] = 3 * h
    for i in range(params.depth_single_blocks):
        out[f"single_blocks.{i}.linear1"] = 3 * h + mlp
    return out


def _fuse(parts, total_rows: int | None) -> LoraTensors:
    parts = sorted(parts, key=lambda p: p[0])
    if total_rows is None:  # a plain module: one part covering all rows
        r0, r1, down, up, alpha = parts[0]
        return LoraTensors(down, up, alpha)
    d0, a0 = parts[0][2], parts[0][4]
    shared = all(torch.equal(p[2], d0) and p[4] == a0 for p in parts)
    if shared:  # one down matrix for all parts (a kohya fused LoRA split for diffusers): rank r
        up = d0.new_zeros(total_rows, d0.shape[0], dtype=parts[0][3].dtype)
        for r0, r1, _, u, _ in parts:
            up[r0:r1] = u
        return LoraTensors(d0, up, a0)
    ratios = [p[4] / p[2].shape[0] for p in parts]
    rank = sum(p[2].shape[0] for p in parts)
    same = all(r == ratios[0] for r in ratios)
    down = torch.cat([p[2] for p in parts], dim=0)  # [sum r, in]
    up = down.new_zeros(total_rows, rank, dtype=parts[0][3].dtype)
    c = 0
    for (r0, r1, d, u, _), ratio in zip(parts, ratios):
        up[r0:r1, c : c + d.shape[0]] = u if same else u * ratio  # different alpha / r: fold into up
        c += d.shape[0]
    return LoraTensors(down, up, ratios[0] * rank if same else float(rank))


def to_diffusers(adapters: Adapters, params: FluxParams) -> tuple[dict[str, torch.Tensor], dict]:
    """BFL adapters -> (diffusers tensors with the `transformer.` prefix, PEFT LoraConfig fields)."""
    table = linear_module_map(params)
    by_bfl: dict[str, list[tuple[str, int, int, bool]]] = {}
    for dm, (bfl, r0, r1, swapped) in table.items():
        by_bfl.setdefault(bfl, []).append((dm, r0, r1, swapped))
    out, ranks, alphas = {}, {}, {}
    for bfl, a in adapters.items():
        if bfl not in by_bfl:
            raise FormatError(f"LoRA module {bfl} has no diffusers counterpart in this model config")
        for dm, down, up, alpha in _split(a, sorted(by_bfl[bfl], key=lambda s: s[1])):
            out[f"transformer.{dm}.lora_A.weight"] = down.contiguous()
            out[f"transformer.{dm}.lora_B.weight"] = up.contiguous()
            ranks[dm], alphas[dm] = int(down.shape[0]), float(alpha)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
    }
    return out, config


def _split(a: LoraTensors, slices):
    if len(slices) == 1:
        dm, r0, r1, swapped = slices[0]
        up = a.up
        if swapped:
            sh, sc = up.chunk(2, dim=0)
            up = torch.cat([sc, sh], dim=0)
        return [(dm, a.down, up.clone(), a.alpha)]
    rank = a.down.shape[0]
    used = [(a.up[r0:r1] != 0).any(dim=0) for _, r0, r1, _ in slices]  # [rank] columns each slice uses
    disjoint = all(not bool((used[i] & used[j]).any()) for i in range(len(used)) for j in range(i))
    if disjoint and any(bool(u.any()) for u in used):  # block-diagonal: each slice its own down rows
        res = []
        for (dm, r0, r1, _), cols in zip(slices, used):
            if cols.any():
                idx = cols.nonzero().flatten()
                res.append((dm, a.down[idx].clone(), a.up[r0:r1][:, idx].clone(), a.alpha * len(idx) / rank))
        return res
    zero = [not bool(u.any()) for u in used]
    keep = [s for s, z in zip(slices, zero) if not z] if not all(zero) else slices
    return [(dm, a.down.clone(), a.up[r0:r1].clone(), a.alpha) for dm, r0, r1, _ in keep]


# ------------------------------------------------------------------------------------------------ params
def guess_params(adapters_or_tensors: Mapping[str, object], layout: str) -> FluxParams:
    """A FluxParams with the hidden size, mlp width and depths a LoRA implies (for reading / converting a
    file without a model): only the fields that place row slices matter."""
    h, mlp, depth, single = None, None, 0, 0
    for k, v in adapters_or_tensors.items():
        name = k if layout == "bfl-internal" else _strip(k, _BFL_PREFIXES)
        t = v.down if isinstance(v, LoraTensors) else v
        for pat, is_single in (
            (r"(?:double_blocks|transformer_blocks)\.(\d+)\.", False),
            (r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.", True),
        ):
            m = re.match(pat, name)
            if m:
                if is_single:
                    single = max(single, int(m.group(1)) + 1)
                else:
                    depth = max(depth, int(m.group(1)) + 1)
        module = re.sub(r"\.(lora_A|lora_B|down|up|lora_down|lora_up)\.weight$|\.alpha$", "", name)
        takes_hidden = module.endswith(_HIDDEN_INPUT) and not name.endswith((".lora_B.weight", ".up.weight"))
        if takes_hidden and t.ndim == 2:
            h = int(t.shape[-1])
        if isinstance(v, LoraTensors) and name.endswith("linear1") and h:
            mlp = int(v.up.shape[0]) - 3 * h
        if name.endswith("proj_mlp.lora_B.weight"):
            mlp = int(v.shape[0])
    if h is None:
        raise FormatError(
            "cannot tell this LoRA's hidden size (no attention module); load it onto a model instead"
        )
    mlp = mlp if mlp else 4 * h  # FLUX's mlp_ratio
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=h,
        mlp_ratio=mlp / h,
        num_heads=1,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=(h,),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    )

"""FLUX transformer checkpoints: build, load (BFL / ComfyUI / diffusers / rectiflow files), save, inspect.

SD3 / SD3.5 checkpoints go through the same build / load / save functions: the family is detected from the
file (or the config) and rectiflow.convert.sd3 handles them.

Formats
- "bfl": one safetensors file with BFL keys (flux1-schnell.safetensors / flux1-dev.safetensors: 776 / 780
  tensors). Also read with ComfyUI's `model.diffusion_model.` prefix (any prefix, in fact; tensors outside it,
  e.g. a bundled VAE or text encoder, are ignored with a log line).
- "diffusers": a `transformer/` folder (config.json + diffusion_pytorch_model.safetensors, or shards with
  diffusion_pytorch_model.safetensors.index.json), or the pipeline folder holding it. Keys are converted
  exactly by rectiflow.convert.flux_keys (fused qkv / linear1 split and merged, final norm shift/scale swap).
- "rectiflow": a BFL-keyed safetensors file whose metadata holds the config: `rectiflow.format_version`
  ("1"), `rectiflow.model` ("flux-transformer") and `rectiflow.config` (JSON of FluxParams fields).

Loading never holds two copies of the weights: the model is built on the meta device, each tensor is read
straight into its own buffer (converted to the target dtype one tensor at a time), and
`load_state_dict(..., strict=True, assign=True)` adopts the tensors. Before any data is read, the key names
and shapes in the header are checked against the model; a mismatch raises FormatError naming the
missing / unexpected / mis-shaped keys and what the file most likely is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rectiflow.convert.identify import (
    ANCHORS,
    CheckpointSource,
    find_prefix,
    flux_dims,
    flux_variant,
    guess_checkpoint,
)
from rectiflow.errors import ConfigError, FormatError
from rectiflow.io.atomic import atomic_dir
from rectiflow.io.metadata import (
    FLUX_TRANSFORMER_KIND,
    FORMAT_VERSION,
    META_CONFIG,
    META_MODEL,
    META_VERSION,
    rectiflow_header,
)
from rectiflow.io.safetensors_io import (
    check_save_path,
    iter_tensors,
    read_diffusers_weights,
    read_header,
    save_safetensors,
    save_sharded,
    state_dict_mismatch,
)
from rectiflow.models.transformer import PATCH_SIZE, TRANSFORMER_PRESETS, Flux, FluxParams, transformer_params

__all__ = [
    "FORMATS", "TransformerSource", "build_transformer", "load_transformer", "save_transformer",
    "inspect_transformer", "infer_params", "describe_params", "diffusers_config",
    "params_from_diffusers_config",
]

log = logging.getLogger(__name__)

FORMATS = ("rectiflow", "bfl", "diffusers", "stability")  # bfl: FLUX single files; stability: SD3's
DIFFUSERS_CLASS = "FluxTransformer2DModel"
# diffusers ModelMixin.save_pretrained(max_shard_size="10GB"); huggingface_hub parses "GB" as 10**9 bytes.
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9
# FLUX's RoPE split of its 128-wide heads and base (BFL flux/util.py configs: axes_dim=[16, 56, 56],
# theta=10_000); diffusers hard-codes the same theta (FluxTransformer2DModel: FluxPosEmbed(theta=10000)).
FLUX_HEAD_DIM, FLUX_AXES_DIM, FLUX_THETA = 128, (16, 56, 56), 10_000
# Defaults of diffusers' FluxTransformer2DModel.__init__ (diffusers 0.42), used for fields a config omits.
_DIFFUSERS_DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19,
                       "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                       "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": False,
                       "axes_dims_rope": [16, 56, 56]}


@dataclasses.dataclass(frozen=True)
class TransformerSource(CheckpointSource):
    """A FLUX transformer checkpoint as found on disk, before any tensor data is read."""

    # format: "rectiflow" | "bfl" | "diffusers"; params: FluxParams or None

    @property
    def layout(self) -> str:
        return "diffusers" if self.format == "diffusers" else "bfl"


# ----------------------------------------------------------------------------------------------- inspect


def inspect_transformer(path: str | Path) -> TransformerSource:
    """Identify a transformer checkpoint (file or folder) from headers and config files only (an SD3 one
    gives a rectiflow.convert.sd3.SD3Source)."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p} does not exist: check the path")
    sd3_src = _sd3().inspect_sd3(p)
    if sd3_src is not None:
        return sd3_src
    if p.is_dir():
        return _inspect_folder(p)
    header = read_header(p)  # refuses pickles and truncated files
    if META_VERSION in header.metadata:
        return TransformerSource(p, "rectiflow", header.tensors, _params_from_metadata(p, header.metadata))
    infos = header.tensors
    for layout in ("bfl", "diffusers"):
        prefix = find_prefix(infos, [ANCHORS[layout]])
        if prefix is None:
            continue
        kept = {k[len(prefix):]: dataclasses.replace(t, name=k[len(prefix):])
                for k, t in infos.items() if k.startswith(prefix)}
        if len(kept) < len(infos):
            log.info("%s: using the %d tensors under %r, ignoring %d others", p, len(kept), prefix,
                     len(infos) - len(kept))
        return TransformerSource(p, "bfl" if layout == "bfl" else "diffusers", kept, None, prefix)
    guess = guess_checkpoint(infos)
    if guess:
        raise FormatError(f"{p} is not a FLUX transformer: this looks like {guess}")
    first = ", ".join(list(infos)[:3]) or "none"
    raise FormatError(f"{p} is not a FLUX transformer checkpoint: none of its {len(infos)} tensors is img_in "
                      f"(BFL) or x_embedder (diffusers); first keys: {first}")


def _params_from_metadata(p: Path, meta: dict[str, str]) -> FluxParams:
    if meta[META_VERSION] != FORMAT_VERSION:
        raise FormatError(f"{p} uses rectiflow format version {meta[META_VERSION]}, this rectiflow reads "
                          f"version {FORMAT_VERSION}: upgrade rectiflow")
    kind = meta.get(META_MODEL, FLUX_TRANSFORMER_KIND)
    if kind != FLUX_TRANSFORMER_KIND:
        raise FormatError(f"{p} holds a rectiflow {kind}, not a transformer")
    try:
        return transformer_params(json.loads(meta[META_CONFIG]))
    except (KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{p}: unreadable {META_CONFIG} metadata ({e}); re-save the file") from e


def _inspect_folder(d: Path) -> TransformerSource:
    if not (d / "config.json").is_file() and (d / "transformer").is_dir():
        d = d / "transformer"  # a diffusers pipeline folder
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{d} is a folder without config.json: pass a diffusers transformer/ folder, its "
                          "pipeline folder, or a .safetensors file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise FormatError(f"{cfg_path} is not valid JSON ({e}); re-download it") from e
    cls = cfg.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise FormatError(f"{cfg_path} describes a {cls}, not a {DIFFUSERS_CLASS} (FLUX transformer)")
    infos, _ = read_diffusers_weights(d)
    return TransformerSource(d, "diffusers", infos, params_from_diffusers_config(cfg, cfg_path))


def params_from_diffusers_config(cfg: dict[str, Any], where: str | Path = "config") -> FluxParams:
    """FluxParams from a diffusers FluxTransformer2DModel config.json (fields it omits take its defaults)."""
    c = {**_DIFFUSERS_DEFAULTS, **cfg}
    if c["patch_size"] != 1:
        raise FormatError(f"{where}: patch_size {c['patch_size']} is not supported (FLUX uses 1)")
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    try:
        # mlp_ratio 4, qkv biases and theta are fixed in diffusers' FluxTransformer2DModel.
        return FluxParams(
            in_channels=c["in_channels"], out_channels=c["out_channels"] or c["in_channels"],
            vec_in_dim=c["pooled_projection_dim"], context_in_dim=c["joint_attention_dim"],
            hidden_size=heads * head_dim, mlp_ratio=4.0, num_heads=heads, depth=c["num_layers"],
            depth_single_blocks=c["num_single_layers"], axes_dim=tuple(c["axes_dims_rope"]), theta=FLUX_THETA,
            qkv_bias=True, guidance_embed=bool(c["guidance_embeds"]),
        )
    except ConfigError as e:
        raise FormatError(f"{where}: {e}") from e


def diffusers_config(params: FluxParams) -> dict[str, Any]:
    """The config.json of diffusers' FluxTransformer2DModel for `params` (refuses what it cannot express)."""
    _check_portable(params, "diffusers")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.30.0",  # first diffusers release with FluxTransformer2DModel
        "patch_size": 1,
        "in_channels": params.in_channels,
        "out_channels": params.out_channels,
        "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": list(params.axes_dim),
    }


def _check_portable(params: FluxParams, fmt: str) -> None:
    if params.pos_embed != "rope":
        raise FormatError(f"pos_embed={params.pos_embed!r} is a rectiflow-only ablation that the {fmt} "
                          "format cannot record: save with format='rectiflow'")
    if params.text_pos != "none":
        raise FormatError(f"text_pos={params.text_pos!r} is a rectiflow-only ablation that the {fmt} "
                          "format cannot record: save with format='rectiflow'")
    if not params.pooled_text:
        raise FormatError(f"pooled_text=False is a rectiflow-only ablation (no vector_in) that the {fmt} "
                          "format cannot record: save with format='rectiflow'")
    if params.patch_size != PATCH_SIZE:
        raise FormatError(f"patch_size={params.patch_size} is a rectiflow-only ablation (FLUX packs 2x2 "
                          f"patches) that the {fmt} format cannot record: save with format='rectiflow'")
    if params.text_refiner:
        raise FormatError(f"text_refiner={params.text_refiner} is a rectiflow-only ablation (blocks over the "
                          f"text tokens alone) that the {fmt} format cannot record: "
                          "save with format='rectiflow'")
    if fmt == "diffusers":
        fixed = {"mlp_ratio": 4.0, "qkv_bias": True, "theta": FLUX_THETA}
        bad = {k: getattr(params, k) for k, v in fixed.items() if getattr(params, k) != v}
        if bad:
            raise FormatError(f"diffusers' FluxTransformer2DModel fixes {fixed}, this model has {bad}: "
                              "save with format='bfl' or 'rectiflow'")


# ----------------------------------------------------------------------------------------------- params


def infer_params(shapes: dict[str, tuple[int, ...]], layout: str = "bfl") -> FluxParams:
    """FluxParams from checkpoint shapes. num_heads comes from the QK-norm scale length (the head dim);
    axes_dim and theta are not in the shapes: a matching preset supplies them, else FLUX's when the head dim
    is 128, else ConfigError (pass a config)."""
    dims = flux_dims(shapes, layout)
    need = ("hidden_size", "in_channels", "out_channels", "context_in_dim", "vec_in_dim", "head_dim",
            "mlp_ratio")
    missing = [k for k in need if k not in dims]
    if missing:
        raise FormatError(f"cannot infer the transformer config: no tensor gives {missing}; the checkpoint "
                          "is incomplete or not FLUX (pass config= if it is a custom layout)")
    head_dim = int(dims["head_dim"])
    base = {k: dims[k] for k in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size",
                                 "mlp_ratio", "depth", "depth_single_blocks", "guidance_embed")}
    base["num_heads"] = int(dims["hidden_size"]) // head_dim
    base["qkv_bias"] = dims.get("qkv_bias", True)
    for name, preset in TRANSFORMER_PRESETS.items():
        plain = preset.pos_embed == "rope" and preset.text_pos == "none" and preset.pooled_text \
            and not preset.text_refiner
        if plain and all(getattr(preset, k) == v for k, v in base.items()):
            log.info("checkpoint shapes match preset %r", name)
            return preset
    if head_dim != FLUX_HEAD_DIM:
        raise ConfigError(f"head dim {head_dim} (hidden {dims['hidden_size']}): the RoPE axes_dim is not "
                          "stored in the weights and no preset matches; pass config= a preset or a dict "
                          "with axes_dim")
    log.info("config inferred from shapes; assuming FLUX's RoPE axes_dim %s and theta %d (not in the "
             "weights)", FLUX_AXES_DIM, FLUX_THETA)
    return FluxParams(**base, axes_dim=FLUX_AXES_DIM, theta=FLUX_THETA)


def describe_params(params: FluxParams) -> str:
    """The preset name `params` equals, else the published variant it matches, else "custom"."""
    if _sd3().is_sd3_config(params):
        return _sd3().describe_sd3(params)
    for name, preset in TRANSFORMER_PRESETS.items():
        if preset == params:
            return name
    return flux_variant(dataclasses.asdict(params))


# ----------------------------------------------------------------------------------------------- build / load


def build_transformer(preset_or_config: str | FluxParams | dict[str, Any], device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> Flux:
    """A transformer with freshly initialised weights (no data on device "meta"): FLUX, or SD3's MMDiT for
    an SD3 preset / SD3Params."""
    if _sd3().is_sd3_config(preset_or_config):
        from rectiflow.models.sd3 import MMDiT

        with torch.device(device):
            return MMDiT(preset_or_config).to(dtype)
    params = transformer_params(preset_or_config)
    with torch.device(device):
        model = Flux(params)
    return model.to(dtype)


def _sd3():
    """rectiflow.convert.sd3, imported when first needed (it imports this module's format constants)."""
    from rectiflow.convert import sd3

    return sd3


def _meta_state_dict(params: FluxParams, layout: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        sd = Flux(params).state_dict()
    if layout == "diffusers":
        from rectiflow.convert.flux_keys import bfl_to_diffusers

        sd = bfl_to_diffusers(sd, params)
    return sd


def _mismatch_error(src: TransformerSource, params: FluxParams, config: Any, summary: str) -> FormatError:
    what = f"config {config!r}" if isinstance(config, str) else f"{describe_params(params)} config"
    msg = f"{src.path} does not match the {what}: {summary}"
    guess = guess_checkpoint(src.tensors)
    if guess:
        return FormatError(f"{msg}; this looks like {guess}")
    if config is not None:  # say what the file itself implies
        try:
            found = describe_params(infer_params(src.shapes(), src.layout))
        except (FormatError, ConfigError):
            found = flux_variant(flux_dims(src.shapes(), src.layout))
        if found != "custom":
            msg += f"; the file looks like {found}: drop the config to infer it"
    return FormatError(msg)


def load_transformer(path: str | Path, config: str | FluxParams | dict[str, Any] | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> Flux:
    """Load a FLUX or SD3 transformer from any supported file or folder (see the module docstring).

    `config` (preset name, FluxParams / SD3Params or dict) overrides what the file records or its shapes
    imply.
    `dtype=None` keeps the stored dtype. Loading is strict; a mismatch raises FormatError.
    """
    sd3 = _sd3()
    src, wants_sd3 = inspect_transformer(path), sd3.is_sd3_config(config)
    if isinstance(src, sd3.SD3Source):
        if config is not None and not wants_sd3:
            found = describe_params(src.params or sd3.infer_sd3_params(src.shapes(), src.layout))
            raise FormatError(f"{src.path} is an SD3 transformer ({found}), not FLUX: config {config!r} is a "
                              "FLUX config; drop it or pass an SD3 preset")
        return sd3.load_sd3(src, config, device, dtype)
    if wants_sd3:
        try:
            found = describe_params(src.params or infer_params(src.shapes(), src.layout))
        except (FormatError, ConfigError):
            found = "custom"
        raise FormatError(f"{src.path} is a FLUX transformer ({found}), not SD3: config {config!r} is an SD3 "
                          "config; drop it or pass a FLUX preset")
    if config is not None:
        params = transformer_params(config)
    else:
        params = src.params or infer_params(src.shapes(), src.layout)
    expected = {k: tuple(v.shape) for k, v in _meta_state_dict(params, src.layout).items()}
    mismatch = state_dict_mismatch(expected, src.shapes())
    if mismatch:
        raise _mismatch_error(src, params, config, mismatch.summary())
    if params.in_channels != params.out_channels:  # FLUX Fill (384) / Canny, Depth (128): img_in only
        log.warning("%s (%s) takes %d input channels for %d output channels: the extra ones are conditioning "
                    "(masked image / control latents) that sampling must supply", src.path,
                    describe_params(params), params.in_channels, params.out_channels)
    with torch.device("meta"):
        model = Flux(params)
    sd = _read_state_dict(src, params, device, dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    log.info("loaded %s (%s, %s, %d tensors)", src.path, src.format, describe_params(params), len(sd))
    return model


def _read_state_dict(src: TransformerSource, params: FluxParams, device, dtype) -> dict[str, torch.Tensor]:
    infos = tqdm(list(src.tensors.values()), desc=f"loading {src.path.name}", unit="tensor", leave=False,
                 disable=None)
    if src.layout == "bfl":
        return dict(iter_tensors(infos, device, dtype))
    from rectiflow.convert.flux_keys import diffusers_to_bfl

    # diffusers_to_bfl converts a whole state dict; it pops each source tensor as it goes, so the extra
    # memory is the fused tensors (qkv, linear1) being built while their parts are still referenced here.
    return diffusers_to_bfl(dict(iter_tensors(infos, device, dtype)), params)


# ----------------------------------------------------------------------------------------------- save


def save_transformer(model: Flux, path: str | Path, format: str = "rectiflow",
                     metadata: dict[str, Any] | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Save `model` as "rectiflow" (one file, config in metadata), "bfl" (one file) or "diffusers" (folder).

    Writes are atomic: a temporary file or folder next to `path`, fsync, rename.
    """
    params = getattr(model, "params", None)
    if _sd3().is_sd3_config(params):
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        return _sd3().save_sd3(model, path, format, meta, max_shard_bytes)
    if not isinstance(params, FluxParams):
        raise FormatError(f"save_transformer needs a rectiflow Flux model, got {type(model).__name__}")
    if format == "stability":
        raise FormatError("stability is SD3's single-file format; a FLUX transformer saves as bfl")
    if format not in FORMATS:
        raise FormatError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    p = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    check_save_path(p, format, folder=format == "diffusers")
    sd = model.state_dict()
    if format == "rectiflow":
        meta.update(rectiflow_header(FLUX_TRANSFORMER_KIND, params.to_dict()))
        return save_safetensors(sd, p, meta)
    _check_portable(params, format)
    meta.setdefault("format", "pt")  # what diffusers / transformers write; some readers check it
    if format == "bfl":
        return save_safetensors(sd, p, meta)
    from rectiflow.convert.flux_keys import bfl_to_diffusers

    config = diffusers_config(params)
    with atomic_dir(p) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_sharded(bfl_to_diffusers(sd, params), tmp, max_shard_bytes=max_shard_bytes, metadata=meta)
    return p

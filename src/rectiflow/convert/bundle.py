"""Model bundles: a directory with everything needed to generate (transformer, autoencoder, text encoder,
sampling defaults), in one of three layouts.

- "rectiflow" (ours): `model.json`, a small model card, next to the weight files:
      {"format": "rectiflow-bundle", "format_version": 1, "name": "...",
       "transformer": "transformer.safetensors", "autoencoder": "ae.safetensors",
       "text_encoder": {<the encoder's spec()>},
       "text_encoder_weights": "text_encoder.safetensors" (only for encoders with trained weights),
       "defaults": {"steps": 4, "sampler": "euler", "shift": null, "guidance": null, "cfg_scale": 1.0,
                    "width": 256, "height": 256},
       "flow": {"path": "rectified_flow", "params": {...}, "prediction": "velocity", "timestep_input": "t"}
               (rectiflow.flow.path_record: how to turn the network output into the ODE velocity),
       ... any extra card fields (description, training data, license) ...}
  Weight files are our safetensors files (config in their metadata). Relative paths inside the
  text-encoder spec are relative to the bundle directory. A card without "flow" is rectified flow (cards
  written before paths were recorded) unless its transformer's training config says otherwise, which is
  refused: sampling another path as rectified flow gives wrong images without any error.
- "bfl" (BFL's release repos): `flux1-*.safetensors` (transformer), `ae.safetensors`, and the text encoders as
  in the official repos: `text_encoder/` (CLIP-L) + `tokenizer/`, `text_encoder_2/` (T5-XXL) + `tokenizer_2/`.
- "diffusers": `model_index.json` (a FluxPipeline), `transformer/`, `vae/`, `text_encoder/`,
  `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, optionally `scheduler/scheduler_config.json` (read for
  the default shift).

When a directory has several, model.json wins, then BFL files, then model_index.json (BFL's own repos
carry both BFL files and diffusers folders). Sampling defaults for BFL / diffusers bundles follow the
published models (all rectified flow): schnell (no guidance embedding) 4 steps, unshifted; dev 28 steps
(diffusers FluxPipeline default), guidance 3.5 (BFL cli.py / diffusers default), FLUX sequence-length
shift; both 1024x1024.

The model identity is the bundle name plus `weights_hash` of its weight files.

The bundled default model lives in the package at rectiflow/assets/default/ (a "rectiflow" bundle, made by
issue 5). `default_bundle_path()` finds it; the environment variable RECTIFLOW_DEFAULT_MODEL, read when the
function is called (never at import), overrides the location (tests and experiments).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from rectiflow.convert.autoencoder import load_autoencoder, save_autoencoder
from rectiflow.convert.bundle_types import (
    SAMPLERS,
    Bundle,
    SamplingDefaults,
    defaults_for_model,
    read_json,
    weight_files,
    weights_hash,
)
from rectiflow.convert.transformer import load_transformer, save_transformer
from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.flow import Path as FlowPath
from rectiflow.flow import RectifiedFlow, path_from_record, path_record
from rectiflow.io.atomic import atomic_dir
from rectiflow.io.metadata import META_TRAIN_CONFIG
from rectiflow.io.safetensors_io import load_tensors, read_metadata, save_safetensors
from rectiflow.models.text import load_text_encoder

__all__ = [
    "CARD_FILE", "Bundle", "SamplingDefaults", "bundle_layout", "default_bundle_path", "defaults_for_model",
    "load_bundle", "save_bundle", "weights_hash", "SAMPLERS", "LAYOUTS",
]

log = logging.getLogger(__name__)

CARD_FILE = "model.json"
CARD_FORMAT = "rectiflow-bundle"
CARD_VERSION = 1
LAYOUTS = ("rectiflow", "bfl", "diffusers", "single")  # single: an SD3 Stability file (convert.sd3_bundle)
DEFAULT_MODEL_ENV = "RECTIFLOW_DEFAULT_MODEL"
# T5 token length of the published models (BFL flux/util.py load_t5: 256 for schnell, 512 for dev).
FLUX_SCHNELL_T5_LEN = 256
FLUX_DEV_T5_LEN = 512
# --------------------------------------------------------------------------------------------- layout


def default_bundle_path() -> Path:
    """The bundled default model: $RECTIFLOW_DEFAULT_MODEL if set, else rectiflow/assets/default/."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "assets" / "default"


def _bfl_transformer_file(root: Path) -> Path | None:
    files = sorted(root.glob("flux1-*.safetensors"))
    if len(files) > 1:
        raise FormatError(
            f"{root} holds several BFL transformer files ({', '.join(f.name for f in files)}); keep one"
        )
    return files[0] if files else None


def bundle_layout(path: str | os.PathLike) -> str:
    """"rectiflow", "bfl" or "diffusers" for a bundle directory; FormatError naming what was expected."""
    root = Path(path)
    expected = (f"{CARD_FILE} (rectiflow bundle), flux1-*.safetensors + ae.safetensors (BFL layout), "
                "model_index.json (diffusers layout) or sd3*.safetensors (SD3 single file)")
    if not root.exists():
        raise FormatError(f"model path {root} does not exist; pass a directory holding {expected}")
    if not root.is_dir():
        raise FormatError(f"model path {root} is a file; pass a directory holding {expected}")
    if (root / CARD_FILE).is_file():
        return "rectiflow"
    if _bfl_transformer_file(root) is not None and (root / "ae.safetensors").is_file():
        return "bfl"
    if (root / "model_index.json").is_file():
        return "diffusers"
    from rectiflow.convert.sd3_bundle import sd3_single_file

    if sd3_single_file(root) is not None:
        return "single"
    raise FormatError(f"{root} is not a model bundle: expected {expected}")


# --------------------------------------------------------------------------------------------- load


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, *, with_text_encoder: bool = True) -> Bundle:
    """Load every component of a bundle directory (any layout) onto `device` in `dtype`.
    with_text_encoder=False leaves Bundle.text_encoder None (callers that bring cached text embeddings)."""
    root = Path(path)
    layout = bundle_layout(root)
    loader = {"rectiflow": _load_ours, "bfl": _load_bfl, "diffusers": _load_diffusers,
              "single": _load_sd3_single}[layout]
    bundle = loader(root, torch.device(device), dtype, with_text_encoder)
    for m in (bundle.transformer, bundle.autoencoder):
        m.eval().requires_grad_(False)
    log.info("model %s (%s layout, hash %s)", bundle.name, layout, bundle.model_hash)
    return bundle


def _resolve_spec_paths(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    out = dict(spec)
    for k, v in spec.items():
        if k.endswith("path") and isinstance(v, str) and v and not Path(v).is_absolute():
            out[k] = str(root / v)
    return out


def _load_ours(root: Path, device: torch.device, dtype: torch.dtype, with_text: bool = True) -> Bundle:
    card = read_json(root / CARD_FILE)
    where = str(root / CARD_FILE)
    if card.get("format") != CARD_FORMAT:
        raise FormatError(f"{where} is not a rectiflow bundle card (format should be {CARD_FORMAT!r})")
    if card.get("format_version") != CARD_VERSION:
        raise FormatError(f"{where} has format_version {card.get('format_version')!r}; this rectiflow reads "
                          f"{CARD_VERSION}: upgrade rectiflow")
    for key in ("transformer", "autoencoder", "text_encoder"):
        if key not in card:
            raise FormatError(f"{where} lacks the {key!r} entry")
    files = {}
    for key in ("transformer", "autoencoder", "text_encoder_weights"):
        if card.get(key):
            p = root / card[key]
            if not p.is_file():
                raise FormatError(f"{where} names {key} file {card[key]!r}, which is missing from {root}")
            files[key] = p
    flow_path = _card_flow_path(card, files["transformer"], where)  # refuse before loading any weights
    transformer = load_transformer(files["transformer"], device=device, dtype=dtype)
    autoencoder = load_autoencoder(files["autoencoder"], device=device, dtype=dtype)
    spec = _resolve_spec_paths(card["text_encoder"], root)
    text_encoder = load_text_encoder(spec, device=device, dtype=dtype) if with_text else None
    if with_text and "text_encoder_weights" in files:
        text_encoder.load_state_dict(load_tensors(files["text_encoder_weights"], device, dtype), strict=True)
    if hasattr(text_encoder, "eval"):
        text_encoder.eval()
    defaults = SamplingDefaults.from_dict(card.get("defaults", {}), where=f"{where} defaults")
    return Bundle(transformer, autoencoder, text_encoder, defaults, str(card.get("name") or root.name),
                  weights_hash(list(files.values())), "rectiflow", root, card, flow_path)


def _card_flow_path(card: dict[str, Any], transformer_file: Path, where: str) -> FlowPath:
    """The card's "flow" record; without one, rectified flow unless the weights' training config (safetensors
    metadata, written by `rectiflow train`'s export) names another path, which is refused."""
    if "flow" in card:
        return path_from_record(card["flow"], f"{where} flow")
    try:
        trained = json.loads(read_metadata(transformer_file).get(META_TRAIN_CONFIG, "{}"))["flow"]["path"]
    except (KeyError, TypeError, ValueError):
        trained = "rectified_flow"
    if trained != "rectified_flow":
        raise FormatError(f"{where} records no flow path but its transformer was trained with flow.path = "
                          f"{trained!r}; add \"flow\": {{\"path\": \"{trained}\"}} to it or export it again")
    return RectifiedFlow()


def _flux_text_encoder(root: Path, max_length: int, device: torch.device, dtype: torch.dtype):
    folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    missing = [f for f in folders if not (root / f).is_dir()]
    if missing:
        raise FormatError(
            f"{root} lacks the text-encoder folder(s) {', '.join(missing)}: a FLUX bundle needs "
            "text_encoder/ (CLIP) + tokenizer/ and text_encoder_2/ (T5) + tokenizer_2/ as the official repos"
        )
    spec = {"kind": "flux", "t5_path": str(root / "text_encoder_2"), "clip_path": str(root / "text_encoder"),
            "t5_tokenizer_path": str(root / "tokenizer_2"), "clip_tokenizer_path": str(root / "tokenizer"),
            "max_length": max_length}
    return load_text_encoder(spec, device=device, dtype=dtype)


def _load_bfl(root: Path, device: torch.device, dtype: torch.dtype, with_text: bool = True) -> Bundle:
    tfile = _bfl_transformer_file(root)
    transformer = load_transformer(tfile, device=device, dtype=dtype)
    autoencoder = load_autoencoder(root / "ae.safetensors", device=device, dtype=dtype)
    dev = transformer.params.guidance_embed
    text_encoder = _flux_text_encoder(root, FLUX_DEV_T5_LEN if dev else FLUX_SCHNELL_T5_LEN, device, dtype) \
        if with_text else None
    return Bundle(transformer, autoencoder, text_encoder, defaults_for_model(dev), tfile.stem,
                  weights_hash([tfile, root / "ae.safetensors"]), "bfl", root)


def _load_diffusers(root: Path, device: torch.device, dtype: torch.dtype, with_text: bool = True) -> Bundle:
    index = read_json(root / "model_index.json")
    cls = index.get("_class_name")
    if cls == "StableDiffusion3Pipeline":
        from rectiflow.convert.sd3_bundle import load_sd3_diffusers

        return load_sd3_diffusers(root, device, dtype, with_text)
    if cls is not None and "Flux" not in str(cls):
        raise FormatError(f"{root} is a diffusers {cls}, not a FLUX pipeline; rectiflow generates with FLUX "
                          "and SD3 models (FluxPipeline, StableDiffusion3Pipeline)")
    for sub in ("transformer", "vae"):
        if not (root / sub).is_dir():
            raise FormatError(f"{root} lacks the {sub}/ folder of a diffusers FluxPipeline")
    transformer = load_transformer(root / "transformer", device=device, dtype=dtype)
    autoencoder = load_autoencoder(root / "vae", device=device, dtype=dtype)
    dev = transformer.params.guidance_embed
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json(sched_file) if sched_file.is_file() else None
    text_encoder = _flux_text_encoder(root, FLUX_DEV_T5_LEN if dev else FLUX_SCHNELL_T5_LEN, device, dtype) \
        if with_text else None
    files = weight_files(root / "transformer") + weight_files(root / "vae")
    return Bundle(transformer, autoencoder, text_encoder, defaults_for_model(dev, scheduler), root.name,
                  weights_hash(files), "diffusers", root)


def _load_sd3_single(root: Path, device: torch.device, dtype: torch.dtype, with_text: bool = True) -> Bundle:
    from rectiflow.convert.sd3_bundle import load_sd3_single

    return load_sd3_single(root, device, dtype, with_text)


# --------------------------------------------------------------------------------------------- save


def save_bundle(path: str | os.PathLike, transformer: torch.nn.Module, autoencoder: torch.nn.Module,
                text_encoder_spec: Any, defaults: SamplingDefaults | dict[str, Any] | None = None,
                card_extra: dict[str, Any] | None = None, name: str | None = None, *,
                flow_path: FlowPath | None = None,
                transformer_metadata: dict[str, str] | None = None) -> Path:
    """Write a "rectiflow" bundle directory (atomically: built beside `path`, then renamed into place).

    `flow_path`: the path the transformer was trained on (default rectified flow), recorded as the card's
    "flow"; `transformer_metadata`: extra safetensors metadata of transformer.safetensors (e.g. the training
    config).

    `text_encoder_spec` is a text encoder's spec() dict, or the encoder itself: its spec() is recorded and,
    when it has trainable weights (an nn.Module with parameters, e.g. TrainableTextEncoder), its state dict
    is saved as text_encoder.safetensors.
    """
    root = Path(path)
    if root.exists() and not (root / CARD_FILE).is_file() and (not root.is_dir() or any(root.iterdir())):
        raise FormatError(f"{root} exists and is not a rectiflow bundle; save to a new or empty directory")
    if isinstance(defaults, dict):
        defaults = SamplingDefaults.from_dict(defaults)
    defaults = defaults or defaults_for_model(bool(getattr(transformer.params, "guidance_embed", False)))
    encoder = None if isinstance(text_encoder_spec, dict) else text_encoder_spec
    spec = text_encoder_spec if encoder is None else encoder.spec()
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError("save_bundle: text_encoder_spec must be an encoder or its spec() dict "
                          "(with 'kind')")
    json.dumps(spec)  # fail early if the spec is not JSON-able
    card: dict[str, Any] = {
        "format": CARD_FORMAT, "format_version": CARD_VERSION, "name": name or root.name,
        "transformer": "transformer.safetensors", "autoencoder": "ae.safetensors", "text_encoder": spec,
        "flow": path_record(flow_path or RectifiedFlow()),
    }
    extra = dict(card_extra or {})
    clash = sorted(set(extra) & (set(card) | {"defaults", "text_encoder_weights"}))
    if clash:
        raise ConfigError(f"save_bundle: card_extra may not override {clash}")
    with atomic_dir(root) as tmp:
        tmp = Path(tmp)
        save_transformer(transformer, tmp / card["transformer"], format="rectiflow",
                         metadata=transformer_metadata)
        save_autoencoder(autoencoder, tmp / card["autoencoder"], format="rectiflow")
        if isinstance(encoder, torch.nn.Module) and any(True for _ in encoder.parameters()):
            sd = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
            save_safetensors(sd, tmp / "text_encoder.safetensors", {"rectiflow.model": "text-encoder"})
            card["text_encoder_weights"] = "text_encoder.safetensors"
        card["defaults"] = defaults.to_dict()
        card.update(extra)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    log.info("saved bundle %s", root)
    return root


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model.json card of a "rectiflow" bundle (no weights loaded)."""
    root = Path(path)
    if bundle_layout(root) != "rectiflow":
        raise RectiflowError(f"{root} is not a rectiflow bundle (no {CARD_FILE})")
    return read_json(root / CARD_FILE)

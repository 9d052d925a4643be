"""LoRA files: read (kohya, diffusers / PEFT, BFL-named PEFT, XLabs), write (kohya, diffusers), apply.

    model = rectiflow.load_transformer("flux1-dev.safetensors")
    rectiflow.load_lora(model, "style.safetensors", scale=0.8)          # unmerged, stackable, named "style"
    rectiflow.save_lora(model, "out.safetensors", format="diffusers")  # FluxPipeline.load_lora_weights

Safetensors only: a pickle file (.ckpt / .pt / .bin) is refused before it is opened. Loading is strict: keys
that are not FLUX transformer LoRA modules are named in the error (text-encoder tensors, which a transformer
cannot use, are skipped with a warning naming how many), an SD1.5 / SDXL UNet LoRA is recognised as such,
and a module whose shape does not fit the model names the key and both shapes. Key layouts:
rectiflow.convert.lora_keys.

Metadata written (ModelSpec, the Stability AI model-spec keys that kohya, ComfyUI and A1111/Forge read, plus
kohya's ss_* keys): modelspec.sai_model_spec, modelspec.architecture ("flux-1-dev/lora"),
modelspec.implementation, modelspec.title, modelspec.date, modelspec.trigger_phrase, ss_network_module,
ss_network_dim, ss_network_alpha, ss_base_model_version ("flux1"), and rectiflow.lora (JSON: base hash,
rank, alpha, targets, trigger, training settings). diffusers files also carry lora_adapter_metadata (the PEFT
LoraConfig that diffusers reads back: ranks and alphas per module).
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rectiflow.convert import lora_keys as lk
from rectiflow.convert.lora_keys import LoraTensors
from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.io.safetensors_io import load_tensors, read_header, save_safetensors
from rectiflow.models.transformer import FluxParams
from rectiflow.nn.lora import LoraAdapter, attach_lora, base_hash, lora_names, lora_state

log = logging.getLogger(__name__)

__all__ = [
    "LoraFile",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "read_lora",
    "write_lora",
    "load_lora",
    "save_lora",
    "adapters_from_model",
    "parse_lora_arg",
    "parse_scale",
]

READ_FORMATS = ("kohya", "diffusers", "bfl", "xlabs")
WRITE_FORMATS = ("kohya", "diffusers")
META_KEY = "rectiflow.lora"
DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraFile:
    path: Path
    format: str
    adapters: dict[str, LoraTensors]
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def info(self) -> dict:
        """rectiflow.lora metadata (base hash, targets, trigger, training) when the file has it."""
        try:
            return json.loads(self.metadata.get(META_KEY, "{}"))
        except ValueError:
            return {}

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(a.down.shape[0]) for m, a in self.adapters.items()}


def parse_scale(scale) -> float:
    if isinstance(scale, bool):
        raise ConfigError(f"LoRA scale must be a number, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"LoRA scale must be a number, got {scale!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"LoRA scale must be a finite number, got {scale!r}")
    return value


def parse_lora_arg(text: str) -> tuple[str, float]:
    """ "PATH[:SCALE]" -> (path, scale); the scale is whatever follows the last colon when it parses as a
    number (so Windows drive letters and colons inside paths survive), else an error if it looks meant."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or tail.endswith(".safetensors"):
        return text, 1.0
    return path, parse_scale(tail)


def read_lora(path: str | Path, params: FluxParams | None = None) -> LoraFile:
    """Read a LoRA file in any READ_FORMATS layout into BFL-keyed adapters. `params` (the model's config)
    places split q/k/v rows; without it they are inferred from the tensor shapes."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"LoRA file {p} does not exist: check the path")
    header = read_header(p)  # refuses pickles (by suffix and magic bytes) before reading anything else
    keys = list(header.tensors)
    skipped = [k for k in keys if k.startswith(lk.TEXT_ENCODER_PREFIXES)]
    layout = lk.identify_layout(keys)
    tensors = load_tensors([header.tensors[k] for k in keys if k not in skipped])
    if skipped:
        log.warning(
            "%s: skipped %d text-encoder tensor(s) (e.g. %s); a LoRA on the transformer only is applied",
            p,
            len(skipped),
            skipped[0],
        )
    if layout == "kohya":
        adapters = lk.from_kohya(tensors)
    elif layout == "bfl":
        adapters = lk.from_bfl_peft(tensors)
    else:
        if params is None:
            params = lk.guess_params(tensors, layout)
        if layout == "xlabs":
            adapters = lk.from_xlabs(tensors, params)
        else:
            meta = header.metadata.get(DIFFUSERS_META_KEY)
            adapters = lk.from_diffusers(tensors, params, json.loads(meta) if meta else None)
    return LoraFile(p, layout, adapters, dict(header.metadata), skipped)


def _modelspec(adapters: dict[str, LoraTensors], metadata: dict | None, path: Path) -> dict[str, str]:
    info = dict(metadata or {})
    ranks = sorted({int(a.down.shape[0]) for a in adapters.values()})
    alphas = sorted({float(a.alpha) for a in adapters.values()})
    info.setdefault("rank", ranks[0] if len(ranks) == 1 else ranks)
    info.setdefault("alpha", alphas[0] if len(alphas) == 1 else alphas)
    info.setdefault("modules", len(adapters))
    meta = {
        # ModelSpec 1.0.0 (Stability AI's model-spec; kohya sd-scripts library/sai_model_spec.py writes these)
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": str(info.get("title", path.stem)),
        "modelspec.date": datetime.date.today().isoformat(),
        # kohya's own keys, which A1111 / Forge and LoRA browsers show
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(info["rank"]),
        "ss_network_alpha": str(info["alpha"]),
        "ss_base_model_version": "flux1",
        META_KEY: json.dumps(info, sort_keys=True, default=str),
    }
    if info.get("trigger"):
        meta["modelspec.trigger_phrase"] = str(info["trigger"])
    return meta


def write_lora(
    adapters: dict[str, LoraTensors],
    path: str | Path,
    format: str = "kohya",
    params: FluxParams | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write BFL-keyed adapters as a kohya or diffusers LoRA file (atomically)."""
    if format not in WRITE_FORMATS:
        raise ConfigError(f"LoRA format {format!r} cannot be written; choose one of {WRITE_FORMATS}")
    if not adapters:
        raise RectiflowError("no LoRA modules to write")
    p = Path(path)
    adapters = {
        m: LoraTensors(a.down.detach().cpu(), a.up.detach().cpu(), float(a.alpha))
        for m, a in adapters.items()
    }
    meta = _modelspec(adapters, metadata, p)
    if format == "kohya":
        tensors = lk.to_kohya(adapters)
    else:
        params = params or lk.guess_params(adapters, "bfl-internal")
        tensors, config = lk.to_diffusers(adapters, params)
        meta[DIFFUSERS_META_KEY] = json.dumps(
            {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True
        )
    return save_safetensors(tensors, p, meta)


def _module_table(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(model.named_modules())


def load_lora(model: torch.nn.Module, path: str | Path, scale: float = 1.0, name: str | None = None):
    """Apply the LoRA file at `path` to `model` in place, unmerged, as adapter `name` (default: the file's
    stem, made unique); calling it again stacks another. Returns the model."""
    scale = parse_scale(scale)
    params = getattr(model, "params", None)
    f = read_lora(path, params)
    name = name or _unique_name(model, f.path.stem)
    if name in lora_names(model):
        raise RectiflowError(f"a LoRA named {name!r} is already loaded; pass another name")
    modules = _module_table(model)
    missing = [m for m in f.adapters if m not in modules]
    if missing:
        raise FormatError(
            f"{f.path}: LoRA module(s) {missing[:4]} do not exist in this model (is the LoRA for "
            "a FLUX model with more blocks?)"
        )
    for m, a in f.adapters.items():  # check every shape before changing the model
        mod = modules[m]
        want = (int(mod.out_features), int(mod.in_features))
        got = (int(a.up.shape[0]), int(a.down.shape[1]))
        if got != want:
            raise FormatError(
                f"{f.path}: LoRA module {m} updates a [{got[0]}, {got[1]}] weight but the model's "
                f"is [{want[0]}, {want[1]}]; the LoRA is for another FLUX size"
            )
    for m, a in f.adapters.items():
        mod = modules[m]
        w = mod.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        adapter = LoraAdapter(
            int(mod.in_features),
            int(mod.out_features),
            int(a.down.shape[0]),
            a.alpha,
            scale=scale,
            device=w.device,
            dtype=dtype,
        )
        with torch.no_grad():
            adapter.down.weight.copy_(a.down)
            adapter.up.weight.copy_(a.up)
        adapter.requires_grad_(False)
        attach_lora(mod, name, adapter)
    expected = f.info.get("base_hash")
    if expected and params is not None:
        actual = base_hash(model)
        if actual != expected:
            log.warning(
                "LoRA %s was trained on base weights %s; this model's are %s", f.path, expected, actual
            )
    log.info(
        "loaded LoRA %s (%s, %d modules) as %r at scale %g", f.path, f.format, len(f.adapters), name, scale
    )
    return model


def _unique_name(model, stem: str) -> str:
    names, name, i = set(lora_names(model)), stem, 1
    while name in names:
        i += 1
        name = f"{stem}-{i}"
    return name


def adapters_from_model(model: torch.nn.Module, name: str | None = None) -> dict[str, LoraTensors]:
    """The tensors of adapter `name` (default: the only one attached)."""
    names = lora_names(model)
    if name is None:
        if len(names) != 1:
            raise RectiflowError(
                f"the model has {len(names)} LoRAs attached ({', '.join(names) or 'none'}); "
                "name the one to save"
            )
        name = names[0]
    return {m: LoraTensors(d, u, a) for m, (d, u, a) in lora_state(model, name).items()}


def save_lora(
    model: torch.nn.Module,
    path: str | Path,
    format: str = "kohya",
    name: str | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write adapter `name` of `model` (default: the only one) as a kohya or diffusers LoRA file."""
    meta = {"base_hash": base_hash(model), **(metadata or {})}
    return write_lora(adapters_from_model(model, name), path, format, getattr(model, "params", None), meta)

"""What bundles of every layout and family share: the sampling defaults, the loaded Bundle, the identity hash
and the small readers both rectiflow.convert.bundle (FLUX, our cards) and rectiflow.convert.sd3_bundle (SD3)
use. A module of its own so that the SD3 loader needs nothing from the FLUX one (no import cycle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rectiflow.errors import ConfigError, FormatError
from rectiflow.flow import METHODS, RectifiedFlow, TimeShift, parse_time_shift
from rectiflow.flow import Path as FlowPath

__all__ = ["Bundle", "SamplingDefaults", "defaults_for_model", "read_json", "weight_files", "weights_hash",
           "SAMPLERS"]

SAMPLERS = METHODS  # the ODE solvers a bundle may name as its sampler (owned by rectiflow.flow.solvers)
# Published FLUX.1 sampling settings: BFL flux/cli.py (schnell num_steps 4, dev guidance 3.5), diffusers
# FluxPipeline.__call__ (num_inference_steps=28, guidance_scale=3.5, default size 1024 = 128 * vae scale 8).
FLUX_SCHNELL_STEPS = 4
FLUX_DEV_STEPS = 28
FLUX_DEV_GUIDANCE = 3.5
FLUX_SIZE = 1024
# Weight files above this size are hashed from samples (see weights_hash) instead of in full.
FULL_HASH_LIMIT = 256 * 2**20
_HASH_SAMPLE = 2**20


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's sampling settings. shift: None (linear grid), "flux" (sequence-length shift) or a float
    alpha (SD3 static shift); guidance: the guidance-embedding value (guidance-distilled models only)."""

    steps: int = FLUX_SCHNELL_STEPS
    sampler: str = "euler"
    shift: TimeShift = None
    guidance: float | None = None
    cfg_scale: float = 1.0
    width: int = FLUX_SIZE
    height: int = FLUX_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        object.__setattr__(self, "shift", parse_time_shift(self.shift))  # frozen: normalise once here
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v % 16:
                raise ConfigError(f"{name} must be a positive multiple of 16, got {v!r}")
        if self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0, got {self.cfg_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "defaults") -> SamplingDefaults:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown sampling default(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


def defaults_for_model(guidance_embed: bool, scheduler: dict[str, Any] | None = None) -> SamplingDefaults:
    """Published defaults: schnell-like (no guidance embedding) or dev-like; a diffusers scheduler config
    (use_dynamic_shifting / shift) overrides the shift."""
    if guidance_embed:
        d = SamplingDefaults(steps=FLUX_DEV_STEPS, shift="flux", guidance=FLUX_DEV_GUIDANCE)
    else:
        d = SamplingDefaults(steps=FLUX_SCHNELL_STEPS, shift=None)
    if scheduler:
        if scheduler.get("use_dynamic_shifting"):
            shift: TimeShift = "flux"
        else:
            alpha = float(scheduler.get("shift", 1.0))
            shift = None if alpha == 1.0 else alpha
        d = dataclasses.replace(d, shift=shift)
    return d


@dataclass
class Bundle:
    """The loaded components of a bundle and its identity."""

    transformer: torch.nn.Module
    autoencoder: torch.nn.Module
    text_encoder: Any
    defaults: SamplingDefaults
    name: str
    model_hash: str
    layout: str
    path: Path
    card: dict[str, Any] = field(default_factory=dict)
    flow_path: FlowPath = field(default_factory=RectifiedFlow)  # how the transformer was trained


# --------------------------------------------------------------------------------------------- identity


def weights_hash(files: list[Path]) -> str:
    """12 hex digits of SHA-256 over the weight files (sorted by name): name, size and content. Files above
    FULL_HASH_LIMIT bytes contribute their safetensors header and 1 MiB samples at 16 evenly spaced offsets
    instead of every byte (hashing a 24 GB FLUX file in full would take minutes on each load)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(2**22), b""):
                    h.update(chunk)
            else:
                for i in range(16):
                    fh.seek(i * (size - _HASH_SAMPLE) // 15)
                    h.update(fh.read(_HASH_SAMPLE))
    return h.hexdigest()[:12]


def weight_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.safetensors") if p.is_file()]


def read_json(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"cannot read {p}: {e}".splitlines()[0]) from e
    if not isinstance(data, dict):
        raise FormatError(f"{p} must hold a JSON object")
    return data

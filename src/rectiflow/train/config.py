"""Run configuration of `rectiflow train`: nested frozen dataclasses, TOML in and out, dotted overrides.

    cfg = load_config("configs/tiny.toml", ["optim.lr=1e-4", "train.steps=100"])
    cfg.optim.lr                      # 1e-4
    dump_toml(cfg)                    # the resolved config as TOML (saved beside every checkpoint)

A TOML file has one table per section ([model], [data], [flow], [optim], [ema], [train], [validation],
[logging], [checkpoint], [export], [distributed], [distill], [lora]); every key is optional and defaults to
the field's value here. Unknown sections or keys and values of the wrong type raise a one-line ConfigError.
Overrides are `section.key=value` with the value parsed as a TOML value (`1e-4`, `true`, `[0.9, 0.95]`,
`{m = 0.5}`), or taken as a plain string when it does not parse (`model.preset=tiny`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rectiflow.errors import ConfigError
from rectiflow.flow import parse_time_shift
from rectiflow.train.lr_schedule import SCHEDULES

try:  # py3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - py3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ModelConfig", "DataConfig", "FlowConfig", "OptimConfig", "EMAConfig", "TrainLoopConfig",
    "ValidationConfig", "LoggingConfig", "CheckpointConfig", "ExportConfig", "DistributedConfig",
    "DistillConfig", "GuidanceDistillConfig", "LoraConfig", "RunConfig", "load_config", "config_from_dict",
    "config_to_dict", "dump_toml", "apply_overrides",
]

PRECISIONS = ("fp32", "bf16")
EXPORT_FORMATS = ("rectiflow", "bfl", "diffusers")
DIST_MODES = ("none", "ddp", "fsdp2")
LORA_EXPORT_FORMATS = ("kohya", "diffusers")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """preset: a transformer preset (rectiflow.models.transformer.TRANSFORMER_PRESETS); params: FluxParams
    fields overriding the preset; init: weights to start from (any format load_transformer reads; empty =
    random init seeded by train.seed); autoencoder: an autoencoder file/folder used to decode validation
    samples and for the exported bundle (empty = no sample grid, no bundle); guidance: the guidance value fed
    to a guidance-distilled model (guidance_embed=True, e.g. FLUX-dev) while fine-tuning it (3.5: FLUX-dev's
    recommended value, also the default of diffusers' train_dreambooth_flux.py --guidance_scale)."""

    preset: str = "tiny"
    params: dict[str, Any] = field(default_factory=dict)
    init: str = ""
    autoencoder: str = ""
    guidance: float = 3.5


@dataclass(frozen=True)
class DataConfig:
    """cache: a latent cache directory (`rectiflow cache`). batch_size is the GLOBAL batch (all ranks and
    accumulation micro-batches together); it must be divisible by world_size * optim.accumulation.
    caption_mix: field -> probability (None: all fields equally; SD3 uses 50/50 original/synthetic);
    caption_dropout: probability that a sample's caption is replaced by the cached "" embedding (CFG; 0.1 is
    the usual single-encoder value, Ho & Salimans 2022). couplings: a directory of `rectiflow reflow pairs`
    (reflow, Liu et al. 2022): train on its fixed (noise, endpoint) pairs, x_t = (1 - t) z_0 + t z_1 with the
    PAIRED noise, instead of on `cache` with fresh noise (caption dropout applies to it too); with both set,
    the cache's samples (fresh noise) join the pairs: the real-data loss mixed in by their numbers."""

    cache: str = ""
    couplings: str = ""
    batch_size: int = 8
    caption_mix: dict[str, float] | None = None
    caption_dropout: float = 0.1

    def __post_init__(self):
        _check(self.batch_size >= 1, f"data.batch_size={self.batch_size}; use a positive integer")
        _check(0.0 <= self.caption_dropout <= 1.0,
               f"data.caption_dropout={self.caption_dropout}; use a probability in [0, 1]")


@dataclass(frozen=True)
class FlowConfig:
    """path: a rectiflow.flow path name; timesteps: a training timestep sampler with its params (default
    logit-normal(0, 1): SD3's best rectified-flow setting, Esser et al. 2024 sec. 5.1, "rf/lognorm(0.00,
    1.00)"); loss_weight: an extra per-sample weight (rectiflow.flow.loss_weight; "none" with a non-uniform
    sampler is SD3's formulation)."""

    path: str = "rectified_flow"
    timesteps: str = "logit_normal"
    timestep_params: dict[str, float] = field(default_factory=lambda: {"m": 0.0, "s": 1.0})
    loss_weight: str = "none"
    loss_weight_params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (SD3, Esser et al. 2024 sec. 5.3, and DiT, Peebles & Xie 2023: AdamW at lr 1e-4 with no weight
    decay; SD3 warms up linearly over 1000 steps). schedule after warmup: constant | cosine | linear down to
    min_lr_ratio * lr at train.steps. grad_clip: max global grad norm (0 = off)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accumulation: int = 1

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(self.lr > 0, f"optim.lr={self.lr}; use a positive learning rate")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas={list(self.betas)}; use two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}; use >= 0")
        _check(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio}; use a value in [0, 1]")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip}; use >= 0 (0 disables clipping)")
        _check(self.accumulation >= 1, f"optim.accumulation={self.accumulation}; use a positive integer")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}; use >= 0")


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights, updated after every applied step from step `start` on
    (before that it copies the weights). decay 0.9999 as in DiT (Peebles & Xie 2023); short runs want less."""

    enabled: bool = True
    decay: float = 0.9999
    start: int = 0

    def __post_init__(self):
        _check(0 <= self.decay < 1, f"ema.decay={self.decay}; use a value in [0, 1)")
        _check(self.start >= 0, f"ema.start={self.start}; use >= 0")


@dataclass(frozen=True)
class TrainLoopConfig:
    """out_dir holds checkpoints/, logs/, samples/ and export/. precision: fp32 | bf16 (autocast; meant for
    GPUs). activation_checkpointing / compile: applied per transformer block as functions. The run stops with
    an error after max_bad_consecutive non-finite steps in a row or max_bad_total in all (0 = never)."""

    steps: int = 1000
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "cpu"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    max_bad_consecutive: int = 5
    max_bad_total: int = 50
    progress: bool = True

    def __post_init__(self):
        _check(self.steps >= 0, f"train.steps={self.steps}; use >= 0")
        _check(self.precision in PRECISIONS,
               f"train.precision={self.precision!r}; choose one of {PRECISIONS}")
        _check(self.log_every >= 1, f"train.log_every={self.log_every}; use a positive integer")
        _check(self.max_bad_consecutive >= 0 and self.max_bad_total >= 0,
               "train.max_bad_consecutive / max_bad_total must be >= 0 (0 = never stop)")


@dataclass(frozen=True)
class ValidationConfig:
    """Every `every` steps (0 = never): the loss on a fixed held-out set of `holdout` cache samples (excluded
    from training) with fixed noise at fixed times t = (k + 0.5) / buckets, k < buckets, per bucket and mean
    (the SD3 protocol, Esser et al. 2024 sec. 5.1 / app. B.2: validation loss on held-out data at fixed t),
    and a grid of `prompts` x `seeds` sampled with `sample_steps` steps of `sampler` (with `prompts` empty:
    `data_prompts` distinct captions of the dataset itself, the held-out samples' first; needs
    model.autoencoder to decode; cfg_scale > 1 uses the cached "" embedding as the unconditional input)."""

    every: int = 0
    holdout: int = 0
    buckets: int = 8
    seed: int = 1234
    use_ema: bool = False
    prompts: list[str] = field(default_factory=list)
    data_prompts: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    sample_steps: int = 20
    sample_size: int = 0
    sampler: str = "euler"
    shift: str | float | None = None  # parsed into rectiflow.flow's TimeShift: None, "flux" or an SD3 alpha
    cfg_scale: float = 1.0

    def __post_init__(self):
        _check(self.every >= 0 and self.holdout >= 0, "validation.every and validation.holdout must be >= 0")
        _check(self.buckets >= 1, f"validation.buckets={self.buckets}; use a positive integer")
        _check(self.sample_steps >= 1, f"validation.sample_steps={self.sample_steps}; use >= 1")
        _check(self.data_prompts >= 0, f"validation.data_prompts={self.data_prompts}; use >= 0")
        _check(self.sample_size % 16 == 0, f"validation.sample_size={self.sample_size}; use a multiple of 16 "
               "(0 = the cache's image size)")
        object.__setattr__(self, "shift", parse_time_shift(self.shift, "validation.shift"))


@dataclass(frozen=True)
class LoggingConfig:
    """JSONL metrics always (out_dir/logs/metrics.jsonl); TensorBoard event files too when installed."""

    tensorboard: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    """Every `every` steps (0 = only at the end / on interrupt), keeping the newest `keep` (0 = all)."""

    every: int = 500
    keep: int = 3

    def __post_init__(self):
        _check(self.every >= 0 and self.keep >= 0, "checkpoint.every and checkpoint.keep must be >= 0")


@dataclass(frozen=True)
class ExportConfig:
    """At the end of training, the final weights (EMA when enabled and `ema` is true) in each of `formats`
    under out_dir/export/, plus a rectiflow bundle when `bundle` and model.autoencoder are set, named `name`
    (empty: the name of out_dir) in its model.json and so in the PNG metadata of what it generates."""

    formats: list[str] = field(default_factory=lambda: ["rectiflow"])
    ema: bool = True
    bundle: bool = True
    name: str = ""

    def __post_init__(self):
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        _check(not bad, f"export.formats has {bad}; choose from {EXPORT_FORMATS}")


@dataclass(frozen=True)
class DistributedConfig:
    """mode: none | ddp | fsdp2 (rectiflow.train.distributed; launch with torchrun)."""

    mode: str = "none"

    def __post_init__(self):
        _check(self.mode in DIST_MODES, f"distributed.mode={self.mode!r}; choose one of {DIST_MODES}")


@dataclass(frozen=True)
class DistillConfig:
    """Few-step distillation (progressive distillation, Salimans & Ho 2022, on the rectified-flow ODE). With
    `teacher` set (transformer weights in any format load_transformer reads; usually model.init too), each
    step trains the model to cover with ONE Euler step of size dt = 1 / student_steps what the teacher covers
    in TWO Euler steps of dt / 2: t is drawn uniformly from the student grid 1, 1 - dt, ..., dt (the linear
    grid the sampler uses with no shift), x_t from the forward path, and the target velocity is
    (x_t - x_{t-dt}) / dt, the mean of the teacher's two velocities. Each teacher velocity uses
    classifier-free guidance at teacher_cfg (with the cache's empty caption as the unconditional input);
    above 1 the guidance is distilled too, and the student samples with CFG 1 (one forward per step).
    shift: SD3's time shift alpha of the student's grid (t' = alpha t / (1 + (alpha - 1) t) applied to the
    linear grid, as `rectiflow generate --shift alpha` samples); the teacher's two steps are then those of
    the shifted 2 * student_steps grid, and the target is (x_t - x_t') / (t - t') for the grid's next t'.
    1.0 = the linear grid."""

    teacher: str = ""
    student_steps: int = 4
    teacher_cfg: float = 1.0
    shift: float | str | None = 1.0  # parsed into rectiflow.flow's TimeShift; a constant one only

    def __post_init__(self):
        _check(self.student_steps >= 1, f"distill.student_steps={self.student_steps}; use >= 1")
        _check(self.teacher_cfg >= 0, f"distill.teacher_cfg={self.teacher_cfg}; use >= 0")
        shift = parse_time_shift(self.shift, "distill.shift")
        _check(shift != "flux", "distill.shift='flux': the student's grid takes a constant SD3 shift "
               "(a number; 1 = none)")
        object.__setattr__(self, "shift", 1.0 if shift is None else shift)

    @property
    def alpha(self) -> float:
        """The student grid's SD3 shift alpha (1 = the linear grid)."""
        return float(self.shift)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (rectiflow.nn.lora): with rank > 0 the model (model.init) is frozen and only adapters
    of this rank on the `targets` (groups attn / mlp / mod / all, or module-name globs) train; the optimizer
    holds state for them alone, checkpoints hold them plus the base weights' hash, and the export writes the
    adapter in `formats` (kohya: what ComfyUI / Forge load; diffusers: FluxPipeline.load_lora_weights).
    alpha 0 = rank (multiplier 1). trigger: the trigger word the captions were cached with (`rectiflow cache
    --trigger`), recorded in the exported files' metadata."""

    rank: int = 0
    alpha: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn"])
    dropout: float = 0.0
    trigger: str = ""
    formats: list[str] = field(default_factory=lambda: ["kohya", "diffusers"])

    def __post_init__(self):
        _check(self.rank >= 0, f"lora.rank={self.rank}; use a positive rank (0 = no LoRA, full fine-tune)")
        _check(self.alpha >= 0, f"lora.alpha={self.alpha}; use >= 0 (0 = the rank)")
        _check(0 <= self.dropout < 1, f"lora.dropout={self.dropout}; use a probability in [0, 1)")
        _check(not self.rank or bool(self.targets),
               "lora.targets is empty: nothing would train; name groups (attn, mlp, mod, all) or module "
               "patterns")
        bad = [f for f in self.formats if f not in LORA_EXPORT_FORMATS]
        _check(not bad, f"lora.formats has {bad}; choose from {LORA_EXPORT_FORMATS}")


@dataclass(frozen=True)
class GuidanceDistillConfig:
    """Guidance distillation (rectiflow.train.guidance_distill; Meng et al. 2023, FLUX.1 [dev]'s guidance
    embedding). With `teacher` set (a model without guidance embedding, usually model.init too) the model gets
    a guidance embedding (guidance_embed on) and learns the teacher's CFG velocity v_u + g (v_c - v_u) for g
    drawn uniformly from [scale_min, scale_max] per sample; model.guidance is then the exported bundle's
    default --guidance. The default range 1..5 covers the shapes models' useful CFG scales (2..5,
    docs/training.md); Meng et al. use w in [0, 4] (their w + 1 in our convention: 1..5)."""

    teacher: str = ""
    scale_min: float = 1.0
    scale_max: float = 5.0

    def __post_init__(self):
        _check(0 <= self.scale_min <= self.scale_max, f"guidance_distill scale range [{self.scale_min}, "
               f"{self.scale_max}]; use 0 <= scale_min <= scale_max")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    guidance_distill: GuidanceDistillConfig = field(default_factory=GuidanceDistillConfig)

    def __post_init__(self):
        d, v = self.distill, self.validation
        if d.teacher and self.guidance_distill.teacher:
            raise ConfigError("distill.teacher and guidance_distill.teacher are both set; distil the "
                              "guidance first, then the steps (two runs)")
        if self.data.couplings and v.holdout:
            raise ConfigError("validation.holdout > 0 reads data.cache, but data.couplings is set: set "
                              "validation.holdout=0 (evaluate the reflowed model with `rectiflow eval`)")
        if d.teacher and d.alpha != 1.0 and v.shift != d.alpha:
            raise ConfigError(
                f"distill.shift={d.shift} but validation.shift={v.shift!r}: the exported bundle samples with "
                f"validation.shift, so it would not sample on the grid the student learns; set "
                f'validation.shift="{d.alpha:g}"')

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some fields of some sections changed: cfg.replace(train={"steps": 5})."""
        d = config_to_dict(self)
        for name, values in sections.items():
            if name not in d:
                raise ConfigError(f"unknown config section {name!r}; sections: {', '.join(d)}")
            d[name].update(values)
        return config_from_dict(d)


# ---- type checking ---------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """`value` (from TOML) as type `tp`, or a ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
                return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(out) if origin is tuple else out
    elif origin is dict and isinstance(value, dict):
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _section_from_dict(cls, values: Any, name: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section [{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {name}.{unknown[0]}; valid keys in [{name}]: "
                          f"{', '.join(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """A RunConfig from nested dicts (as read from TOML); missing sections/keys take their defaults."""
    hints = typing.get_type_hints(RunConfig)
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; sections: {', '.join(sections)}")
    return RunConfig(**{k: _section_from_dict(hints[k], v, k) for k, v in d.items()})


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dicts (tuples as lists), JSON- and TOML-able."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ---- overrides, TOML -------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string: model.preset=tiny


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to nested dicts (a copy); bad syntax -> ConfigError."""
    d = json.loads(json.dumps(d))
    for o in overrides:
        key, sep, text = o.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"bad override {o!r}; write section.key=value, e.g. optim.lr=1e-4")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad override {o!r}: {p} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML (or a JSON config saved beside a checkpoint) and apply dotted overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass a TOML file such as configs/tiny.toml")
        try:
            d = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}") from None
    return config_from_dict(apply_overrides(d, overrides or []))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")


def dump_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (None values are left out: they are the defaults)."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)

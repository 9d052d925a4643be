"""Run configuration of `rectiflow train`: nested frozen dataclasses, TOML in and out, dotted overrides.

    cfg = load_config("configs/tiny.toml", ["optim.lr=1e-4", "train.steps=100"])
    cfg.optim.lr                      # 1e-4
    dump_toml(cfg)                    # the resolved config as TOML (saved beside every checkpoint)

A TOML file has one table per section ([model], [data], [flow], [optim], [ema], [train], [validation],
[logging], [checkpoint], [export], [distributed], [distill], [lora], [guidance_distill]); every key is
optional and defaults to the field's value (rectiflow.train.config_sections). Unknown sections or keys and
values of the wrong type raise a one-line ConfigError. Overrides are `section.key=value` with the value
parsed as a TOML value (`1e-4`, `true`, `[0.9, 0.95]`, `{m = 0.5}`), or taken as a plain string when it
does not parse (`model.preset=tiny`).
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
from rectiflow.train.config_sections import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    DistributedConfig,
    EMAConfig,
    ExportConfig,
    FlowConfig,
    GuidanceDistillConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainLoopConfig,
    ValidationConfig,
)

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
        if self.data.mix_cache and not (self.data.couplings and self.data.cache):
            raise ConfigError("data.mix_cache=true mixes data.cache into data.couplings: set both")
        self._check_contrastive()
        if self.data.couplings and v.holdout:
            raise ConfigError("validation.holdout > 0 reads data.cache, but data.couplings is set: set "
                              "validation.holdout=0 (evaluate the reflowed model with `rectiflow eval`)")
        if d.teacher and d.alpha != 1.0 and v.shift != d.alpha:
            raise ConfigError(
                f"distill.shift={d.shift} but validation.shift={v.shift!r}: the exported bundle samples with "
                f"validation.shift, so it would not sample on the grid the student learns; set "
                f'validation.shift="{d.alpha:g}"')

    def _check_contrastive(self) -> None:
        kind = self.flow.contrastive
        if (kind == "counterfactual") != bool(self.data.negative_cache):
            raise ConfigError("flow.contrastive='counterfactual' and data.negative_cache go together: set "
                              "both (a cache of `rectiflow data shapes --counterfactual` images) or neither")
        if kind == "none":
            return
        other = [name for name, on in (("distill.teacher", self.distill.teacher),
                                       ("guidance_distill.teacher", self.guidance_distill.teacher),
                                       ("data.couplings", self.data.couplings)) if on]
        if other:
            raise ConfigError(f"flow.contrastive={kind!r} trains on data targets; it does not combine with "
                              f"{', '.join(other)}")

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

"""One way to name a model config: a preset name, the config dataclass itself, or a dict of its fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from rectiflow.errors import ConfigError

T = TypeVar("T")


def resolve_params(spec: Any, cls: type[T], presets: Mapping[str, T], kind: str) -> T:
    """`spec` (preset name | cls instance | dict of cls fields) -> cls; one-line ConfigError otherwise."""
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, str):
        if spec not in presets:
            raise ConfigError(f"unknown {kind} preset {spec!r}; known presets: {', '.join(presets)}")
        return presets[spec]
    if isinstance(spec, dict):
        fields = dataclasses.fields(cls)
        unknown = sorted(set(spec) - {f.name for f in fields})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: "
                              f"{sorted(f.name for f in fields)}")
        missing = sorted(f.name for f in fields if f.name not in spec and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{cls.__name__} is missing field(s) {missing}")
        return cls(**spec)
    raise ConfigError(f"expected a preset name, {cls.__name__} or dict for the {kind}, "
                      f"got {type(spec).__name__}")

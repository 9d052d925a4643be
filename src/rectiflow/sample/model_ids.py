"""Models named by short ids on a command line: `ID=PATH`, `PATH` (its directory name becomes the id) or
`default` (the bundled model). `rectiflow serve` answers requests by these ids only, never by a path;
`rectiflow compare` labels its grids with them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from rectiflow.errors import ConfigError

__all__ = ["DEFAULT_ID", "MODEL_ID_PATTERN", "load_pipelines", "parse_model_spec"]

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no '/', no '\\', no leading '.': never a path


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """"ID=PATH" -> (ID, PATH); "PATH" -> (its directory name, PATH); "default" -> ("default", None)."""
    if spec == DEFAULT_ID:
        return DEFAULT_ID, None
    if "=" in spec:
        model_id, path = spec.split("=", 1)
    else:
        path = spec
        model_id = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(spec).resolve().name).lstrip(".-_") or "model"
    if not re.fullmatch(MODEL_ID_PATTERN, model_id):
        raise ConfigError(f"model id {model_id!r} is not allowed: use letters, digits, '.', '_' and '-' "
                          "(at most 64, starting with a letter or digit), e.g. --model schnell=PATH")
    return model_id, path


def load_pipelines(specs: list[str], device, dtype, *, resolve_default=None) -> dict[str, Any]:
    """{id: Pipeline} for model specs (none: the bundled default model as `default`), every spec checked
    before the first (slow) load. resolve_default() gives the default bundle's path (the CLI passes its
    own, which explains a missing bundle)."""
    from rectiflow.sample.pipeline import Pipeline

    parsed: dict[str, str | None] = {}
    for spec in specs or [DEFAULT_ID]:
        model_id, path = parse_model_spec(spec)
        if model_id in parsed:
            raise ConfigError(f"model id {model_id!r} is given twice; name them apart with ID=PATH")
        parsed[model_id] = path
    pipelines: dict[str, Any] = {}
    for model_id, path in parsed.items():
        if path is None:
            if resolve_default is None:
                from rectiflow.convert.bundle import default_bundle_path as resolve_default
            path = resolve_default()
        log.info("loading %s from %s", model_id, path)
        pipelines[model_id] = Pipeline.from_bundle(path, device=device, dtype=dtype)
    return pipelines

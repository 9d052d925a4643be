"""Start `rectiflow serve`: load each model once, build the job manager and the app, run uvicorn.

Models are named on the command line as ID=PATH (or PATH, whose directory name becomes the id, or `default`
for the bundled model); requests choose among these ids and can never name a path.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Any

from rectiflow.errors import ConfigError
from rectiflow.web.schemas import MODEL_ID_PATTERN, Limits

log = logging.getLogger(__name__)

DEFAULT_ID = "default"


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


def load_models(specs: list[str], device, dtype, *, resolve_default=None) -> dict[str, Any]:
    """{id: Pipeline} for --model specs (none: the bundled default model as `default`). resolve_default()
    gives the default bundle's path (the CLI's, which explains a missing bundle)."""
    from rectiflow.sample import Pipeline

    parsed: dict[str, str | None] = {}
    for spec in specs or [DEFAULT_ID]:  # every spec checked before the first (slow) load
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(pipelines: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000, queue_size: int = 16,
          workers: int = 1, max_batch: int = 1, store_mb: float = 256, limits: Limits | None = None,
          log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C stops it after the running batch)."""
    import uvicorn

    from rectiflow import __version__
    from rectiflow.web.app import create_app
    from rectiflow.web.jobs import ImageStore, JobManager

    manager = JobManager(pipelines, ImageStore(int(store_mb * 2**20)), queue_size=queue_size,
                         workers=workers, max_batch=max_batch,
                         settings_extra={"rectiflow_version": __version__})
    app = create_app(manager, limits)
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can use the server (there is no "
                    "authentication); the default, 127.0.0.1, keeps it to this machine", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)

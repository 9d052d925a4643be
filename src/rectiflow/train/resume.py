"""What a resumed run trains with: the run's saved config, changed only where the command line says so.

`rectiflow train CONFIG [overrides] --resume` used to rebuild the config from CONFIG and the overrides
given this time, so leaving out an override given at the start (model.autoencoder, validation.prompts)
silently changed the run. Now the checkpoint's config.json is the base and only the dotted overrides named
on this command line apply; every key that then differs from the saved config is listed once at start
(`config_changes`), and keys where CONFIG itself disagrees with the run are named as kept.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rectiflow.errors import RectiflowError
from rectiflow.train import checkpoint as ckpt
from rectiflow.train.config import RunConfig, apply_overrides, config_from_dict, config_to_dict, load_config

log = logging.getLogger(__name__)

__all__ = ["resume_checkpoint", "resume_config", "config_changes"]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: sections and keys only (dict values stay whole)."""
    return {f"{section}.{k}": v for section, values in d.items() for k, v in values.items()}


def config_changes(saved: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key where `cfg` differs from the saved config dict."""
    new = _flat(config_to_dict(cfg))
    old = _flat(config_to_dict(config_from_dict(saved)))  # saved by an older version: fill in defaults
    return [(k, old.get(k), v) for k, v in new.items() if old.get(k) != v]


def resume_checkpoint(cfg: RunConfig, resume: str | Path) -> Path:
    """The checkpoint `--resume` means: "latest" = the newest complete one under cfg.train.out_dir."""
    if resume != "latest":
        return Path(resume)
    root = Path(cfg.train.out_dir) / "checkpoints"
    path = ckpt.find_latest(root)
    if path is None:
        raise RectiflowError(f"no complete checkpoint in {root} to resume from; start without --resume")
    return path


def resume_config(config_path: str | Path | None, overrides: list[str], resume: str | Path
                  ) -> tuple[RunConfig, Path]:
    """(config, checkpoint) that `rectiflow train CONFIG OVERRIDES --resume [CHECKPOINT]` continues with:
    the checkpoint's saved config with OVERRIDES applied. CONFIG (with OVERRIDES) only says where the run is
    (train.out_dir); keys where it disagrees with the saved config and that OVERRIDES do not name are
    reported as kept from the run."""
    from_file = load_config(config_path, overrides)
    path = resume_checkpoint(from_file, resume)
    saved_file = path / "config.json"
    if not saved_file.is_file():
        raise RectiflowError(f"{path} is not a training checkpoint (no config.json); pass a step-N directory "
                             "under <out_dir>/checkpoints")
    saved = json.loads(saved_file.read_text())
    cfg = config_from_dict(apply_overrides(saved, overrides))
    named = {o.partition("=")[0].strip() for o in overrides}
    ignored = [(k, v, theirs) for k, v, theirs in config_changes(saved, from_file) if k not in named]
    if ignored:
        log.warning("resume: %s differs from the run's saved config in %s; the run keeps its values (name a "
                    "key on the command line to change it)", config_path,
                    ", ".join(f"{k} ({theirs!r}, run: {v!r})" for k, v, theirs in ignored))
    return cfg, path

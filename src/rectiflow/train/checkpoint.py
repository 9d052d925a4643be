"""Training checkpoints: full state, atomic, safetensors only (nothing is ever unpickled).

A checkpoint is a directory `<out_dir>/checkpoints/step-000000100/`:
    model.safetensors       the weights, with rectiflow transformer metadata (load_transformer reads it)
                            and the resolved run config under "rectiflow.train_config"
    ema.safetensors         the EMA weights (when EMA is on), same metadata
    optimizer.safetensors   every tensor of the optimizer state ("state.<param>.<name>", e.g. exp_avg, step)
    rng.safetensors         torch CPU (and CUDA) RNG states and the trainer's own generators
    state.json              step, data position, counters, the optimizer's scalar structure (param groups,
                            non-tensor state), python/numpy RNG states, the list of files
    config.toml, config.json  the resolved run config (`rectiflow train .../config.toml` reruns it)

It is written into a temporary directory `.step-000000100.tmp-XXXX` beside it (rectiflow.io.atomic's
atomic_dir): every file is fsynced, then the directory, then it is renamed into place and the parent fsynced.
A crash at any point leaves earlier checkpoints intact; `find_latest` only considers complete `step-N`
directories whose state.json lists files that all exist. Tensors are checked to be finite before anything
is written.

Fault injection for tests (off unless set): RECTIFLOW_CHECKPOINT_FAULT=exit-midway[:STEP] makes the process
`os._exit(17)` after model.safetensors is written into the temporary directory (of STEP's checkpoint only,
when given), simulating a crash or kill in the middle of a save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rectiflow.errors import FormatError, RectiflowError
from rectiflow.io.atomic import atomic_dir
from rectiflow.io.metadata import FORMAT_VERSION, META_CONFIG, META_MODEL, META_TRAIN_CONFIG, META_VERSION
from rectiflow.io.safetensors_io import load_tensors, save_safetensors
from rectiflow.models.family import family_of

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "find_latest", "list_checkpoints", "prune",
           "capture_rng", "restore_rng", "flatten_optimizer_state", "unflatten_optimizer_state",
           "META_TRAIN_CONFIG", "FAULT_ENV"]

FAULT_ENV = "RECTIFLOW_CHECKPOINT_FAULT"
STATE_FORMAT = "rectiflow-train-checkpoint"
STATE_VERSION = 1
_NAME = re.compile(r"^step-(\d{9})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


# ---- RNG --------------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) holding every RNG: python, numpy, torch CPU, CUDA (if initialised), `generators`."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    for name, g in generators.items():
        tensors[f"generator.{name}"] = g.get_state()
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(mt), gauss],
          "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, js


def restore_rng(tensors: dict[str, torch.Tensor], js: dict[str, Any],
                generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    for name, g in generators.items():
        key = f"generator.{name}"
        if key not in tensors:
            raise FormatError(f"checkpoint has no state for the trainer's {name!r} generator")
        g.set_state(tensors[key])
    version, mt, gauss = js["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- optimizer state --------------------------------------------------------------------------------------


def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest). Keys may be ints or names."""
    tensors, scalars, keys = {}, {}, []
    for key, st in sd["state"].items():
        keys.append([str(key), isinstance(key, int)])
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{key}.{name}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{key}.{name}"] = v
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": sd["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for key, is_int in js["keys"]:
        k = int(key) if is_int else key
        tp, sp = f"state.{key}.", f"{key}."
        st = {name[len(tp):]: t for name, t in tensors.items() if name.startswith(tp)}
        st.update({name[len(sp):]: v for name, v in js["scalars"].items() if name.startswith(sp)})
        state[k] = st
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---- save / load ------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_json: dict[str, Any]
    state: dict[str, Any]
    config: dict[str, Any]


def _require_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RectiflowError(f"refusing to write a checkpoint: {what} tensor {k!r} is not finite (a "
                                 "diverged run?); resume from the previous checkpoint with a lower lr")


def _fault_now(step: int) -> bool:
    """RECTIFLOW_CHECKPOINT_FAULT=exit-midway[:STEP]: die inside the save (of STEP only, if given)."""
    kind, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    return kind == "exit-midway" and (not at or int(at) == step)


def _model_metadata(model_params: dict | None, config_json: str) -> dict[str, str]:
    meta = {META_TRAIN_CONFIG: config_json}
    if model_params is not None:  # makes model.safetensors / ema.safetensors readable by load_transformer
        meta.update({META_VERSION: FORMAT_VERSION, META_MODEL: family_of(model_params).kind,
                     META_CONFIG: json.dumps(model_params, sort_keys=True)})
    return meta


def save_checkpoint(root: str | Path, step: int, *, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None, optimizer: dict[str, Any],
                    rng: tuple[dict[str, torch.Tensor], dict[str, Any]], state: dict[str, Any],
                    config: dict[str, Any], config_toml: str, model_params: dict | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically into `root`; returns its directory.

    model / ema: full state dicts; optimizer: a torch optimizer state_dict (full, unsharded); rng: from
    capture_rng; state: JSON-able trainer state (data position, counters); config: the resolved run config
    as nested dicts (and as TOML text); model_params: the model's FluxParams / SD3Params .to_dict() for
    the weights' metadata."""
    root = Path(root)
    final = root / checkpoint_name(step)
    if final.is_dir() and (final / "state.json").is_file():
        log.info("checkpoint %s already exists; not rewriting it", final)
        return final
    opt_tensors, opt_json = flatten_optimizer_state(optimizer)
    _require_finite("model", model)
    _require_finite("EMA", ema or {})
    _require_finite("optimizer", opt_tensors)
    root.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config, sort_keys=True)
    meta = _model_metadata(model_params, config_json)
    with atomic_dir(final, replace=False) as tmp:  # `.step-N.tmp-XXXX`, renamed to step-N when complete
        files = ["model.safetensors"]
        save_safetensors(model, tmp / "model.safetensors", meta)
        if _fault_now(step):
            log.error("%s=exit-midway: exiting in the middle of writing %s", FAULT_ENV, final)
            os._exit(17)
        if ema is not None:
            save_safetensors(ema, tmp / "ema.safetensors", meta)
            files.append("ema.safetensors")
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors", {META_TRAIN_CONFIG: config_json})
        save_safetensors(rng[0], tmp / "rng.safetensors")
        (tmp / "config.toml").write_text(config_toml)
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        files += ["optimizer.safetensors", "rng.safetensors", "config.toml", "config.json"]
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": int(step), "files": files,
               "optimizer": opt_json, "rng": rng[1], "state": state}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")
    log.info("saved checkpoint %s", final)
    return final


def _is_complete(d: Path) -> bool:
    try:
        doc = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return doc.get("format") == STATE_FORMAT and all((d / f).is_file() for f in doc.get("files", []))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and partial directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _NAME.match(d.name))]
    return [d for _, d in sorted(found) if _is_complete(d)]


def find_latest(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep = 0: keep all) and stale temp dirs."""
    root = Path(root)
    if keep > 0:
        for d in list_checkpoints(root)[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
            log.info("deleted old checkpoint %s", d)
    for d in root.glob(".step-*.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory (safetensors + JSON only)."""
    d = Path(path)
    if not d.is_dir():
        raise FormatError(f"checkpoint {d} not found; pass a step-N directory under <out_dir>/checkpoints")
    if not _is_complete(d):
        raise FormatError(f"{d} is not a complete rectiflow training checkpoint (state.json or files "
                          "missing); resume from another one")
    doc = json.loads((d / "state.json").read_text())
    if doc.get("version") != STATE_VERSION:
        raise FormatError(f"{d}: checkpoint version {doc.get('version')} is not supported "
                          f"(this rectiflow reads version {STATE_VERSION})")
    opt = unflatten_optimizer_state(load_tensors(d / "optimizer.safetensors"), doc["optimizer"])
    ema = load_tensors(d / "ema.safetensors") if "ema.safetensors" in doc["files"] else None
    return Checkpoint(path=d, step=int(doc["step"]), model=load_tensors(d / "model.safetensors"), ema=ema,
                      optimizer=opt, rng_tensors=load_tensors(d / "rng.safetensors"), rng_json=doc["rng"],
                      state=doc["state"],
                      config=json.loads((d / "config.json").read_text()))

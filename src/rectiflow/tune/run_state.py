"""A tuning run's saved state (OUT/state.pt): written atomically, and read back only into a run of the same
settings, which is what makes rerunning a command resume it (rectiflow.tune.grpo, .dmd)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rectiflow.errors import ConfigError

STATE = "state.pt"

__all__ = ["STATE", "load_run_state", "save_run_state"]


def save_run_state(out: Path, state: dict[str, Any]) -> None:
    """OUT/state.pt, and OUT/history.jsonl from its "history" (one JSON line per iteration)."""
    tmp = out / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE)  # a run killed mid-write keeps its previous state
    (out / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in state["history"]))


def load_run_state(out: Path, meta: dict[str, Any], kind: str, iterations: int, device,
                   meta_defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """OUT's saved state, or None when there is none. Its "meta" must equal `meta` (after filling keys of
    runs saved before an option existed from meta_defaults), and its iteration must not be past `iterations`;
    either is one ConfigError line naming what differs."""
    if not (out / STATE).is_file():
        return None
    state = torch.load(out / STATE, map_location=device, weights_only=True)  # tensors and plain data
    for k, v in (meta_defaults or {}).items():
        state["meta"].setdefault(k, v)
    if state["meta"] != meta:
        diff = sorted(k for k in meta if state["meta"].get(k) != meta[k])
        raise ConfigError(f"{out} holds a {kind} run with another {', '.join(diff)}; use another --out or "
                          "the same arguments")
    start = int(state["iteration"])
    if start > iterations:
        raise ConfigError(f"{out} is at iteration {start}, past --iterations {iterations}; ask for {start} "
                          "or more")
    return state

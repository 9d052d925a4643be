"""Where a study keeps its runs and what it knows of each: the layout rectiflow.eval.study writes and
rectiflow.eval.study_report reads (a module of its own, so the runner and the report do not import each
other).

    OUT/runs/<variant>/seed-<s>/                     run_dir
    OUT/runs/<variant>/seed-<s>/study-run.json       load_run_state / save_run_state
    OUT/runs/<variant>/seed-<s>/eval/step-N-<key>/   eval_key: hash of the settings scores share
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rectiflow.errors import RectiflowError
from rectiflow.eval.study_spec import EvalSettings, StudySpec, Variant
from rectiflow.io.atomic import write_text

__all__ = ["STATE_FILE", "run_dir", "eval_key", "load_run_state", "save_run_state", "milestones"]

STATE_FILE = "study-run.json"


def run_dir(spec: StudySpec, variant: Variant, seed: int) -> Path:
    return spec.out / "runs" / variant.slug / f"seed-{seed}"


def eval_key(settings: EvalSettings) -> str:
    """A short hash of the settings that make two evaluations comparable."""
    text = json.dumps(settings.scoring(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def load_run_state(path: Path) -> dict[str, Any]:
    f = path / STATE_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise RectiflowError(f"{f} is not valid JSON ({e}); delete it to re-derive the run's state") from None


def save_run_state(path: Path, state: dict[str, Any]) -> None:
    """Written atomically: an interrupted write keeps the previous state."""
    write_text(path / STATE_FILE, json.dumps(state, indent=2) + "\n")


def milestones(steps: int, at: Sequence[float]) -> list[int]:
    """The steps at which a run of `steps` steps is scored: round(f * steps) for each budget fraction f."""
    return sorted({max(1, min(steps, round(f * steps))) for f in at})

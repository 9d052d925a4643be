"""recipes/shapes/finalize.py: the model card's wall-time table."""

import importlib.util
from pathlib import Path

FINALIZE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "finalize.py"


def _finalize():
    spec = importlib.util.spec_from_file_location("shapes_finalize", FINALIZE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wall_rows_sum_the_invocations_of_a_resumed_stage():
    times = [{"stage": "data", "seconds": 390}, {"stage": "transformer", "seconds": 3000},
             {"stage": "transformer", "seconds": 1962}, {"stage": "eval", "seconds": 150}]
    assert _finalize()._wall_rows(times).splitlines() == [
        "| data | 6.5 |", "| transformer (2 invocations) | 82.7 |", "| eval | 2.5 |"]

"""The report of a study (rectiflow.eval.study): study.json, study.md and score-against-CPU-time plots.

Per variant, at the end of the budget: every split x sampling-step score as the mean over seeds with the
sample standard deviation (n - 1; "±" in the table, only with two or more seeds), the validation loss (SD3's
bucketed loss on held-out cache samples; comparable only between variants that share flow.path, since each
path has its own target), training samples/s (samples / training wall time), and per run the training CPU
and wall minutes. The plots draw, per split and step count, each variant's mean score at every scored point
of its budget against its mean training CPU minutes there.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from rectiflow.eval.study_layout import eval_key, load_run_state, milestones, run_dir
from rectiflow.eval.study_spec import StudySpec

__all__ = ["summarize", "write_report", "report_markdown", "mean_spread"]


def mean_spread(values: list[float]) -> dict[str, Any]:
    """{"mean", "std" (sample std; None below two values), "n", "values"}."""
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def _point(scored: dict[str, Any], step: int) -> dict[str, Any] | None:
    return scored.get(str(step))


def summarize(spec: StudySpec) -> dict[str, Any]:
    """Everything the runs' study-run.json files hold, aggregated per variant (JSON-able)."""
    variants = []
    for v in spec.variants:
        key = eval_key(v.eval)
        runs, final = [], []
        curve: dict[int, list[dict[str, Any]]] = {}
        for seed in spec.seeds:
            state = load_run_state(run_dir(spec, v, seed))
            steps = state.get("steps")
            scored = state.get("evals", {}).get(key, {})
            runs.append({"seed": seed, "steps": steps, "trained_step": max(
                [s["to"] for s in state.get("segments", [])], default=0),
                "scored_steps": sorted(int(k) for k in scored)})
            if steps is None:
                continue
            for m in milestones(steps, v.eval.at):
                p = _point(scored, m)
                if p is not None:
                    curve.setdefault(m, []).append(p)
            p = _point(scored, steps)
            if p is not None:
                final.append(p)
        variants.append({"name": v.name, "description": v.description, "overrides": v.overrides,
                         "eval": v.eval.scoring(), "eval_key": key, "runs": runs,
                         "final": _aggregate(final), "curve": [dict(step=m, **_aggregate(ps))
                                                               for m, ps in sorted(curve.items())]})
    return {"study": spec.name, "description": spec.description, "budget": spec.budget_text(),
            "seeds": list(spec.seeds), "base": str(spec.base), "variants": variants}


def _aggregate(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of one scored point (the same step of every seed's run)."""
    if not points:
        return {"n_runs": 0}
    scores: dict[str, dict[str, Any]] = {}
    for split, by_steps in points[0]["results"].items():
        for n in by_steps:
            vals = [p["results"][split][n]["overall"] for p in points
                    if n in p["results"].get(split, {})]
            scores.setdefault(split, {})[n] = mean_spread(vals)
    losses = [p["val_loss"] for p in points if p.get("val_loss") is not None]
    rates = [p["samples"] / p["train_wall_s"] for p in points if p.get("train_wall_s")]
    return {"n_runs": len(points), "samples": points[0]["samples"], "scores": scores,
            "val_loss": mean_spread(losses), "samples_per_s": mean_spread(rates),
            "train_cpu_min": mean_spread([p["train_cpu_s"] / 60 for p in points]),
            "train_wall_min": mean_spread([p["train_wall_s"] / 60 for p in points]),
            "eval_cpu_min": mean_spread([p["eval_cpu_s"] / 60 for p in points])}


def _cell(ms: dict[str, Any] | None, digits: int = 3) -> str:
    if not ms or ms.get("mean") is None:
        return "-"
    text = f"{ms['mean']:.{digits}f}"
    if ms.get("std") is not None:
        text += f" ± {ms['std']:.{digits}f}"
    return text


def _columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    cols: list[tuple[str, str]] = []
    for v in summary["variants"]:
        for split, by_steps in v["final"].get("scores", {}).items():
            for n in by_steps:
                if (split, n) not in cols:
                    cols.append((split, n))
    return cols


def _ranks(summary: dict[str, Any], cols: list[tuple[str, str]]) -> dict[str, int]:
    """Rank by the mean over every split x step score column (1 = best); unscored variants are unranked."""
    avg = {}
    for v in summary["variants"]:
        sc = v["final"].get("scores", {})
        vals = [sc.get(s, {}).get(n, {}).get("mean") for s, n in cols]
        if vals and all(x is not None for x in vals):
            avg[v["name"]] = statistics.fmean(vals)
    order = sorted(avg, key=lambda k: -avg[k])
    return {name: i + 1 for i, name in enumerate(order)}


def report_markdown(summary: dict[str, Any]) -> str:
    cols = _columns(summary)
    ranks = _ranks(summary, cols)
    head = ["variant", "rank"] + [f"{s} {n} steps" for s, n in cols] + [
        "val loss", "samples/s", "train CPU min", "train wall min", "runs"]
    lines = [f"# Study: {summary['study']}", ""]
    if summary["description"]:
        lines += [summary["description"], ""]
    lines += [f"Budget: {summary['budget']}; seeds {summary['seeds']}; base config {summary['base']}. "
              "Scores: shapes-world benchmark (overall accuracy), mean ± sample std over seeds, at the end "
              "of the budget. Rank: by the mean of the score columns. Validation loss compares only variants "
              "with the same flow path.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in summary["variants"]:
        f = v["final"]
        sc = f.get("scores", {})
        row = [v["name"], str(ranks.get(v["name"], "-"))]
        row += [_cell(sc.get(s, {}).get(n)) for s, n in cols]
        row += [_cell(f.get("val_loss"), 4), _cell(f.get("samples_per_s"), 1),
                _cell(f.get("train_cpu_min"), 1), _cell(f.get("train_wall_min"), 1),
                f"{f.get('n_runs', 0)}/{len(v['runs'])}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Variants", ""]
    for v in summary["variants"]:
        over = ", ".join(f"{s}.{k} = {json.dumps(x)}" for s, kv in v["overrides"].items()
                         for k, x in kv.items())
        ev = ", ".join(f"{k} {v['eval'][k]}" for k in ("sampler", "shift", "cfg") if v["eval"][k] is not None)
        lines.append(f"- **{v['name']}**: {over or 'the base config'}" + (f"; sampling {ev}" if ev else "")
                     + (f". {v['description']}" if v["description"] else ""))
    lines += ["", "## Runs", "", "| variant | seed | planned steps | trained to | scored at |",
              "|---|---|---|---|---|"]
    for v in summary["variants"]:
        for r in v["runs"]:
            lines.append(f"| {v['name']} | {r['seed']} | {r['steps'] or '-'} | {r['trained_step']} | "
                         f"{', '.join(map(str, r['scored_steps'])) or '-'} |")
    return "\n".join(lines) + "\n"


def _plots(summary: dict[str, Any], out: Path) -> list[Path]:
    from rectiflow.eval.plot import line_plot

    paths = []
    for split, n in _columns(summary):
        series = {}
        for v in summary["variants"]:
            pts = [(c["train_cpu_min"]["mean"], c["scores"][split][n]["mean"]) for c in v["curve"]
                   if c.get("n_runs") and c["scores"].get(split, {}).get(n, {}).get("mean") is not None]
            if pts:
                series[v["name"]] = pts
        if not any(math.isfinite(y) for pts in series.values() for _, y in pts):
            continue
        paths.append(line_plot(series, out / f"score-vs-cpu-{split}-{n}steps.png", markers=True,
                               title=f"{summary['study']}: {split}, {n} sampling steps",
                               xlabel="training CPU minutes per run", ylabel="score"))
    return paths


def _write_text(path: Path, text: str) -> None:
    """Written beside and renamed into place: several study processes may rewrite the report at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(spec: StudySpec, summary: dict[str, Any]) -> list[Path]:
    """study.json, study.md and the plots under spec.out."""
    spec.out.mkdir(parents=True, exist_ok=True)
    _write_text(spec.out / "study.json", json.dumps(summary, indent=2) + "\n")
    _write_text(spec.out / "study.md", report_markdown(summary))
    return [spec.out / "study.md", spec.out / "study.json", *_plots(summary, spec.out)]

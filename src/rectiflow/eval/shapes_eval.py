"""`rectiflow eval shapes`: generate the shapes-world prompt sets with a model and score them, GenEval-style.

For every split (seen, held_out) and every step count asked for, each prompt of the split's fixed prompt set
is drawn with the protocol's seeds (0..3), every image is scored by the spec's detector and clause rules
(rectiflow.eval.shapes), and the run writes, under OUT:

    OUT/report.json, OUT/report.md          every split x steps: per-task and overall accuracy, why the failed
                                            images failed (rectiflow.eval.shapes.failure), settings
    OUT/<split>/steps<N>/grid.png           a grid of samples (rows: prompts, columns: seeds)
    OUT/<split>/steps<N>/results.jsonl      one line per image: prompt, task, seed, correct, failure,
                                            detections
    OUT/<split>/steps<N>/NNNNN/metadata.jsonl, OUT/<split>/steps<N>/NNNNN/samples/NNNN.png
                                            GenEval's folder layout, so external scorers can read the images

The report records the model identity (name + weights hash), sampler, shift, guidance, CFG scale, image size,
seed list and step counts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rectiflow.data.shapes import Prompt, parse_prompt
from rectiflow.errors import RectiflowError
from rectiflow.eval.shapes import (
    EVAL_SEEDS,
    SPLITS,
    failure,
    format_failures,
    format_shapes_found,
    format_table,
    normalize_split,
    prompt_set,
    score_image,
    shapes_found,
    summarize,
    summarize_failures,
)
from rectiflow.sample.pipeline import DEFAULT

__all__ = ["evaluate_prompt", "evaluate_shapes", "geneval_metadata", "image_grid", "select_prompts"]

log = logging.getLogger(__name__)
USED_KEYS = ("sampler", "shift", "guidance", "cfg_scale")  # generation settings the report records as used
GRID_PER_TASK = 4  # grid rows per task (distinct prompts), columns are the seeds


def geneval_metadata(p: Prompt) -> dict[str, Any]:
    """GenEval's per-prompt metadata ({"tag", "include": [{"class", "count", "color"?, "position"?}],
    "prompt"}), with the shapes as classes."""
    inc: list[dict[str, Any]]
    if p.task == "counting":
        inc = [{"class": p.shape1, "count": p.count}]
    elif p.task == "position":
        # GenEval's layout: the reference object B first; the subject A carries [relation, index of B]
        inc = [{"class": p.shape2, "count": 1}, {"class": p.shape1, "count": 1, "position": [p.relation, 0]}]
    else:
        inc = [{"class": p.shape1, "count": 1}]
        if p.color1:
            inc[0]["color"] = p.color1
        if p.shape2:
            inc.append({"class": p.shape2, "count": 1, **({"color": p.color2} if p.color2 else {})})
    return {"tag": p.task, "include": inc, "prompt": p.text, "held_out": p.held_out}


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _grid_rows(prompts: Sequence[Prompt], per_task: int = GRID_PER_TASK) -> list[int]:
    """Indices of the prompts shown in the grid: the first `per_task` distinct prompts of every task."""
    shown: dict[str, list[str]] = {}
    rows = []
    for k, p in enumerate(prompts):
        seen = shown.setdefault(p.task, [])
        if len(seen) < per_task and p.text not in seen:
            seen.append(p.text)
            rows.append(k)
    return rows


def _generate(pipe, texts: list[str], steps: int, seeds: Sequence[int], gen_kw: dict[str, Any],
              batch_prompts: int, bar, used: dict[str, Any]) -> dict[str, list[Image.Image]]:
    """Images of every distinct prompt text with every seed (repeated prompts are generated once)."""
    images: dict[str, list[Image.Image]] = {}
    for start in range(0, len(texts), batch_prompts):
        chunk = texts[start:start + batch_prompts]
        res = pipe.generate(chunk, steps=steps, num_images_per_prompt=len(seeds),
                            seeds=[s for _ in chunk for s in seeds], progress=False, **gen_kw)
        if len(res.images) != len(chunk) * len(seeds):
            raise RectiflowError(f"the pipeline returned {len(res.images)} images for {len(chunk)} prompts "
                                 f"x {len(seeds)} seeds")
        settings = getattr(res, "settings", None)
        if settings and not used:  # what the pipeline really used (resolved defaults, ignored guidance)
            used.update({k: settings[0][k] for k in USED_KEYS if k in settings[0]})
        for j, text in enumerate(chunk):
            images[text] = [im.convert("RGB") for im in res.images[j * len(seeds):(j + 1) * len(seeds)]]
        bar.update(len(chunk) * len(seeds))
    return images


def _run_one(pipe, prompts: list[Prompt], steps: int, seeds: Sequence[int], out: Path | None,
             gen_kw: dict[str, Any], batch_prompts: int, bar, used: dict[str, Any]) -> dict[str, Any]:
    """Generate, score and (with out) write one split at one step count; returns its summary."""
    texts = list(dict.fromkeys(p.text for p in prompts))
    images = _generate(pipe, texts, steps, seeds, gen_kw, batch_prompts, bar, used)
    scores: dict[str, list[dict]] = {}  # prompt text -> one record per seed (scored once per distinct image)
    for p in prompts:
        if p.text in scores:
            continue
        scores[p.text] = []
        for seed, im in zip(seeds, images[p.text]):
            r = score_image(p, np.asarray(im))
            dets = [dict(shape=d.shape, color=d.color, cx=d.cx, cy=d.cy, side=d.side, area=d.area,
                         iou=round(d.iou, 4)) for d in r.detections]
            scores[p.text].append(dict(seed=seed, correct=r.correct, failure=failure(r),
                                       clauses=[[c.text, c.holds] for c in r.clauses], detections=dets))
    records = [dict(index=k, prompt=p.text, task=p.task, held_out=p.held_out, **rec)
               for k, p in enumerate(prompts) for rec in scores[p.text]]
    summary = summarize([(r["task"], r["correct"]) for r in records])
    summary["failures"] = summarize_failures([(r["task"], r["failure"]) for r in records])
    summary["shapes_found"] = shapes_found([(prompts[r["index"]], [d["shape"] for d in r["detections"]])
                                            for r in records])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for k, p in enumerate(prompts):  # GenEval layout: <index>/metadata.jsonl, <index>/samples/<n>.png
            folder = out / f"{k:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(geneval_metadata(p)) + "\n")
            for n, im in enumerate(images[p.text]):
                im.save(folder / "samples" / f"{n:04d}.png")
        with open(out / "results.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        image_grid([im for k in _grid_rows(prompts) for im in images[prompts[k].text]], len(seeds)).save(
            out / "grid.png")
    return summary


def select_prompts(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """At most `limit` prompts per task, in order (all with None)."""
    if limit is None:
        return list(prompts)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RectiflowError(f"limit must be a positive integer, got {limit!r}")
    kept: list[Prompt] = []
    per_task: dict[str, int] = {}
    for p in prompts:
        if per_task.get(p.task, 0) < limit:
            kept.append(p)
            per_task[p.task] = per_task.get(p.task, 0) + 1
    return kept


def _check_steps(steps: Sequence[int]) -> list[int]:
    steps = list(steps)
    if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in steps):
        raise RectiflowError(f"steps must be integers >= 1, got {steps}")
    return steps


def _settings(pipe, sampler, shift, guidance, cfg_scale, size, cfg_interval=None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generate() keywords of an evaluation and the settings its report records (defaults resolved)."""
    d = pipe.defaults
    size = size or d.width
    gen_kw = dict(width=size, height=size, sampler=sampler or d.sampler, shift=shift, guidance=guidance,
                  cfg_scale=d.cfg_scale if cfg_scale is None else float(cfg_scale))
    settings = {"sampler": gen_kw["sampler"], "shift": d.shift if shift is DEFAULT else shift,
                "guidance": d.guidance if guidance is DEFAULT else guidance,
                "cfg_scale": gen_kw["cfg_scale"], "size": size}
    if cfg_interval is not None:  # only then, so that pipelines without the keyword still evaluate
        gen_kw["cfg_interval"] = settings["cfg_interval"] = list(cfg_interval)
    return gen_kw, settings


def evaluate_shapes(pipe, *, steps: Sequence[int] = (1, 2, 4, 8), sampler: str | None = None,
                    shift: Any = DEFAULT, guidance: Any = DEFAULT, cfg_scale: float | None = None,
                    size: int | None = None, cfg_interval: tuple[float, float] | None = None,
                    splits: Sequence[str] = SPLITS,
                    seeds: Sequence[int] = EVAL_SEEDS, out_dir: str | Path | None = None,
                    limit: int | None = None, batch_prompts: int = 16,
                    progress: bool = True) -> dict[str, Any]:
    """Score `pipe` (a rectiflow.sample.Pipeline, or anything with its generate(), defaults, name and
    model_hash) on the shapes-world prompt sets; returns (and, with out_dir, writes) the report.

    limit: at most this many prompts per task (a quick look; the protocol uses all of them).
    """
    steps = _check_steps(steps)
    if batch_prompts < 1:
        raise RectiflowError(f"batch_prompts must be >= 1, got {batch_prompts}")
    splits = list(dict.fromkeys(normalize_split(s) for s in splits))
    gen_kw, settings = _settings(pipe, sampler, shift, guidance, cfg_scale, size, cfg_interval)
    size = gen_kw["width"]
    out = Path(out_dir) if out_dir is not None else None
    report: dict[str, Any] = {
        "benchmark": "shapes-world",
        "model": {"name": pipe.name, "hash": pipe.model_hash},
        "settings": dict(settings, seeds=list(seeds), steps=steps, limit_per_task=limit),
        "results": {},
    }
    prompt_sets = {split: select_prompts(prompt_set(split), limit) for split in splits}
    total = sum(len({p.text for p in ps}) for ps in prompt_sets.values()) * len(seeds) * len(steps)
    used: dict[str, Any] = {}
    with tqdm(total=total, desc="shapes eval", unit="img", disable=not progress) as bar:
        for split, prompts in prompt_sets.items():
            for n in steps:
                sub = out / split / f"steps{n}" if out is not None else None
                log.info("shapes eval: %s split, %d prompts x %d seeds, %d steps", split, len(prompts),
                         len(seeds), n)
                summary = _run_one(pipe, prompts, n, seeds, sub, gen_kw, batch_prompts, bar, used)
                report["settings"].update(used)
                report["results"].setdefault(split, {})[str(n)] = summary
                if sub is not None:
                    one = dict(report, results={split: {str(n): summary}},
                               settings=dict(report["settings"], steps=[n]))
                    (sub / "report.json").write_text(json.dumps(one, indent=2) + "\n")
                    (sub / "report.md").write_text(report_markdown(one))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(report_markdown(report))
    return report


def evaluate_prompt(pipe, text: str, *, seeds: Sequence[int] = tuple(range(16)),
                    steps: Sequence[int] = (4,), sampler: str | None = None, shift: Any = DEFAULT,
                    guidance: Any = DEFAULT, cfg_scale: float | None = None, size: int | None = None,
                    cfg_interval: tuple[float, float] | None = None, out_dir: str | Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """One shapes-world prompt (any of the six templates, seen or not) drawn with every seed at every step
    count and scored like the benchmark: how often does `rectiflow generate TEXT` come out right? Returns
    (and, with out_dir, writes as report.json plus a grid per step count) per step count the number right,
    the seeds that were right and the failure kinds of the others."""
    prompt = parse_prompt(text)  # one line naming the problem for a prompt outside the grammar
    steps = _check_steps(steps)
    seeds = list(seeds)
    if not seeds:
        raise RectiflowError("seeds must not be empty")
    gen_kw, settings = _settings(pipe, sampler, shift, guidance, cfg_scale, size, cfg_interval)
    report: dict[str, Any] = {"prompt": prompt.text, "task": prompt.task,
                              "model": {"name": pipe.name, "hash": pipe.model_hash},
                              "settings": dict(settings, seeds=seeds, steps=steps), "results": {}}
    out = Path(out_dir) if out_dir is not None else None
    used: dict[str, Any] = {}
    with tqdm(total=len(seeds) * len(steps), desc="prompt eval", unit="img", disable=not progress) as bar:
        for n in steps:
            images = _generate(pipe, [text], n, seeds, gen_kw, len(seeds), bar, used)[text]
            scores = [score_image(prompt, np.asarray(im)) for im in images]
            kinds: dict[str, int] = {}
            for sc in scores:
                kind = failure(sc)
                if kind is not None:
                    kinds[kind] = kinds.get(kind, 0) + 1
            right = [seed for seed, sc in zip(seeds, scores) if sc.correct]
            report["results"][str(n)] = {"correct": len(right), "n": len(seeds), "correct_seeds": right,
                                         "failures": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}
            if out is not None:
                (out / f"steps{n}").mkdir(parents=True, exist_ok=True)
                image_grid(images, min(len(images), 8)).save(out / f"steps{n}" / "grid.png")
    report["settings"].update(used)
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def report_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# Shapes-world evaluation: {report['model']['name']} ({report['model']['hash'][:12]})", "",
             f"sampler {s['sampler']}, shift {s['shift']}, guidance {s['guidance']}, CFG {s['cfg_scale']}"
             + (f" at t in {s['cfg_interval']}" if s.get("cfg_interval") else "")
             + f", {s['size']}px, seeds {s['seeds']}", ""]
    for split, by_steps in report["results"].items():
        lines += [f"## {split}", "", format_table({f"{k} steps": v for k, v in by_steps.items()}), ""]
        fails = {f"{k} steps": v["failures"] for k, v in by_steps.items() if "failures" in v}
        if any(kinds for f in fails.values() for kinds in f.values()):
            lines += ["Failed images by kind (rectiflow.eval.shapes.failure):", "", format_failures(fails),
                      ""]
        found = {f"{k} steps": v["shapes_found"] for k, v in by_steps.items() if "shapes_found" in v}
        if found:
            lines += ["Named shapes found (rectiflow.eval.shapes.shapes_found: of the images whose prompt "
                      "names a shape, the fraction with an object of it):", "", format_shapes_found(found),
                      ""]
    return "\n".join(lines)

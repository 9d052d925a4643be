"""`rectiflow eval ceiling`: the highest shapes-world score a model can reach through its autoencoder.

A generator is scored on decoded pixels, so no transformer can beat the scorer on the autoencoder's own
round trip of perfect images. For every prompt of the benchmark's prompt sets (rectiflow.eval.shapes) and
every seed, this renders a ground-truth scene realising the prompt (rectiflow.data.shapes.scene_for_prompt,
a fresh layout per seed), scores the render, encodes and decodes it with the autoencoder (posterior mean,
as `rectiflow cache` encodes training images) and scores that too. The two rows bound any model's score:
"renders" is the scorer's own ceiling (its detector on perfect images), "autoencoder" the model's.

    OUT/report.json, OUT/report.md      per split: both rows' per-task and overall accuracy, failure kinds
    OUT/<split>/grid.png                renders (odd rows) over their round trips (even rows), a few per task
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rectiflow.data.shapes import Prompt, render, scene_for_prompt
from rectiflow.errors import RectiflowError
from rectiflow.eval.shapes import (
    EVAL_SEEDS,
    SPLITS,
    failure,
    format_failures,
    format_table,
    normalize_split,
    prompt_set,
    score_image,
    summarize,
    summarize_failures,
)
from rectiflow.eval.shapes_eval import image_grid, select_prompts

__all__ = ["CEILING_SEED", "ROWS", "ceiling_markdown", "evaluate_ceiling", "round_trip"]

CEILING_SEED = 20261206  # ours: scene layouts are drawn from default_rng([CEILING_SEED, prompt index, seed])
ROWS = ("renders", "autoencoder")
GRID_PROMPTS_PER_TASK = 2


@torch.no_grad()
def round_trip(autoencoder: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the autoencoder's reconstruction, uint8 [N, H, W, 3]: pixels in [-1, 1] as
    rectiflow.data.transforms.to_tensor, the posterior mean, and back to uint8 as the pipeline's images
    (x / 2 + 0.5, clamp, * 255, round: diffusers' VaeImageProcessor)."""
    ref = next(autoencoder.parameters())
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(ref.device, torch.float32)
    y = autoencoder.decode(autoencoder.encode((x / 127.5 - 1.0).to(ref.dtype)))
    y = (y.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def _score_split(autoencoder, prompts: list[Prompt], seeds: Sequence[int], size: int, batch: int, bar
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Both rows' summaries of one split, and (render, round trip) image pairs for the grid."""
    jobs = [(k, p, s) for k, p in enumerate(prompts) for s in seeds]
    records: dict[str, list[tuple[str, bool, str | None]]] = {row: [] for row in ROWS}
    grid_rows: dict[int, list[np.ndarray]] = {}
    shown: dict[str, int] = {}
    for k, p in enumerate(prompts):
        if shown.get(p.task, 0) < GRID_PROMPTS_PER_TASK:
            shown[p.task] = shown.get(p.task, 0) + 1
            grid_rows[k] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        renders = np.stack([render(scene_for_prompt(p, np.random.default_rng([CEILING_SEED, k, s]), size))
                            for k, p, s in chunk])
        recon = round_trip(autoencoder, renders)
        for (k, p, _), a, b in zip(chunk, renders, recon):
            for row, img in zip(ROWS, (a, b)):
                r = score_image(p, img)
                records[row].append((p.task, r.correct, failure(r)))
            if k in grid_rows:
                grid_rows[k].append(np.concatenate([a, b], axis=0))  # render above its round trip
        bar.update(len(chunk))
    summaries = {}
    for row, recs in records.items():
        summaries[row] = summarize([(t, ok) for t, ok, _ in recs])
        summaries[row]["failures"] = summarize_failures([(t, f) for t, _, f in recs])
    return summaries, [img for k in sorted(grid_rows) for img in grid_rows[k]]


def evaluate_ceiling(autoencoder: torch.nn.Module, *, size: int = 64, splits: Sequence[str] = SPLITS,
                     seeds: Sequence[int] = EVAL_SEEDS, limit: int | None = None, batch_size: int = 64,
                     out_dir: str | Path | None = None, name: str = "autoencoder",
                     progress: bool = True) -> dict[str, Any]:
    """Score renders of the benchmark's prompts and their `autoencoder` round trips; returns (and, with
    out_dir, writes) the report: results[split][row] with row in ROWS, each a summarize() output."""
    seeds = list(seeds)
    if not seeds:
        raise RectiflowError("seeds must not be empty")
    if batch_size < 1:
        raise RectiflowError(f"batch_size must be >= 1, got {batch_size}")
    f = 2 ** (len(autoencoder.params.ch_mult) - 1)
    if size % f:
        raise RectiflowError(f"image size {size} is not divisible by the autoencoder's factor {f}")
    splits = list(dict.fromkeys(normalize_split(s) for s in splits))
    prompt_sets = {split: select_prompts(prompt_set(split), limit) for split in splits}
    report: dict[str, Any] = {"benchmark": "shapes-world ceiling", "autoencoder": name,
                              "settings": {"size": size, "seeds": seeds, "limit_per_task": limit,
                                           "layout_seed": CEILING_SEED}, "results": {}}
    out = Path(out_dir) if out_dir is not None else None
    total = sum(len(ps) for ps in prompt_sets.values()) * len(seeds)
    with tqdm(total=total, desc="ceiling", unit="img", disable=not progress) as bar:
        for split, prompts in prompt_sets.items():
            summaries, grid = _score_split(autoencoder, prompts, seeds, size, batch_size, bar)
            report["results"][split] = summaries
            if out is not None:
                (out / split).mkdir(parents=True, exist_ok=True)
                image_grid([Image.fromarray(g) for g in grid], len(seeds)).save(out / split / "grid.png")
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(ceiling_markdown(report))
    return report


def ceiling_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# Shapes-world ceiling: {report['autoencoder']}", "",
             f"{s['size']}px, seeds {s['seeds']}; renders of the prompts, then their autoencoder round trips",
             ""]
    for split, rows in report["results"].items():
        lines += [f"## {split}", "", format_table(rows), ""]
        fails = {row: v["failures"] for row, v in rows.items()}
        if any(kinds for f in fails.values() for kinds in f.values()):
            lines += ["Failed images by kind (rectiflow.eval.shapes.failure):", "", format_failures(fails),
                      ""]
    return "\n".join(lines)

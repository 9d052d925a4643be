"""`rectiflow compare`: prompts x models x step counts x seeds, offline, as contact sheets and a page.

    compare(pipelines, prompts, out, steps=(1, 4), seeds=(0,)) -> report dict (also out/compare.json)

Writes into `out`:
- images/pNNN/MODEL-sSTEPS-seedSEED.png: every image, with the PNG settings chunks `generate` writes;
- sheet-NNN.png: one contact sheet per prompt: columns are step counts, rows are model x seed, each image
  labelled, with the shapes-world scorer's verdict under it when the prompt is a shapes-world prompt;
- compare.json: every image's settings (and verdict), the models' names and hashes;
- index.html: every sheet with its prompt, linking each image.
Resumable: an image whose file exists with the same settings is not generated again (files are written
atomically, so an interrupted run leaves no half image); sheets, JSON and page are rebuilt each run.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from rectiflow.errors import RectiflowError
from rectiflow.eval.shapes import failure, score_image
from rectiflow.io.atomic import atomic_write
from rectiflow.sample.png import read_png_settings, save_png

__all__ = ["compare", "verdict"]

log = logging.getLogger(__name__)

CELL_MIN = 128  # small images are scaled up (nearest) to at least this many pixels in the sheets
# settings an existing image must match to be reused by a resumed run
RESUME_KEYS = ("prompt", "seed", "steps", "sampler", "shift", "cfg_scale", "guidance", "width", "height",
               "model_hash", "negative_prompt")
GOOD, BAD, INK, MUTED = (43, 138, 62), (201, 42, 42), (29, 35, 48), (107, 115, 133)


def verdict(prompt: str, image: Image.Image) -> dict[str, Any] | None:
    """The shapes-world scorer on one image: {"correct": bool, "failure": kind or None}; None when the
    prompt is not a shapes-world prompt."""
    from rectiflow.data.shapes import parse_prompt

    try:
        parsed = parse_prompt(prompt)
    except RectiflowError:
        return None
    score = score_image(parsed, image)
    return {"correct": score.correct, "failure": failure(score)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _sheet(prompt: str, steps: Sequence[int], rows: list[str],
           cells: dict[tuple[int, int], dict]) -> Image.Image:
    """A labelled grid: a title, step counts over the columns, row labels, each image with its verdict."""
    first = next(iter(cells.values()))["image"]
    scale = max(1, -(-CELL_MIN // max(first.size)))
    cw, ch = first.width * scale, first.height * scale
    font, small = _font(14), _font(12)
    label_w = max(110, 8 + max(int(ImageDraw.Draw(first).textlength(r, font=small)) for r in rows))
    pad, title_h, head_h, foot_h = 10, 30, 22, 20
    width = label_w + len(steps) * (cw + pad) + pad
    height = title_h + head_h + len(rows) * (ch + foot_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text((pad, 8), prompt, fill=INK, font=font)
    for j, s in enumerate(steps):
        x = label_w + j * (cw + pad)
        label = f"{s} step{'s' if s != 1 else ''}"
        d.text((x + cw / 2, title_h + 4), label, fill=MUTED, font=small, anchor="mt")
    for i, row in enumerate(rows):
        y = title_h + head_h + i * (ch + foot_h + pad)
        d.text((label_w - 8, y + ch / 2), row, fill=MUTED, font=small, anchor="rm")
        for j in range(len(steps)):
            cell = cells.get((i, j))
            if cell is None:
                continue
            x = label_w + j * (cw + pad)
            sheet.paste(cell["image"].resize((cw, ch), Image.NEAREST), (x, y))
            d.rectangle([x - 1, y - 1, x + cw, y + ch], outline=(223, 227, 234))
            v = cell["verdict"]
            if v is not None:
                text, color = ("correct", GOOD) if v["correct"] else (v["failure"], BAD)
                d.text((x + cw / 2, y + ch + 4), text, fill=color, font=small, anchor="mt")
    return sheet


def _save_atomic(image: Image.Image, path: Path, settings: dict[str, Any] | None = None) -> None:
    with atomic_write(path) as tmp:
        if settings is None:
            image.save(tmp, format="PNG")
        else:
            save_png(image, tmp, settings)


def _reusable(path: Path, wanted: dict[str, Any]) -> Image.Image | None:
    if not path.is_file():
        return None
    try:
        _, settings = read_png_settings(path)
    except (OSError, ValueError):
        return None
    if settings is None or any(settings.get(k) != wanted.get(k) for k in RESUME_KEYS if k in wanted):
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def compare(pipelines: dict[str, Any], prompts: Sequence[str], out: str | os.PathLike, *,
            steps: Sequence[int] = (1, 4), seeds: Sequence[int] = (0,), options: dict[str, Any] | None = None,
            settings_extra: dict[str, Any] | None = None,
            on_image: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate (or reuse) every image of the grid and write the sheets, compare.json and index.html.
    `options`: pipeline keyword arguments shared by all images (cfg_scale, width, height, sampler, ...)."""
    if not prompts:
        raise RectiflowError("no prompts to compare; give a text file with one prompt per line")
    if not pipelines:
        raise RectiflowError("no models to compare")
    if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
        raise RectiflowError(f"step counts must be integers >= 1, got {list(steps)}")
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise RectiflowError(f"seeds must be integers >= 0, got {list(seeds)}")
    out = Path(out)
    options = dict(options or {})
    extra = dict(settings_extra or {})
    rows = [f"{mid} · seed {seed}" for mid in pipelines for seed in seeds]
    records, generated, reused = [], 0, 0
    for p_idx, prompt in enumerate(prompts):
        cells: dict[tuple[int, int], dict] = {}
        for m_idx, (mid, pipe) in enumerate(pipelines.items()):
            for j, s in enumerate(steps):
                paths = [out / "images" / f"p{p_idx:03d}" / f"{mid}-s{s}-seed{seed}.png" for seed in seeds]
                expected = [dict(prompt=prompt, seed=seed, steps=s, model_hash=pipe.model_hash, **options)
                            for seed in seeds]
                images = [_reusable(path, want) for path, want in zip(paths, expected)]
                if any(im is None for im in images):
                    result = pipe([prompt], seeds=list(seeds), num_images_per_prompt=len(seeds), steps=s,
                                  progress=False, **options)
                    images = result.images
                    for image, settings, path in zip(images, result.settings, paths):
                        _save_atomic(image, path, dict(settings, **extra))
                    generated += len(images)
                else:
                    reused += len(images)
                for k, (image, path) in enumerate(zip(images, paths)):
                    _, settings = read_png_settings(path)
                    v = verdict(prompt, image)
                    cells[(m_idx * len(seeds) + k, j)] = {"image": image, "verdict": v}
                    records.append({"prompt_index": p_idx, "prompt": prompt, "model": mid, "steps": s,
                                    "seed": seeds[k], "file": path.relative_to(out).as_posix(),
                                    "verdict": v, "settings": settings})
                    if on_image:
                        on_image(str(path))
        _save_atomic(_sheet(prompt, steps, rows, cells), out / f"sheet-{p_idx:03d}.png")
    report = {
        "prompts": list(prompts), "steps": list(steps), "seeds": list(seeds),
        "models": {mid: {"name": p.name, "model_hash": p.model_hash} for mid, p in pipelines.items()},
        "options": {k: v for k, v in options.items()}, "images": records,
        "generated": generated, "reused": reused,
    }
    scored = [r for r in records if r["verdict"] is not None]
    if scored:
        report["accuracy"] = _accuracy(scored)
    with atomic_write(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    with atomic_write(out / "index.html") as tmp:
        tmp.write_text(_index_html(report))
    return report


def _accuracy(scored: list[dict[str, Any]]) -> dict[str, float]:
    """Share of correct images per model and step count ("MODEL @ N steps")."""
    tally: dict[str, list[int]] = {}
    for r in scored:
        t = tally.setdefault(f"{r['model']} @ {r['steps']} steps", [0, 0])
        t[0] += r["verdict"]["correct"]
        t[1] += 1
    return {k: round(c / n, 4) for k, (c, n) in tally.items()}


def _index_html(report: dict[str, Any]) -> str:
    esc = html.escape
    models = ", ".join(f"{esc(mid)} ({esc(m['name'])}, {esc(m['model_hash'])})"
                       for mid, m in report["models"].items())
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8><title>rectiflow compare</title>",
        "<style>body{font:14px system-ui,sans-serif;color:#1d2330;max-width:1100px;margin:24px auto;"
        "padding:0 16px}"
        "h2{font-size:15px;margin:28px 0 6px}img.sheet{max-width:100%;border:1px solid #dfe3ea}"
        ".muted{color:#6b7385;font-size:12px}a{color:#3b5bdb}</style>",
        "<h1>rectiflow compare</h1>",
        f"<p class=muted>models: {models}<br>steps: {esc(', '.join(map(str, report['steps'])))}; seeds: "
        f"{esc(', '.join(map(str, report['seeds'])))}; settings of every image: "
        "<a href=compare.json>compare.json</a></p>",
    ]
    if "accuracy" in report:
        cells = "".join(f"<tr><td>{esc(k)}</td><td>{v:.2f}</td></tr>" for k, v in report["accuracy"].items())
        parts.append(f"<p>shapes-world scorer, share of correct images:</p><table>{cells}</table>")
    for p_idx, prompt in enumerate(report["prompts"]):
        links = " ".join(
            f"<a href='{esc(r['file'])}'>{esc(r['model'])}/{r['steps']}/{r['seed']}</a>"
            for r in report["images"] if r["prompt_index"] == p_idx)
        parts.append(f"<h2>{esc(prompt)}</h2>"
                     f"<img class=sheet src='sheet-{p_idx:03d}.png' alt='{esc(prompt)}'>"
                     f"<p class=muted>images (model/steps/seed): {links}</p>")
    return "\n".join(parts) + "\n"

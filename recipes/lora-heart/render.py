"""Render the heart fine-tuning set in the shapes world's style (white 64 px canvas, the palette colours,
sizes and margins of the world's spec, its anti-aliasing) as an image folder with metadata.jsonl.

    python recipes/lora-heart/render.py OUT [--hearts 200] [--prior 100] [--seed 0]

Hearts: one heart per image, colours cycling through the palette (every colour equally often), captions
"a photo of a {colour} heart" (`text`) and both that and "a photo of a heart" (`captions`). Prior images:
items of the shapes world itself (ShapesWorld(64, seed 0), the bundled model's own training distribution),
DreamBooth's prior preservation (Ruiz et al. 2023): they keep the fine-tune from forgetting the six shapes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from rectiflow.data.shapes import COLORS, MARGIN, SIZE_RANGE, Obj, ShapesWorld, render_objects

SIZE = 64
PRIOR_OFFSET = 10_000_000  # prior images are world items from here on (not the first ones of its seed)


def heart_scene(i: int, seed: int) -> tuple[Obj, str]:
    rng = np.random.default_rng([seed, i])
    color = list(COLORS)[i % len(COLORS)]
    s = rng.uniform(SIZE_RANGE[0] * SIZE, SIZE_RANGE[1] * SIZE)
    lo, hi = MARGIN * SIZE + s / 2, SIZE - MARGIN * SIZE - s / 2
    return Obj("heart", color, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(s)), color


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--hearts", type=int, default=200)
    ap.add_argument("--prior", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.hearts):
        obj, color = heart_scene(i, args.seed)
        name = f"heart-{i:04d}.png"
        Image.fromarray(render_objects([obj], SIZE)).save(out / name)
        text = f"a photo of a {color} heart"
        rows.append({"file_name": name, "text": text, "captions": [text, "a photo of a heart"]})
    world = ShapesWorld(SIZE, seed=args.seed)
    for i in range(args.prior):
        item = world[PRIOR_OFFSET + i]
        name = f"prior-{i:04d}.png"
        Image.fromarray(item.image).save(out / name)
        rows.append({"file_name": name, "text": item.caption, "captions": item.captions})
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "metadata.jsonl")
    print(f"wrote {args.hearts} heart and {args.prior} prior images to {out}")


if __name__ == "__main__":
    main()

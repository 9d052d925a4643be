"""Score the bundled default model on hearts (and on the shapes benchmark's seen split), without and with a
heart LoRA; writes OUT/report.json and before/after grids (rows: "a photo of a heart", then the eight
colours; columns: seeds 0..3).

    python recipes/lora-heart/evaluate.py OUT [--lora FILE] [--scale 1] [--seen] [--steps N] [--cfg S]

Without --lora it scores the base model alone ("before"). --seen also runs the seen split of the shapes
benchmark (1152 images) at the same settings, to measure forgetting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rectiflow.convert.bundle import default_bundle_path
from rectiflow.eval.heart import evaluate_heart
from rectiflow.eval.shapes import EVAL_SEEDS
from rectiflow.eval.shapes_eval import evaluate_shapes, image_grid
from rectiflow.sample import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--lora")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seen", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loras = [(args.lora, args.scale)] if args.lora else []
    pipe = Pipeline.from_bundle(default_bundle_path(), loras=loras)
    t0 = time.process_time()
    heart = evaluate_heart(pipe, steps=args.steps, cfg_scale=args.cfg)
    image_grid(heart.pop("images"), len(EVAL_SEEDS)).save(out / "hearts.png")
    report = {
        "lora": args.lora,
        "scale": args.scale,
        "steps": args.steps or pipe.defaults.steps,
        "cfg": pipe.defaults.cfg_scale if args.cfg is None else args.cfg,
        "heart": heart,
    }
    if args.seen:
        shapes = evaluate_shapes(
            pipe,
            steps=[args.steps or pipe.defaults.steps],
            cfg_scale=args.cfg,
            splits=["seen"],
            out_dir=out / "shapes",
            progress=False,
        )
        report["seen"] = {k: v["overall"] for k, v in shapes["results"]["seen"].items()}
    report["cpu_s"] = time.process_time() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {k: v for k, v in report.items() if k != "heart"}
            | {"heart": {k: heart[k] for k in ("accuracy", "plain", "colored", "seen")}},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

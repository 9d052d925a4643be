"""Which text input binds colours to shapes in a model's images, if any?

    python recipes/shapes/binding_probe.py MODEL [--steps 8] [--cfg C] [--prompts N] [--out F]

For every colour-binding prompt of the seen split ("a photo of a purple circle and a black star": A) and its
colour swap ("... a black circle and a purple star": B), the model samples with four conditionings: A's token
sequence with A's pooled vector (normal), A's sequence with B's pooled vector, B's sequence with A's pooled
vector, and A's sequence with the empty prompt's pooled vector. For each, it reports how often the image is
correct for A and for B (the shapes scorer), and the colour of every detected object of a prompted shape: A's
colour for that shape, B's, or another. A model that binds through the sequence follows the sequence; one that
binds through the pooled vector follows the vector; one that does not bind at all gives A and B about equal
shares under every conditioning. Seeds 0..3 (the eval's), Euler.

Then, teacher-forced: ground-truth scenes of the same prompts (4 each, rendered as training images are),
encoded, noised at t in {0.95, 0.85, 0.7, 0.5, 0.3, 0.1} with fixed noise; the mean flow-matching loss
with the true caption, its colour swap, its shape swap and a caption with two other colours. A model that
uses colours but does not bind them has equal losses for the first three and a higher one for the last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter

import numpy as np
import torch

from rectiflow.data.shapes import COLORS, render, scene_for_prompt
from rectiflow.data.shapes_grammar import Prompt
from rectiflow.eval.shapes import EVAL_SEEDS, prompt_set, score_detections
from rectiflow.eval.shapes_detect import detect
from rectiflow.models.transformer import image_ids, pack, text_ids
from rectiflow.sample import Pipeline

TF_TIMES = (0.95, 0.85, 0.7, 0.5, 0.3, 0.1)


def text(p: Prompt) -> str:
    return p.text  # the template caption, articles as in training ("an orange ...")


def swap(p: Prompt) -> Prompt:
    return dataclasses.replace(p, color1=p.color2, color2=p.color1)


def teacher_forced(pipe: Pipeline, prompts: list[Prompt], size: int, per_prompt: int = 4) -> dict:
    """Mean flow-matching loss per t for the true caption and three altered ones (see the docstring)."""
    rng = np.random.default_rng(0)

    def other(p: Prompt) -> Prompt:  # two colours that are in neither slot of p
        c1, c2 = rng.choice([c for c in COLORS if c not in (p.color1, p.color2)], 2, replace=False)
        return dataclasses.replace(p, color1=str(c1), color2=str(c2))

    def shape_swap(p: Prompt) -> Prompt:
        return dataclasses.replace(p, shape1=p.shape2, shape2=p.shape1)

    rows = [p for p in prompts for _ in range(per_prompt)]
    imgs = np.stack([render(scene_for_prompt(p, rng, size, train=True)) for p in rows])  # [N, S, S, 3]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(pipe.dtype) / 127.5 - 1
    z = pipe.autoencoder.encode(x.to(pipe.device))  # [N, C, h, w]
    x0 = pack(z)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)
    captions = {"true": rows, "colour swap": [swap(p) for p in rows],
                "shape swap": [shape_swap(p) for p in rows], "other colours": [other(p) for p in rows]}
    embeds = {k: pipe.encode_prompts([text(p) for p in v]) for k, v in captions.items()}
    ii = image_ids(1, z.shape[2], z.shape[3], device=pipe.device)
    ti = text_ids(1, embeds["true"][0].shape[1], device=pipe.device)
    out = {}
    for t in TF_TIMES:
        xt, v = (1 - t) * x0 + t * eps, eps - x0
        tt = torch.full((len(rows),), t, device=pipe.device, dtype=pipe.dtype)
        out[t] = {k: float(((pipe.transformer(img=xt, img_ids=ii, txt=txt, txt_ids=ti, timesteps=tt, y=vec,
                                              guidance=None) - v) ** 2).mean())
                  for k, (txt, vec) in embeds.items()}
        print(f"t {t:.2f}: loss " + ", ".join(f"{k} {val:.4f}" for k, val in out[t].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a bundle directory")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the bundle's)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N prompts (a quick look)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    pipe = Pipeline.from_bundle(args.model)
    prompts = sorted(set(prompt_set("seen", "color_attr")), key=text)[:args.prompts]  # unique prompts
    a, b = [text(p) for p in prompts], [text(swap(p)) for p in prompts]
    ta, va = pipe.encode_prompts(a)
    tb, vb = pipe.encode_prompts(b)
    _, v0 = pipe.encode_prompts([""] * len(a))
    conditions = {"seq A, pooled A": (ta, va), "seq A, pooled B": (ta, vb), "seq B, pooled A": (tb, va),
                  "seq A, pooled empty": (ta, v0)}
    n = len(prompts) * len(EVAL_SEEDS)
    results = {}
    for name, embeds in conditions.items():
        c = Counter()
        for seed in EVAL_SEEDS:
            res = pipe.generate(a, steps=args.steps, cfg_scale=args.cfg, width=args.size, height=args.size,
                                seeds=[seed] * len(a), prompt_embeds=embeds, sampler="euler", progress=False)
            for p, img in zip(prompts, res.images):
                dets = detect(img)
                c["correct_A"] += bool(score_detections(p, dets))
                c["correct_B"] += bool(score_detections(swap(p), dets))
                for d in dets:
                    for shape, col_a, col_b in ((p.shape1, p.color1, p.color2),
                                                (p.shape2, p.color2, p.color1)):
                        if d.shape == shape:
                            c["objects"] += 1
                            c["colour_A"] += d.color == col_a
                            c["colour_B"] += d.color == col_b
        r = {"correct_A": c["correct_A"] / n, "correct_B": c["correct_B"] / n, "objects": c["objects"],
             "colour_A": c["colour_A"], "colour_B": c["colour_B"],
             "colour_other": c["objects"] - c["colour_A"] - c["colour_B"], "images": n}
        results[name] = r
        print(f"{name:22s} correct for A {r['correct_A']:.3f}, for B {r['correct_B']:.3f} | objects of a "
              f"prompted shape {r['objects']}: A's colour {r['colour_A']}, B's {r['colour_B']}, "
              f"other {r['colour_other']}", flush=True)
    tf = teacher_forced(pipe, prompts, args.size)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "cfg": args.cfg, "results": results,
                       "teacher_forced": {str(t): v for t, v in tf.items()}}, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()

"""The heart: a shape outside the shapes world's vocabulary, scored for LoRA fine-tuning (recipes/lora-heart).

Prompts: "a photo of a heart" and "a photo of a {colour} heart" for the eight palette colours, each drawn
with the protocol's seeds (0..3). The world's detector (rectiflow.eval.shapes_detect) runs with the heart
added to its candidate shapes; an image is correct when some detected object is a heart (in the named
colour, when the prompt names one): the world's single_object and colors rules with the heart as the shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rectiflow.data.shapes import COLORS, SHAPES
from rectiflow.data.shapes_geometry import EXTRA_SHAPES
from rectiflow.errors import RectiflowError
from rectiflow.eval.shapes import EVAL_SEEDS
from rectiflow.eval.shapes_detect import detect

__all__ = ["HEART_SHAPES", "heart_prompts", "prompt_color", "score_heart", "evaluate_heart"]

HEART_SHAPES = (*SHAPES, *EXTRA_SHAPES)  # the detector's candidates: the world's six and the heart


def heart_prompts() -> list[str]:
    return ["a photo of a heart", *(f"a photo of a {c} heart" for c in COLORS)]


def prompt_color(prompt: str) -> str | None:
    words = prompt.lower().split()
    named = [c for c in COLORS if c in words]
    if "heart" not in words or len(named) > 1:
        raise RectiflowError(f"not a heart prompt: {prompt!r}; use 'a photo of a [colour] heart'")
    return named[0] if named else None


def score_heart(prompt: str, image) -> tuple[bool, str]:
    """(correct, what was seen): correct when a heart (of the prompt's colour, if named) is detected."""
    color = prompt_color(prompt)
    found = detect(image, HEART_SHAPES)
    ok = any(d.shape == "heart" and (color is None or d.color == color) for d in found)
    seen = ", ".join(f"{d.color} {d.shape}" for d in found) or "nothing"
    return ok, seen


def evaluate_heart(
    pipe,
    *,
    seeds: Sequence[int] = EVAL_SEEDS,
    steps: int | None = None,
    cfg_scale: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate every heart prompt with every seed and score it. Returns {"accuracy" (all images),
    "plain" ("a photo of a heart"), "colored" (the colour prompts), "per_prompt", "seen" (the commonest
    detections), "images" (PIL, prompt-major)}."""
    prompts = heart_prompts()
    result = pipe.generate(
        prompts,
        num_images_per_prompt=len(seeds),
        seeds=list(seeds) * len(prompts),
        steps=steps,
        cfg_scale=cfg_scale,
        progress=progress,
    )
    per_prompt: dict[str, list[bool]] = {}
    seen: Counter = Counter()
    for i, image in enumerate(result.images):
        prompt = prompts[i // len(seeds)]
        ok, what = score_heart(prompt, image)
        per_prompt.setdefault(prompt, []).append(ok)
        seen[what] += 1
    flat = [ok for v in per_prompt.values() for ok in v]
    colored = [ok for p, v in per_prompt.items() if prompt_color(p) for ok in v]
    return {
        "accuracy": sum(flat) / len(flat),
        "plain": sum(per_prompt[prompts[0]]) / len(seeds),
        "colored": sum(colored) / len(colored),
        "n_images": len(flat),
        "per_prompt": {p: sum(v) / len(v) for p, v in per_prompt.items()},
        "seen": dict(seen.most_common(8)),
        "images": result.images,
    }

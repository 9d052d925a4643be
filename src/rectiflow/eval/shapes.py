"""The shapes-world scorer: prompt sets, the six clause rules, per-task and overall accuracy.

Normative spec: docs/shapes-world.md ("Scoring" 4-5, "Evaluation protocol"). The detector
(pixel classes, components, shape classification) is rectiflow.eval.shapes_detect; the world itself
(grammar, held-out combinations, the position rule) is rectiflow.data.shapes.

    result = score_image(parse_prompt("a photo of a red circle above a blue square"), image)
    bool(result), result.clauses, result.detections

Choices where the spec leaves room (all deterministic):
- Prompt sets: per task, the template prompts of the split in canonical order (`prompts_for`) form a pool;
  a set of n prompts is floor(n / len(pool)) full copies of the pool plus a draw without replacement of
  the remainder, from numpy default_rng([PROMPT_SEED, task index, split index]), in canonical order. Pools
  smaller than n (single_object has 6 prompts) thus repeat prompts as evenly as possible; such repeats
  give identical images (same prompt, same seeds), which the runner generates once.
- Overall accuracy is the unweighted mean of the accuracies of the tasks present (six for the seen split,
  colors / position / color_attr for the held-out split).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from rectiflow.data.shapes import SHAPES, TASKS, Prompt, parse_prompt, prompts_for, relation_holds
from rectiflow.errors import ConfigError
from rectiflow.eval.shapes_detect import Detection, detect

__all__ = [
    "EVAL_SEEDS", "FAILURES", "HELD_OUT_TASKS", "PROMPTS_PER_TASK", "SPLITS", "Clause", "ImageScore",
    "clauses", "commonest_failure", "failure", "format_failures", "format_shapes_found", "format_table",
    "normalize_split", "prompt_set", "score_detections", "score_image", "shapes_found", "summarize",
    "summarize_failures",
]

EVAL_SEEDS = (0, 1, 2, 3)  # spec "Evaluation protocol": 4 images per prompt, seeds 0..3 (GenEval)
SPLITS = ("seen", "held_out")
HELD_OUT_TASKS = ("colors", "position", "color_attr")  # spec: the tasks whose clause can be held out
PROMPTS_PER_TASK = {"seen": 48, "held_out": 24}  # spec "Evaluation protocol"
PROMPT_SEED = 20240605  # ours: the fixed seed of the prompt sets


def normalize_split(split: str) -> str:
    """"seen" or "held_out" from any of seen / held_out / heldout / held-out (ConfigError otherwise)."""
    s = str(split).strip().lower().replace("-", "_")
    s = "held_out" if s == "heldout" else s
    if s not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use 'seen' or 'heldout'")
    return s


def _task_prompts(task: str, split: str) -> tuple[Prompt, ...]:
    pool = prompts_for(task, "seen" if split == "seen" else "held_out")
    n = PROMPTS_PER_TASK[split]
    copies, rest = divmod(n, len(pool))
    rng = np.random.default_rng([PROMPT_SEED, TASKS.index(task), SPLITS.index(split)])
    extra = np.sort(rng.choice(len(pool), size=rest, replace=False))
    return tuple(pool) * copies + tuple(pool[i] for i in extra)


def prompt_set(split: str, task: str | None = None) -> tuple[Prompt, ...]:
    """The fixed evaluation prompts of a split (all its tasks in TASKS order, or one task): 48 per task
    for "seen", 24 per held-out task for "held_out"."""
    split = normalize_split(split)
    tasks = TASKS if split == "seen" else HELD_OUT_TASKS
    if task is not None:
        if task not in tasks:
            raise ConfigError(f"the {split} split has no task {task!r}; it has {', '.join(tasks)}")
        tasks = (task,)
    return tuple(p for t in tasks for p in _task_prompts(t, split))


# ------------------------------------------------------------------------------------------- clause rules
@dataclass(frozen=True)
class Clause:
    """One clause of a prompt and whether the detected objects satisfy it."""

    text: str
    holds: bool


def _of(dets: Sequence[Detection], shape: str, color: str | None = None) -> list[Detection]:
    return [d for d in dets if d.shape == shape and (color is None or d.color == color)]


def clauses(prompt: Prompt, detections: Sequence[Detection]) -> list[Clause]:
    """The prompt's clauses evaluated on detected objects (spec "Scoring" 4)."""
    p, d = prompt, detections
    if p.task == "single_object":  # at least one object of the shape
        return [Clause(f"a {p.shape1}", bool(_of(d, p.shape1)))]
    if p.task == "two_object":  # at least one of each shape
        return [Clause(f"a {p.shape1}", bool(_of(d, p.shape1))),
                Clause(f"a {p.shape2}", bool(_of(d, p.shape2)))]
    if p.task == "counting":  # exactly n objects of the shape
        n = len(_of(d, p.shape1))
        return [Clause(f"exactly {p.count} {p.shape1} (found {n})", n == p.count)]
    if p.task == "colors":  # at least one object of the shape with the colour
        return [Clause(f"a {p.color1} {p.shape1}", bool(_of(d, p.shape1, p.color1)))]
    if p.task == "color_attr":  # an object of shape1 with color1 and one of shape2 with color2
        return [Clause(f"a {p.color1} {p.shape1}", bool(_of(d, p.shape1, p.color1))),
                Clause(f"a {p.color2} {p.shape2}", bool(_of(d, p.shape2, p.color2)))]
    if p.task == "position":  # some object of shape1 and some of shape2 satisfy the relation
        holds = any(relation_holds(p.relation, (a.cx, a.cy), a.side, (b.cx, b.cy), b.side)
                    for a in _of(d, p.shape1) for b in _of(d, p.shape2))
        return [Clause(f"a {p.shape1} {p.relation} a {p.shape2}", holds)]
    raise ConfigError(f"unknown shapes task {p.task!r}")  # unreachable: Prompt validates its task


@dataclass(frozen=True)
class ImageScore:
    """correct: every clause holds; truthy exactly when correct."""

    prompt: Prompt
    clauses: tuple[Clause, ...]
    detections: tuple[Detection, ...] = field(repr=False)

    @property
    def correct(self) -> bool:
        return all(c.holds for c in self.clauses)

    def __bool__(self) -> bool:
        return self.correct


def score_detections(prompt: Prompt | str, detections: Sequence[Detection]) -> ImageScore:
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return ImageScore(p, tuple(clauses(p, detections)), tuple(detections))


def score_image(prompt: Prompt | str, image) -> ImageScore:
    """Detect the objects of an image (uint8 [S, S, 3] array or PIL image) and score the prompt on them."""
    return score_detections(prompt, detect(image))


# ------------------------------------------------------------------------------------------- failures
# Ours, not the spec's (which scores right / wrong only): why a failed image failed, one kind per image, so a
# report shows whether a model misses objects, fuses two objects into one shape, miscounts or mixes colours.
NOTHING = "nothing detected"  # no component of a palette colour >= 1% of the canvas (faint, tiny or absent)
# A named shape that is absent is rarely absent from the picture: with the 2026-11-29 default, 90 of 93 failed
# two_object images have two or more objects, one of them of another shape or a second copy of the present
# shape (docs/eval.md, "Failure kinds"). The kinds tell those apart from a shape truly left out.
TWO_SHAPES = ("both shapes missing", "one shape missing", "one shape on both", "one drawn as another shape")
FAILURES = {
    "single_object": (NOTHING, "wrong shape"),
    "two_object": (NOTHING, *TWO_SHAPES),
    "counting": (NOTHING, "too few", "some drawn as another shape", "too many"),
    "colors": (NOTHING, "shape missing", "wrong colour"),
    "position": (NOTHING, *TWO_SHAPES, "wrong relation"),
    "color_attr": (NOTHING, *TWO_SHAPES, "colours swapped", "one colour on both", "wrong colour"),
}


def _one_shape_absent(p: Prompt, d: Sequence[Detection]) -> str:
    """Why one of a two-shape prompt's shapes is absent: an object of a shape the prompt does not name stands
    in for it, or every object is the other named shape (two or more copies), or there is one object only."""
    if any(x.shape not in (p.shape1, p.shape2) for x in d):
        return "one drawn as another shape"
    return "one shape on both" if len(d) >= 2 else "one shape missing"


def failure(score: ImageScore) -> str | None:
    """Why `score`'s image failed, one of FAILURES[task] (None when it is correct). Checked in order: nothing
    detected; a named shape absent (both of two; one of two: drawn as a shape the prompt does not name, the
    other named shape on both objects, or left out); then the task's own rule: too few objects of the
    counted shape (fewer objects in all than asked: "too few"; enough objects, some of another shape: "some
    drawn as another shape") or too many, the relation not holding for any pair, or the colours: "colours
    swapped" when an object of each named shape carries the other's colour, "one colour on both" when an
    object of each shape carries the same one of the two named colours (attribute leakage), else "wrong
    colour"."""
    if score.correct:
        return None
    p, d = score.prompt, score.detections
    if not d:
        return NOTHING
    if p.task == "single_object":
        return "wrong shape"
    if p.task == "counting":
        if len(_of(d, p.shape1)) >= p.count:
            return "too many"
        return "too few" if len(d) < p.count else "some drawn as another shape"
    if p.task == "colors":
        return "wrong colour" if _of(d, p.shape1) else "shape missing"
    missing = [s for s in (p.shape1, p.shape2) if not _of(d, s)]
    if len(missing) == 2:
        return "both shapes missing"
    if missing:
        return _one_shape_absent(p, d)
    if p.task == "position":
        return "wrong relation"
    if p.task == "color_attr":
        if _of(d, p.shape1, p.color2) and _of(d, p.shape2, p.color1):
            return "colours swapped"
        if any(_of(d, p.shape1, c) and _of(d, p.shape2, c) for c in (p.color1, p.color2)):
            return "one colour on both"
        return "wrong colour"
    raise ConfigError(f"two_object image with both shapes scored wrong: {p.text!r}")  # unreachable


def summarize_failures(results: Iterable[tuple[str, str | None]]) -> dict[str, dict[str, int]]:
    """{task: {kind: count}} over (task, failure kind or None) pairs; kinds in FAILURES order, zeros left
    out (a task whose images were all correct maps to {})."""
    counts: dict[str, dict[str, int]] = {}
    for task, kind in results:
        if kind is None:
            counts.setdefault(task, {})
            continue
        if kind not in FAILURES.get(task, ()):
            raise ConfigError(f"{kind!r} is not a failure kind of task {task!r}")
        c = counts.setdefault(task, {})
        c[kind] = c.get(kind, 0) + 1
    return {t: {k: counts[t][k] for k in FAILURES[t] if k in counts[t]} for t in TASKS if t in counts}


def commonest_failure(failures: Mapping[str, Mapping[str, int]]) -> tuple[str, int] | None:
    """The failure kind with the most images over all tasks of a summarize_failures() output, and its count
    (kinds of the same name in different tasks add up; ties go to the first seen); None if nothing failed."""
    kinds: dict[str, int] = {}
    for per_kind in failures.values():
        for kind, c in per_kind.items():
            kinds[kind] = kinds.get(kind, 0) + c
    return max(kinds.items(), key=lambda kc: kc[1]) if kinds else None


def format_failures(by_label: Mapping[str, Mapping[str, Mapping[str, int]]]) -> str:
    """A markdown table of failure counts: a row per (task, kind) that occurs, a column per label (e.g. the
    step counts), from summarize_failures() outputs keyed by label."""
    labels = list(by_label)
    rows = [(t, k) for t in TASKS for k in FAILURES[t]
            if any(by_label[lab].get(t, {}).get(k) for lab in labels)]
    lines = ["| task | failure | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for t, k in rows:
        lines.append(f"| {t} | {k} | " + " | ".join(str(by_label[lab].get(t, {}).get(k, 0)) for lab in labels)
                     + " |")
    return "\n".join(lines)


def shapes_found(results: Iterable[tuple[Prompt, Iterable[str]]]) -> dict[str, float]:
    """{shape: the fraction of images whose prompt names the shape in which an object of it was detected},
    from (prompt, detected shape names) pairs, in SHAPES order (shapes no prompt names left out). It tells
    which shapes a model cannot draw, whichever task asked for them (docs/eval.md, "Failure kinds")."""
    asked: dict[str, list[int]] = {}
    for p, found in results:
        found = set(found)
        for shape in {p.shape1, p.shape2} - {None}:
            c = asked.setdefault(shape, [0, 0])
            c[0] += shape in found
            c[1] += 1
    return {s: asked[s][0] / asked[s][1] for s in SHAPES if s in asked}


def format_shapes_found(by_label: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of shapes_found() outputs keyed by label (e.g. the step counts): a row per label."""
    shapes = [s for s in SHAPES if any(s in f for f in by_label.values())]
    lines = ["| | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for label, found in by_label.items():
        lines.append(f"| {label} | " + " | ".join(f"{found[s]:.3f}" if s in found else "-" for s in shapes)
                     + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- accuracies
def summarize(results: Iterable[tuple[str, bool]]) -> dict:
    """{"per_task": {task: {"accuracy", "correct", "n"}}, "overall", "n_images"} from (task, correct) pairs;
    overall = unweighted mean of the present tasks' accuracies (spec "Scoring" 5, GenEval)."""
    counts: dict[str, list[int]] = {}
    for task, ok in results:
        if task not in TASKS:
            raise ConfigError(f"unknown shapes task {task!r}; use one of {', '.join(TASKS)}")
        c = counts.setdefault(task, [0, 0])
        c[0] += bool(ok)
        c[1] += 1
    per_task = {t: {"accuracy": counts[t][0] / counts[t][1], "correct": counts[t][0], "n": counts[t][1]}
                for t in TASKS if t in counts}
    overall = float(np.mean([v["accuracy"] for v in per_task.values()])) if per_task else float("nan")
    return {"per_task": per_task, "overall": overall, "n_images": sum(v["n"] for v in per_task.values())}


def format_table(summaries: Mapping[str, dict]) -> str:
    """A markdown table: one row per summary (label -> summarize() output), a column per task + overall."""
    tasks = [t for t in TASKS if any(t in s["per_task"] for s in summaries.values())]
    head = ["", *tasks, "overall", "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in summaries.items():
        cells = [f"{s['per_task'][t]['accuracy']:.3f}" if t in s["per_task"] else "-" for t in tasks]
        row = [str(label), *cells, f"{s['overall']:.3f}", str(s["n_images"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

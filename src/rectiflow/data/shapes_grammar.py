"""The shapes world's vocabulary and caption grammar: colours, shapes, the six templates, held-out
combinations, prompt parsing and the position rule (GenEval's).

Normative spec: docs/shapes-world.md ("Colours", "Shapes", "Captions", "Held-out
combinations"). Scenes, rendering and datasets are in rectiflow.data.shapes, which re-exports all of this.
`parse_prompt` accepts either article ("a"/"an"), any case, extra spaces and a final period; `.text` is the
canonical form with correct articles.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from rectiflow.errors import ConfigError, RectiflowError

# spec "Colours": fill RGB values.
COLORS: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 210, 20),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (240, 110, 190),
    "black": (20, 20, 20),
})
# spec "Shapes": name -> plural.
SHAPES: Mapping[str, str] = MappingProxyType({
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "star": "stars", "cross": "crosses",
})
# spec "Captions": the six tasks (GenEval's names) and their vocabularies.
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS: Mapping[int, str] = MappingProxyType({2: "two", 3: "three", 4: "four"})
# spec "Held-out combinations": (colour, shape) pairs, and spatial configurations in both phrasings.
HELD_OUT_COLOR_SHAPES = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("green", "star"),
    ("yellow", "square"), ("purple", "cross"), ("pink", "diamond"),
})
HELD_OUT_POSITIONS = frozenset({
    ("circle", "above", "square"), ("square", "below", "circle"),
    ("triangle", "left of", "star"), ("star", "right of", "triangle"),
})
POSITION_M = 0.1  # spec (GenEval): m = 0.1 (s1 + s2)


def article(word: str) -> str:
    """English indefinite article for the word that follows it ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A structured template prompt. Fields unused by a task stay None."""

    task: str
    shape1: str
    shape2: str | None = None
    color1: str | None = None
    color2: str | None = None
    count: int | None = None
    relation: str | None = None

    def __post_init__(self):
        need = {
            "single_object": {"shape1"}, "colors": {"shape1", "color1"}, "two_object": {"shape1", "shape2"},
            "counting": {"shape1", "count"}, "position": {"shape1", "shape2", "relation"},
            "color_attr": {"shape1", "shape2", "color1", "color2"},
        }
        if self.task not in need:
            raise ConfigError(f"unknown shapes task {self.task!r}; use one of {', '.join(TASKS)}")
        fields = ("shape1", "shape2", "color1", "color2", "count", "relation")
        given = {f for f in fields if getattr(self, f) is not None}
        if given != need[self.task]:
            raise ConfigError(
                f"a {self.task} prompt takes exactly {sorted(need[self.task])}, got {sorted(given)}")
        for f in ("shape1", "shape2"):
            if getattr(self, f) not in (None, *SHAPES):
                raise ConfigError(f"unknown shape {getattr(self, f)!r}; use one of {', '.join(SHAPES)}")
        for f in ("color1", "color2"):
            if getattr(self, f) not in (None, *COLORS):
                raise ConfigError(f"unknown colour {getattr(self, f)!r}; use one of {', '.join(COLORS)}")
        if self.count is not None and self.count not in COUNT_WORDS:
            raise ConfigError(f"count must be 2, 3 or 4 (got {self.count!r})")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ConfigError(f"unknown relation {self.relation!r}; use one of {', '.join(RELATIONS)}")
        if self.shape2 is not None and self.shape2 == self.shape1:
            raise ConfigError(f"a {self.task} prompt needs two different shapes (got {self.shape1} twice)")
        if self.color2 is not None and self.color2 == self.color1:
            raise ConfigError(f"a color_attr prompt needs two different colours (got {self.color1} twice)")

    @property
    def text(self) -> str:
        s1, s2, c1, c2 = self.shape1, self.shape2, self.color1, self.color2
        body = {
            "single_object": lambda: f"{article(s1)} {s1}",
            "colors": lambda: f"{article(c1)} {c1} {s1}",
            "two_object": lambda: f"{article(s1)} {s1} and {article(s2)} {s2}",
            "counting": lambda: f"{COUNT_WORDS[self.count]} {SHAPES[s1]}",
            "position": lambda: f"{article(s1)} {s1} {self.relation} {article(s2)} {s2}",
            "color_attr": lambda: f"{article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}",
        }[self.task]()
        return f"a photo of {body}"

    @property
    def held_out(self) -> bool:
        """Does the prompt's clause use a held-out combination?"""
        pairs = {(self.color1, self.shape1), (self.color2, self.shape2)}
        if self.task in ("colors", "color_attr"):
            return bool(pairs & HELD_OUT_COLOR_SHAPES)
        if self.task == "position":
            return (self.shape1, self.relation, self.shape2) in HELD_OUT_POSITIONS
        return False

    def __str__(self) -> str:
        return self.text


_PLURALS = {p: s for s, p in SHAPES.items()}
_WORDS = {w: n for n, w in COUNT_WORDS.items()}
_A = r"an?"
_RULES = (  # (task, pattern over the text after "a photo of ")
    ("counting", re.compile(r"(\w+) (\w+)")),
    ("position", re.compile(rf"{_A} (\w+) (left of|right of|above|below) {_A} (\w+)")),
    ("color_attr", re.compile(rf"{_A} (\w+) (\w+) and {_A} (\w+) (\w+)")),
    ("two_object", re.compile(rf"{_A} (\w+) and {_A} (\w+)")),
    ("colors", re.compile(rf"{_A} (\w+) (\w+)")),
    ("single_object", re.compile(rf"{_A} (\w+)")),
)


def parse_prompt(text: str) -> Prompt:
    """Parse any of the six template captions into a Prompt (raises RectiflowError otherwise)."""
    norm = " ".join(str(text).lower().strip().rstrip(".").split())
    hint = "use one of the six templates, e.g. 'a photo of an orange circle' or 'a photo of two stars'"
    if not norm.startswith("a photo of "):
        raise RectiflowError(f"not a shapes-world prompt: {text!r}; {hint}")
    rest = norm[len("a photo of "):]
    for task, pattern in _RULES:
        m = pattern.fullmatch(rest)
        if m is None or (task == "counting" and m.group(1) not in _WORDS):
            continue
        kw = _fields(task, m.groups())
        try:
            return Prompt(task, **kw)
        except ConfigError as e:
            raise RectiflowError(f"bad shapes-world prompt {text!r}: {e}") from None
    raise RectiflowError(f"not a shapes-world prompt: {text!r}; {hint}")


def _fields(task: str, g: tuple[str, ...]) -> dict:
    """Prompt fields from a template's regex groups."""
    if task == "counting":
        return dict(shape1=_PLURALS.get(g[1], g[1]), count=_WORDS[g[0]])
    if task == "position":
        return dict(shape1=g[0], relation=g[1], shape2=g[2])
    if task == "color_attr":
        return dict(color1=g[0], shape1=g[1], color2=g[2], shape2=g[3])
    if task == "two_object":
        return dict(shape1=g[0], shape2=g[1])
    if task == "colors":
        return dict(color1=g[0], shape1=g[1])
    return dict(shape1=g[0])


@functools.cache
def _all_prompts(task: str) -> tuple[Prompt, ...]:
    S, C = tuple(SHAPES), tuple(COLORS)
    pairs = [(a, b) for a in S for b in S if a != b]
    if task == "single_object":
        return tuple(Prompt(task, s) for s in S)
    if task == "colors":
        return tuple(Prompt(task, s, color1=c) for c in C for s in S)
    if task == "two_object":
        return tuple(Prompt(task, a, b) for a, b in pairs)
    if task == "counting":
        return tuple(Prompt(task, s, count=n) for n in COUNT_WORDS for s in S)
    if task == "position":
        return tuple(Prompt(task, a, b, relation=r) for a, b in pairs for r in RELATIONS)
    if task == "color_attr":
        return tuple(Prompt(task, a, b, color1=c1, color2=c2)
                     for a, b in pairs for c1 in C for c2 in C if c1 != c2)
    raise ConfigError(f"unknown shapes task {task!r}; use one of {', '.join(TASKS)}")


def prompts_for(task: str, split: str = "all") -> tuple[Prompt, ...]:
    """Every template prompt of a task in canonical order: split "all", "seen" (no held-out combination)
    or "held_out" (the clause uses one; empty for tasks without colour or position clauses)."""
    if split not in ("all", "seen", "held_out"):
        raise ConfigError(f"unknown split {split!r}; use 'seen', 'held_out' or 'all'")
    prompts = _all_prompts(task)
    if split == "all":
        return prompts
    return tuple(p for p in prompts if p.held_out == (split == "held_out"))


def sample_prompt(task: str, rng: np.random.Generator, *, train: bool = True,
                  shape_weights: Mapping[str, float] | None = None) -> Prompt:
    """A drawn prompt of the task (free of held-out combinations when train=True): uniform, or with
    shape_weights each prompt in proportion to the product of its shapes' weights (shapes not named: 1)."""
    prompts = prompts_for(task, "seen" if train else "all")
    if shape_weights is None:  # the uniform draw keeps its own rng call, so existing datasets are unchanged
        return prompts[int(rng.integers(len(prompts)))]
    p = _prompt_probs(task, train, tuple(sorted(shape_weights.items())))
    return prompts[int(rng.choice(len(prompts), p=p))]


@functools.lru_cache(maxsize=64)
def _prompt_probs(task: str, train: bool, shape_weights: tuple[tuple[str, float], ...]) -> np.ndarray:
    """sample_prompt's probabilities (cached: a dataset draws from the same few tables 100,000 times)."""
    weights = dict(shape_weights)
    w = np.array([float(np.prod([weights.get(s, 1.0) for s in (p.shape1, p.shape2) if s]))
                  for p in prompts_for(task, "seen" if train else "all")])
    if not w.sum() > 0:
        raise ConfigError(f"shape_weights {weights} leave no {task} prompt to draw")
    return w / w.sum()


def check_weights(weights: Mapping[str, float], names, what: str, missing: float) -> dict[str, float]:
    """Every name with its weight (names not given: `missing`), or one clear error: an unknown name, a weight
    not finite or < 0, all zero. `what` names the mapping in the message ("task" -> task_weights)."""
    unknown = set(weights) - set(names)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {sorted(unknown)} in {what}_weights; use {', '.join(names)}")
    out = {n: float(weights.get(n, missing)) for n in names}
    if not all(np.isfinite(v) and v >= 0 for v in out.values()) or not any(out.values()):
        raise ConfigError(f"{what}_weights must be finite, >= 0 and not all zero (got {dict(weights)})")
    return out


def check_shape_weights(weights: Mapping[str, float] | None) -> dict[str, float] | None:
    """shape_weights with every shape (unnamed shapes: 1), or None; bad weights: see check_weights."""
    return None if weights is None else check_weights(weights, tuple(SHAPES), "shape", missing=1.0)


# ---------------------------------------------------------------------------------------- the position rule
def relation_score(relation: str, dx: float, dy: float) -> tuple[float, float]:
    """(along, across): d = c1 - c2 projected on the relation's direction, and |d| on the other axis."""
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    across = abs(dy) if relation in ("left of", "right of") else abs(dx)
    return along, across


def relation_holds(relation: str, c1: tuple[float, float], s1: float,
                   c2: tuple[float, float], s2: float) -> bool:
    """GenEval's rule: "A rel B" holds when d = c1 - c2 exceeds m = 0.1 (s1 + s2) along the relation's
    direction and that axis dominates (|d_along| >= |d_other|; ties hold both ways)."""
    along, across = relation_score(relation, c1[0] - c2[0], c1[1] - c2[1])
    return along > POSITION_M * (s1 + s2) and along >= across

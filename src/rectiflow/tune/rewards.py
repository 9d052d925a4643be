"""Rewards for `rectiflow tune grpo`, each with the prompt pool it is defined on.

"shapes": the shapes-world benchmark's scorer (rectiflow.eval.shapes: the spec's detector and clause rules)
as a reward, the GenEval reward of Flow-GRPO in kind. Reward = the fraction of the prompt's clauses that hold
(1 exactly when the image is correct; a two-object image with one of its shapes scores 0.5), a denser signal
than right / wrong. The pool is the prompts of the seen split only, grouped by task: held-out combinations
are never sampled, so the held-out half of the benchmark still measures what the model generalises to."""

from __future__ import annotations

import numpy as np

from rectiflow.errors import ConfigError
from rectiflow.eval.shapes import score_image
from rectiflow.tune.grpo import Reward
from rectiflow.tune.prompts import PromptPool, shapes_pool

__all__ = ["REWARDS", "reward_and_pool", "shapes_reward"]


def shapes_reward(prompts: list[str], images: list) -> list[float]:
    out = []
    for p, im in zip(prompts, images, strict=True):
        s = score_image(p, np.asarray(im.convert("RGB")))
        out.append(sum(c.holds for c in s.clauses) / len(s.clauses))
    return out


REWARDS = {"shapes": (shapes_reward, shapes_pool)}


def reward_and_pool(name: str) -> tuple[Reward, PromptPool]:
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    reward, pool = REWARDS[name]
    return reward, pool()

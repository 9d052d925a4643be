"""Prompt pools for the tuning methods that sample their own training images (rectiflow.tune.grpo, .dmd):
the prompts a run draws from, in named groups, and the named pools the command line offers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rectiflow.data.captions import read_prompt_file
from rectiflow.data.shapes import TASKS, prompts_for
from rectiflow.errors import ConfigError

__all__ = ["POOLS", "PromptEmbeddings", "PromptPool", "prompt_pool", "shapes_pool"]


class PromptPool:
    """Prompts in named groups (e.g. the benchmark's tasks): a draw picks a group uniformly, then a prompt of
    it uniformly, so a large group (390 colour-attribution prompts) does not crowd out a small one."""

    def __init__(self, groups: Mapping[str, Sequence[str]]):
        self.groups = {str(k): [str(p) for p in v] for k, v in groups.items() if len(v)}
        if not self.groups:
            raise ConfigError("the prompt pool is empty; give at least one prompt")
        self.names = sorted(self.groups)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PromptPool:
        return cls({"prompts": read_prompt_file(path)})

    def draw(self, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """n (group, prompt) pairs."""
        out = []
        for _ in range(n):
            g = self.names[int(rng.integers(len(self.names)))]
            out.append((g, self.groups[g][int(rng.integers(len(self.groups[g])))]))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.groups, sort_keys=True).encode()).hexdigest()[:16]


def shapes_pool() -> PromptPool:
    """The shapes benchmark's seen prompts, grouped by task: held-out combinations are never drawn, so the
    held-out half of the benchmark still measures what a tuned model generalises to."""
    return PromptPool({t: [p.text for p in prompts_for(t, "seen")] for t in TASKS})


POOLS = {"shapes": shapes_pool}


def prompt_pool(spec: str) -> PromptPool:
    """A named pool (POOLS) or a prompt file (one prompt per line)."""
    if spec in POOLS:
        return POOLS[spec]()
    if not Path(spec).is_file():
        raise ConfigError(f"--prompts {spec!r} is neither a prompt file nor a named pool "
                          f"({', '.join(POOLS)})")
    return PromptPool.from_file(spec)


class PromptEmbeddings:
    """A pipeline's text embeddings of prompts, each encoded once per run."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt [B, L, D], vec [B, Dv]) for the prompts in order."""
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            txt, vec = self.pipe.encode_prompts(new)
            for i, p in enumerate(new):  # clone: inference tensors cannot be saved for backward
                self._cache[p] = (txt[i].clone(), vec[i].clone())
        return (torch.stack([self._cache[p][0] for p in prompts]),
                torch.stack([self._cache[p][1] for p in prompts]))

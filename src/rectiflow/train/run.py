"""`run_training(cfg)`: everything `rectiflow train` does, in one call.

Kept apart from trainer.py so that the Trainer never imports the distributed set-up that is built on it:
the import graph stays acyclic (the import-linter contract in pyproject.toml checks it).
"""

from __future__ import annotations

from pathlib import Path

from rectiflow.errors import RectiflowError
from rectiflow.train import checkpoint as ckpt
from rectiflow.train.config import RunConfig
from rectiflow.train.distributed import trainer_kwargs
from rectiflow.train.trainer import Trainer

__all__ = ["run_training"]


def run_training(cfg: RunConfig, resume: str | Path | None = None, allow_existing: bool = False) -> dict:
    """Everything `rectiflow train` does: set up (distributed when cfg.distributed.mode != "none", via
    rectiflow.train.distributed.trainer_kwargs(cfg) -> {"dist", "parallelize", "state_io"}), resume
    ("latest" = the newest complete checkpoint of out_dir, or a checkpoint path), train, export."""
    trainer = Trainer(cfg, **(trainer_kwargs(cfg) if cfg.distributed.mode != "none" else {}))
    if resume:
        trainer.resume(None if resume == "latest" else resume)
    elif ckpt.find_latest(trainer.ckpt_dir) is not None and not allow_existing:
        raise RectiflowError(f"{trainer.ckpt_dir} already has checkpoints; pass --resume to continue that "
                             "run or set train.out_dir to a new directory")
    return trainer.fit()

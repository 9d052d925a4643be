"""`rectiflow train CONFIG.toml [section.key=value ...] [--resume [CHECKPOINT]]`: train a transformer."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a FLUX-style transformer on a latent cache",
        description="Train a FLUX-style rectified-flow transformer on a latent cache (`rectiflow cache`). "
        "CONFIG is a TOML file (see configs/); overrides like optim.lr=1e-4 train.steps=100 follow it. "
        "Ctrl-C finishes the current step, writes a checkpoint and exits; --resume continues.",
    )
    p.add_argument("config", help="run config TOML (or the config.toml / config.json beside a checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint of train.out_dir, or from CHECKPOINT, "
                        "with the run's saved config: only the overrides given now change it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (TOML) and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from rectiflow.train.config import dump_toml, load_config
    from rectiflow.train.resume import resume_config
    from rectiflow.train.run import run_training

    resume = None
    if args.resume:
        cfg, resume = resume_config(args.config, args.overrides, args.resume)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_toml(cfg), end="")
        return 0
    result = run_training(cfg, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports
        return 130 if result["interrupted"] else 0
    where = result["checkpoint"]
    if result["interrupted"]:
        print(f"interrupted at step {result['step']}; checkpoint {where}; continue with --resume")
        return 130
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    print(f"trained {result['step']} steps (last loss {loss}); checkpoint {where}; "
          f"exports: {', '.join(str(p) for p in result['exports']) or 'none'}")
    return 0

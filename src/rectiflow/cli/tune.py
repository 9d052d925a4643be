"""`rectiflow tune grpo --model M --reward shapes --out DIR`: reward fine-tuning with Flow-GRPO
(rectiflow.tune.grpo); rerunning the same command resumes. The tuned bundle is DIR/bundle."""

from __future__ import annotations

import argparse

from rectiflow.cli.generate import parse_shift


def register(sub) -> None:
    p = sub.add_parser("tune", help="fine-tune a model against a reward on its own samples (Flow-GRPO)")
    cmd = p.add_subparsers(dest="tune_command", metavar="COMMAND", required=True)
    s = cmd.add_parser("grpo", help="Flow-GRPO: sample groups per prompt, score, reinforce the better ones",
                       description="Sample groups of images per prompt with the model's own sampler "
                                   "(its first steps made stochastic), score them with --reward, and train "
                                   "toward the better images of each group (Liu et al. 2025, Flow-GRPO). "
                                   "Rerunning the same command resumes from OUT/state.pt; the result is "
                                   "OUT/bundle.")
    s.add_argument("--model", default=None, help="bundle directory (default: the bundled model)")
    s.add_argument("--reward", default="shapes", help="shapes: the shapes-world scorer on its seen prompts")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--objective", default="grpo", choices=("grpo", "awm"),
                   help="grpo: the clipped surrogate on stochastic steps (default); awm: advantage-weighted "
                        "flow matching on the ODE's own samples")
    s.add_argument("--iterations", type=int, default=100, help="rollout + update rounds (100)")
    s.add_argument("--prompts", type=int, default=8, help="prompts per round (8)")
    s.add_argument("--group-size", type=int, default=8, help="images per prompt (8)")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    s.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="step grid shift: none, flux or an SD3 alpha (default: the model's)")
    s.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's)")
    s.add_argument("--sde-steps", type=int, default=None,
                   help="how many of the first steps are stochastic (default: all but the last)")
    s.add_argument("--step", default="cps", choices=("cps", "sde"),
                   help="the stochastic step: cps (coefficients-preserving, default) or sde (Flow-GRPO's)")
    s.add_argument("--eta", type=float, default=None,
                   help="the step's noise level (Flow-GRPO's: 0.8 for cps, 0.7 for sde)")
    s.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (1e-5)")
    s.add_argument("--kl", type=float, default=0.04, help="KL weight to the starting model (0.04)")
    s.add_argument("--anchor", type=float, default=1.0,
                   help="weight of the velocity's squared distance to the starting model at every rollout "
                        "state, deterministic steps included (1)")
    s.add_argument("--clip-range", type=float, default=None, help="PPO clip range (Flow-GRPO's 1e-4)")
    s.add_argument("--minibatch", type=int, default=16, help="images per optimizer step (16)")
    s.add_argument("--checkpoint-every", type=int, default=10, help="rounds between saved states (10)")
    s.add_argument("--seed", type=int, default=0, help="seed of prompts and noise (0)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_grpo)


def run_grpo(args) -> int:
    from rectiflow.cli.reflow import load_teacher
    from rectiflow.tune.grpo import GRPOOptions, grpo
    from rectiflow.tune.rewards import reward_and_pool

    given = {"eta": args.eta, "clip_range": args.clip_range}  # unset: the library's (Flow-GRPO's) values
    options = GRPOOptions(objective=args.objective, iterations=args.iterations, prompts=args.prompts,
                          group_size=args.group_size,
                          steps=args.steps, shift=getattr(args, "shift", "default"), cfg_scale=args.cfg,
                          sde_steps=args.sde_steps, step=args.step, lr=args.lr, kl_weight=args.kl,
                          anchor=args.anchor, minibatch=args.minibatch,
                          checkpoint_every=args.checkpoint_every, seed=args.seed,
                          **{k: v for k, v in given.items() if v is not None})
    reward, pool = reward_and_pool(args.reward)
    pipe = load_teacher(args.model, "cpu", with_text_encoder=True)
    s = grpo(pipe, pool, reward, args.out, options, progress=not args.no_progress,
             card_extra={"reward": args.reward})
    print(f"{s['iterations']} rounds, {s['images']} images: mean reward {s['first_reward']:.3f} in the first "
          f"round, {s['last_reward']:.3f} in the last; bundle {args.out}/bundle")
    return 0

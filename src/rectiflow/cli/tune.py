"""`rectiflow tune grpo --model M --reward shapes --out DIR`: reward fine-tuning with Flow-GRPO
(rectiflow.tune.grpo); `rectiflow tune dmd --model M --teacher T --out DIR`: distribution matching
distillation into a few-step generator (rectiflow.tune.dmd). Rerunning the same command resumes; the tuned
bundle is DIR/bundle."""

from __future__ import annotations

import argparse

from rectiflow.cli.generate import parse_shift


def register(sub) -> None:
    p = sub.add_parser("tune", help="fine-tune a model on its own samples (Flow-GRPO, AWM, DMD)")
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
    _register_dmd(cmd)


def _register_dmd(cmd) -> None:
    s = cmd.add_parser("dmd", help="distribution matching distillation: a few-step generator of a teacher",
                       description="Train the model into a generator whose --steps-step samples match the "
                                   "teacher's CFG-guided distribution (Yin et al. 2024, DMD / DMD2): a fake "
                                   "model learns the generator's distribution online and the generator "
                                   "follows the difference of the two models' denoised estimates. Rerunning "
                                   "the same command resumes from OUT/state.pt; the result is OUT/bundle.")
    s.add_argument("--model", default=None, help="bundle to tune (default: the bundled model)")
    s.add_argument("--teacher", required=True, help="teacher bundle (same autoencoder)")
    s.add_argument("--prompts", default="shapes",
                   help="prompt file (one per line) or shapes: the shapes benchmark's seen prompts (default)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--iterations", type=int, default=1000, help="generator updates (1000)")
    s.add_argument("--batch", type=int, default=32, help="samples per update (32)")
    s.add_argument("--steps", type=int, default=None, help="the generator's steps (default: the model's)")
    s.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="the generator's grid shift: none, flux or an SD3 alpha (default: the model's)")
    s.add_argument("--teacher-cfg", type=float, default=3.0, help="the teacher's CFG scale (3)")
    s.add_argument("--lr", type=float, default=5e-5, help="the generator's AdamW learning rate (5e-5)")
    s.add_argument("--fake-lr", type=float, default=1e-4, help="the fake model's learning rate (1e-4)")
    s.add_argument("--fake-updates", type=int, default=5,
                   help="fake-model updates per generator update (DMD2's 5)")
    s.add_argument("--couplings", default=None,
                   help="couplings of the teacher (`rectiflow reflow pairs`) for the regression loss")
    s.add_argument("--regression", type=float, default=0.0,
                   help="weight of DMD's regression of the first step onto the couplings' endpoints (0: off)")
    s.add_argument("--real", default=None,
                   help="a `rectiflow cache` of real images (the teacher's encoders) for DMD2's GAN term")
    s.add_argument("--gan", type=float, default=0.0,
                   help="weight of the generator's GAN loss (0: off; DMD2's SDXL run: 5e-3)")
    s.add_argument("--gan-classifier", type=float, default=1e-2,
                   help="weight of the classifier's GAN loss in the fake model's update (DMD2: 1e-2)")
    s.add_argument("--classifier-lr", type=float, default=None,
                   help="the GAN classifier's learning rate (default: --fake-lr)")
    s.add_argument("--gan-t-max", type=float, default=None,
                   help="the GAN term's highest noise level, a flow time (default 0.98, DMD's own range)")
    s.add_argument("--checkpoint-every", type=int, default=50, help="iterations between saved states (50)")
    s.add_argument("--seed", type=int, default=0, help="seed of prompts and noise (0)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for all three networks (cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_dmd)


def run_dmd(args) -> int:
    from rectiflow.cli.generate import device_and_dtype
    from rectiflow.cli.reflow import load_teacher
    from rectiflow.tune.dmd import DMDOptions, dmd
    from rectiflow.tune.prompts import prompt_pool

    options = DMDOptions(iterations=args.iterations, batch=args.batch, steps=args.steps,
                         shift=getattr(args, "shift", "default"), teacher_cfg=args.teacher_cfg, lr=args.lr,
                         fake_lr=args.fake_lr, fake_updates=args.fake_updates, regression=args.regression,
                         gan=args.gan, gan_classifier=args.gan_classifier,
                         classifier_lr=args.classifier_lr, gan_t_max=args.gan_t_max,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)
    couplings = None
    if args.couplings is not None:
        from rectiflow.data.couplings import CouplingsDataset

        couplings = CouplingsDataset(args.couplings)
    pool = prompt_pool(args.prompts)
    device, _ = device_and_dtype(args.device, "fp32")  # trained in float32 on either device
    pipe = load_teacher(args.model, device, with_text_encoder=True)
    teacher = load_teacher(args.teacher, device, with_text_encoder=True)
    s = dmd(pipe, teacher, pool, args.out, options, couplings=couplings, real=args.real,
            progress=not args.no_progress, card_extra={"prompts": args.prompts})
    print(f"{s['iterations']} generator updates, {s['samples']} samples: mean gap between the teacher's and "
          f"the generator's denoised estimates {s['first_gap']:.4f} first, {s['last_gap']:.4f} last; bundle "
          f"{args.out}/bundle")
    return 0


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

"""`rectiflow reflow pairs --model M --prompts FILE|--from-cache CACHE --n N --steps S [--sampler
euler|heun|midpoint|rk4|dopri5] [--cfg G] --out DIR`: couplings of a teacher's ODE for reflow training
(rectiflow.sample.couplings; train on them with `rectiflow train CONFIG data.couplings=DIR`)."""

from __future__ import annotations

import argparse

from rectiflow.cli.generate import parse_shift


def _integer(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return v


def register(sub) -> None:
    p = sub.add_parser("reflow", help="reflow (k-rectified flow): couplings of a teacher's ODE")
    cmd = p.add_subparsers(dest="reflow_command", metavar="COMMAND", required=True)
    s = cmd.add_parser("pairs", help="draw (noise, endpoint) pairs from a teacher's ODE",
                       description="Solve the teacher's ODE from seeded noise (t = 1 -> 0) for a prompt per "
                                   "sample; write sharded safetensors + manifest.json. Rerunning the same "
                                   "command resumes; a larger --n extends.")
    s.add_argument("--model", default=None, help="teacher bundle directory (default: the bundled model)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line (embedded by the model's encoder)")
    src.add_argument("--from-cache", help="latent cache (`rectiflow cache`) whose captions and embeddings to "
                                          "use (no text encoder needed)")
    s.add_argument("--n", type=_integer, required=True, help="number of pairs")
    s.add_argument("--steps", type=int, default=None, help="solver steps (default: the model's)")
    s.add_argument("--sampler", default="euler", help="euler | heun | midpoint | rk4 | dopri5 (adaptive)")
    s.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="step grid shift: none, flux or an SD3 alpha (default: the model's)")
    s.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's)")
    s.add_argument("--guidance", type=float, default=None, help="guidance-embedding value (distilled models)")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    s.add_argument("--seed", type=int, default=0, help="pair i uses noise seed SEED + i (0)")
    s.add_argument("--batch-size", type=int, default=64, help="pairs per model batch (64)")
    s.add_argument("--shard-size", type=int, default=1024, help="pairs per shard file (1024)")
    s.add_argument("--rtol", type=float, default=1e-4, help="dopri5 relative tolerance (1e-4)")
    s.add_argument("--atol", type=float, default=1e-4, help="dopri5 absolute tolerance (1e-4)")
    s.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(func=run_pairs)


def load_teacher(model: str | None, device: str, with_text_encoder: bool):
    """The teacher as a Pipeline (fp32); a text encoder that cannot be loaded is one line naming the fix."""
    import torch

    from rectiflow.convert.bundle import default_bundle_path, load_bundle
    from rectiflow.errors import RectiflowError
    from rectiflow.sample.pipeline import Pipeline

    path = model or default_bundle_path()
    try:
        b = load_bundle(path, device=device, dtype=torch.float32, with_text_encoder=with_text_encoder)
    except RectiflowError as e:
        if not with_text_encoder:
            raise
        try:  # is it the text encoder? then say what to do instead
            load_bundle(path, device=device, dtype=torch.float32, with_text_encoder=False)
        except RectiflowError:
            raise e from None
        raise RectiflowError(f"the model's text encoder is unavailable ({str(e).splitlines()[0]}); pass "
                             "--from-cache CACHE to use a cache's caption embeddings instead") from None
    return Pipeline(b.transformer, b.autoencoder, b.text_encoder, b.defaults, name=b.name,
                    model_hash=b.model_hash, device=device, dtype=torch.float32, flow_path=b.flow_path)


def run_pairs(args) -> int:
    from rectiflow.sample.couplings import PromptSource, make_couplings
    from rectiflow.sample.pipeline import DEFAULT

    if args.n < 1:
        from rectiflow.errors import RectiflowError

        raise RectiflowError(f"--n must be a positive number of pairs, got {args.n}")
    pipe = load_teacher(args.model, args.device, with_text_encoder=args.from_cache is None)
    source = PromptSource.from_cache(args.from_cache) if args.from_cache else \
        PromptSource.from_file(args.prompts, pipe.text_encoder)
    d = pipe.defaults
    m = make_couplings(pipe, source, args.out, args.n, steps=args.steps or d.steps, solver=args.sampler,
                       shift=getattr(args, "shift", d.shift),
                       cfg_scale=d.cfg_scale if args.cfg is None else args.cfg,
                       guidance=pipe._resolve_guidance(DEFAULT if args.guidance is None else args.guidance),
                       seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
                       width=args.size, height=args.size, rtol=args.rtol, atol=args.atol,
                       progress=not args.no_progress)
    seconds = sum(s.get("seconds", 0.0) for s in m["shards"])
    rate = f", {m['n'] / seconds:.2f} pairs/s" if seconds else ""
    print(f"{m['n']} pairs of {m['teacher']['name']} ({m['teacher']['hash']}), {m['solver']} "
          f"{m['steps'] or 'adaptive'} steps, CFG {m['cfg_scale']:g}{rate}: {args.out}")
    return 0

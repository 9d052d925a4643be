"""`rectiflow eval shapes --model M --steps 1,2,4,8 [--sampler euler] [--shift none|flux|A] [--cfg X]
[--guidance G] [--size S] [--split seen,heldout] [--limit N] --out DIR`: the shapes-world benchmark
(rectiflow.eval.shapes_eval). `rectiflow eval straightness --model M [--n N] [--reference euler|dopri5]`:
straightness and few-step endpoint errors (rectiflow.eval.straightness). `rectiflow eval prompt TEXT
[--seeds 16] [--steps 4,8]`: how many seeds of one shapes-world prompt come out right. `rectiflow eval ceiling
[--autoencoder AE]`: the score of perfect renders and of their autoencoder round trips
(rectiflow.eval.shapes_ceiling), the bound on any model's score."""

from __future__ import annotations

import argparse
import logging

from rectiflow.cli.generate import parse_cfg_interval, parse_sampler, parse_shift

log = logging.getLogger(__name__)


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--steps needs integers >= 1, got {text!r}")
    return list(dict.fromkeys(steps))


def _splits(text: str) -> list[str]:
    from rectiflow.errors import ConfigError
    from rectiflow.eval.shapes import SPLITS, normalize_split

    words = [w for w in text.split(",") if w.strip()]
    if [w.strip().lower() for w in words] in (["both"], ["all"]):
        return list(SPLITS)
    try:
        return list(dict.fromkeys(normalize_split(w) for w in words)) or list(SPLITS)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (shapes-world compositional benchmark)")
    bench = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    s = bench.add_parser("shapes", help="GenEval-style scores on the shapes world (seen and held-out splits)")
    s.add_argument("--model", default=None, help="model bundle directory (default: the bundled model)")
    s.add_argument("--steps", type=_steps, default=[1, 2, 4, 8], help="step counts, e.g. 1,2,4,8")
    s.add_argument("--sampler", type=parse_sampler, default=None,
                   help="euler | heun | midpoint | rk4 (default: the model's)")
    s.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="time shift of the step grid: none, flux (sequence-length shift) or a number "
                        "(SD3 alpha); default: the model's")
    s.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's)")
    s.add_argument("--cfg-interval", type=parse_cfg_interval, default=None, metavar="LO,HI",
                   help="CFG only at flow times LO <= t <= HI (1 = noise)")
    s.add_argument("--guidance", type=float, default=None, help="guidance-embedding value (distilled models)")
    s.add_argument("--size", type=_positive, default=None, help="image side in pixels (default: the model's)")
    s.add_argument("--split", type=_splits, default=["seen", "held_out"],
                   help="comma-separated splits: seen, heldout (default: both)")
    s.add_argument("--limit", type=_positive, default=None, help="at most N prompts per task (quick look)")
    s.add_argument("--batch-prompts", type=_positive, default=16, help="prompts per model batch")
    s.add_argument("--int8", action="store_true", help="int8 transformer (CPU)")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="evaluate with a LoRA applied (repeatable), as `rectiflow generate --lora`")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", required=True, help="output directory for reports, grids and images")
    s.set_defaults(func=run)

    q = bench.add_parser("prompt", help="one shapes-world prompt drawn with many seeds and scored: how often "
                                         "`rectiflow generate PROMPT` comes out right")
    q.add_argument("prompt", help="a shapes-world prompt, e.g. 'a photo of a yellow star and a blue square'")
    q.add_argument("--seeds", type=_positive, default=16, help="seeds 0..N-1, as `generate --seed` (16)")
    q.add_argument("--model", default=None, help="model bundle directory (default: the bundled model)")
    q.add_argument("--steps", type=_steps, default=None, help="step counts, e.g. 4,8 (default: the model's)")
    q.add_argument("--sampler", type=parse_sampler, default=None, help="euler | heun | midpoint | rk4")
    q.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="time shift of the step grid: none, flux or a number (default: the model's)")
    q.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's)")
    q.add_argument("--cfg-interval", type=parse_cfg_interval, default=None, metavar="LO,HI",
                   help="CFG only at flow times LO <= t <= HI (1 = noise)")
    q.add_argument("--guidance", type=float, default=None, help="guidance-embedding value (distilled models)")
    q.add_argument("--size", type=_positive, default=None, help="image side in pixels (default: the model's)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--out", default=None, help="also write report.json and a grid per step count here")
    q.set_defaults(func=run_prompt)

    c = bench.add_parser("ceiling", help="the best score any model can reach through an autoencoder: renders "
                                          "of the benchmark's prompts and their round trips, scored")
    c.add_argument("--autoencoder", default=None,
                   help="autoencoder file, diffusers vae folder, or a bundle holding ae.safetensors "
                        "(default: the bundled model's)")
    c.add_argument("--seeds", type=_positive, default=4, help="layouts per prompt (4, the protocol's count)")
    c.add_argument("--size", type=_positive, default=64, help="image side in pixels (64)")
    c.add_argument("--split", type=_splits, default=["seen", "held_out"],
                   help="seen, heldout or both (default both)")
    c.add_argument("--limit", type=_positive, default=None, help="at most N prompts per task (quick look)")
    c.add_argument("--batch-size", type=_positive, default=64, help="images per autoencoder batch (64)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--out", default=None, help="also write report.json, report.md and grids here")
    c.set_defaults(func=run_ceiling)

    r = bench.add_parser("straightness", help="straightness S of the model's ODE paths and few-step endpoint "
                                               "errors (rectiflow.eval.straightness)")
    r.add_argument("--model", default=None, help="model bundle directory (default: the bundled model)")
    r.add_argument("--n", type=_positive, default=64, help="number of samples (64)")
    r.add_argument("--steps", type=_positive, default=64, help="Euler steps of the trajectory (64)")
    r.add_argument("--buckets", type=_positive, default=8, help="t buckets of S (8)")
    r.add_argument("--few-steps", type=_steps, default=[1, 2, 4], help="few-step endpoints compared (1,2,4)")
    r.add_argument("--reference", choices=("euler", "dopri5"), default="euler",
                   help="reference endpoint: the --steps Euler one or an adaptive dopri5 solve")
    r.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="grid shift of the few-step endpoints (default: the model's)")
    r.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's)")
    r.add_argument("--guidance", type=float, default=None, help="guidance-embedding value (distilled models)")
    r.add_argument("--size", type=_positive, default=None, help="image side in pixels (default: the model's)")
    r.add_argument("--prompts", default=None,
                   help="text file, one prompt per line (default: the shapes-world benchmark's seen prompts)")
    r.add_argument("--seed", type=int, default=0, help="sample i uses noise seed SEED + i (0)")
    r.add_argument("--batch-size", type=_positive, default=32, help="samples per model batch (32)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--out", default=None, help="also write the report as JSON to this file")
    r.set_defaults(func=run_straightness)


def run_straightness(args) -> int:

    from rectiflow.convert.bundle import default_bundle_path
    from rectiflow.eval.straightness import evaluate_straightness, format_straightness, write_report
    from rectiflow.sample.pipeline import DEFAULT, Pipeline

    prompts = None
    if args.prompts:
        from rectiflow.data.captions import read_prompt_file

        prompts = read_prompt_file(args.prompts)
    pipe = Pipeline.from_bundle(args.model or default_bundle_path())
    report = evaluate_straightness(pipe, n=args.n, prompts=prompts, seed=args.seed, steps=args.steps,
                                   buckets=args.buckets, few_steps=args.few_steps, reference=args.reference,
                                   shift=getattr(args, "shift", DEFAULT), cfg_scale=args.cfg,
                                   guidance=DEFAULT if args.guidance is None else args.guidance,
                                   size=args.size, batch_size=args.batch_size, progress=not args.no_progress)
    print(format_straightness(report))
    if args.out:
        print(f"report: {write_report(report, args.out)}")
    return 0


def run_ceiling(args) -> int:
    from pathlib import Path

    from rectiflow.convert.autoencoder import load_autoencoder
    from rectiflow.convert.bundle import default_bundle_path
    from rectiflow.eval.shapes_ceiling import ROWS, evaluate_ceiling

    path = Path(args.autoencoder) if args.autoencoder else default_bundle_path() / "ae.safetensors"
    if path.is_dir() and (path / "ae.safetensors").is_file():  # a bundle (ours or BFL's): its autoencoder
        path = path / "ae.safetensors"
    ae = load_autoencoder(path).eval()
    report = evaluate_ceiling(ae, size=args.size, splits=args.split, seeds=range(args.seeds),
                              limit=args.limit, batch_size=args.batch_size, out_dir=args.out, name=str(path),
                              progress=not args.no_progress)
    for split, rows in report["results"].items():
        print(f"{split:9s} " + "  ".join(f"{row}={rows[row]['overall']:.3f}" for row in ROWS)
              + f" ({rows[ROWS[0]]['n_images']} images each)")
    if args.out:
        print(f"report: {args.out}/report.md")
    return 0


def run_prompt(args) -> int:
    from rectiflow.convert.bundle import default_bundle_path
    from rectiflow.data.shapes import parse_prompt
    from rectiflow.eval.shapes_eval import evaluate_prompt
    from rectiflow.sample.pipeline import DEFAULT, Pipeline

    parse_prompt(args.prompt)  # a prompt the scorer cannot read fails before the model loads
    pipe = Pipeline.from_bundle(args.model or default_bundle_path())
    report = evaluate_prompt(pipe, args.prompt, seeds=range(args.seeds),
                             steps=args.steps or [pipe.defaults.steps], sampler=args.sampler,
                             shift=getattr(args, "shift", DEFAULT), cfg_scale=args.cfg,
                             guidance=DEFAULT if args.guidance is None else args.guidance, size=args.size,
                             cfg_interval=args.cfg_interval, out_dir=args.out, progress=not args.no_progress)
    for n, r in report["results"].items():
        seeds = ", ".join(map(str, r["correct_seeds"])) or "none"
        fails = "; ".join(f"{k} {v}" for k, v in r["failures"].items())
        failed = f"; failed: {fails}" if fails else ""
        print(f"steps={n:>2s} {r['correct']}/{r['n']} correct (seeds {seeds}){failed}")
    if args.out:
        print(f"report: {args.out}/report.json")
    return 0


def run(args) -> int:
    from rectiflow.convert.bundle import default_bundle_path
    from rectiflow.convert.lora import parse_lora_arg
    from rectiflow.eval.shapes import commonest_failure
    from rectiflow.eval.shapes_eval import evaluate_shapes
    from rectiflow.sample.pipeline import DEFAULT, Pipeline

    pipe = Pipeline.from_bundle(args.model or default_bundle_path(), int8=args.int8,
                                loras=[parse_lora_arg(a) for a in args.lora])
    report = evaluate_shapes(pipe, steps=args.steps, sampler=args.sampler,
                             shift=getattr(args, "shift", DEFAULT), cfg_scale=args.cfg,
                             guidance=DEFAULT if args.guidance is None else args.guidance, size=args.size,
                             cfg_interval=args.cfg_interval, splits=args.split, out_dir=args.out,
                             limit=args.limit,
                             batch_prompts=args.batch_prompts, progress=not args.no_progress)
    for split, by_steps in report["results"].items():
        for n, summary in by_steps.items():
            top = commonest_failure(summary.get("failures", {}))
            most = f", most failures: {top[0]} ({top[1]})" if top else ""
            print(f"{split:9s} steps={n:>2s} overall={summary['overall']:.3f} ({summary['n_images']} images"
                  f"{most})")
    print(f"report: {args.out}/report.md")
    return 0

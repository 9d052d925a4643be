"""`rectiflow compare PROMPTS.txt -o DIR`: prompts x models x step counts x seeds as contact sheets, an
index.html and a JSON of every image's settings (user docs: docs/compare.md)."""

from __future__ import annotations

import argparse

from rectiflow.cli.generate import DTYPES, parse_sampler, parse_shift


def int_list(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare models, step counts and seeds on prompts: contact sheets and a page",
        description="Generate every prompt with every model at every step count and seed; write one "
                    "labelled contact sheet per prompt (with the shapes-world scorer's verdict under each "
                    "image of a shapes-world prompt), index.html and compare.json. Rerunning resumes.",
    )
    p.add_argument("prompts", help="a text file with one prompt per line (# starts a comment)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--model", action="append", default=[], metavar="[ID=]PATH",
                   help="a bundle directory, labelled ID (default: the directory name); repeatable; "
                        "`default` is the bundled model (also what is used without --model)")
    p.add_argument("--lora", action="append", default=[], metavar="[ID=]PATH[:SCALE]",
                   help="a LoRA file: every model is compared without it and with it (merged), as rows "
                        "MODEL+ID; repeatable")
    p.add_argument("--steps", type=int_list, default=[1, 4], help="step counts, comma-separated (1,4)")
    p.add_argument("--seeds", type=int_list, default=[0], help="seeds, comma-separated (0)")
    p.add_argument("--cfg", type=float, dest="cfg_scale", help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance", type=float, help="guidance-embedding value (guidance-distilled models)")
    p.add_argument("--sampler", type=parse_sampler, help="ODE solver: euler, midpoint, heun or rk4")
    p.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="time shift: none, flux or a number (SD3 alpha)")
    p.add_argument("--width", type=int, help="image width, a multiple of 16")
    p.add_argument("--height", type=int, help="image height, a multiple of 16")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="fp32 | bf16 | fp16 (auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto)")
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    from pathlib import Path

    from rectiflow.errors import RectiflowError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RectiflowError(f"cannot read prompts from {path}: {e}") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise RectiflowError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def lora_variants(model_specs: list[str], lora_specs: list[str], device, dtype) -> dict:
    """{"MODEL+LORA": the model with the LoRA merged} for every model and LoRA (a second copy of the model
    in memory per LoRA: simple, and fine for models that fit twice)."""
    from rectiflow.cli.generate import _model_path
    from rectiflow.convert.lora import parse_lora_arg
    from rectiflow.sample import Pipeline
    from rectiflow.sample.model_ids import DEFAULT_ID, parse_model_spec

    variants = {}
    for lora in lora_specs:
        path, scale = parse_lora_arg(lora)  # a bad scale fails before any model loads
        lora_id, path = parse_model_spec(path)
        for spec in model_specs or [DEFAULT_ID]:
            model_id, model_path = parse_model_spec(spec)
            variants[f"{model_id}+{lora_id}"] = Pipeline.from_bundle(
                model_path or _model_path(None), device=device, dtype=dtype, loras=[(path, scale)])
    return variants


def run(args) -> int:
    from rectiflow import __version__
    from rectiflow.cli.generate import _model_path, device_and_dtype
    from rectiflow.errors import RectiflowError
    from rectiflow.eval.compare import compare
    from rectiflow.sample.model_ids import load_pipelines

    prompts = read_prompts(args.prompts)
    if any(s < 1 for s in args.steps):
        raise RectiflowError(f"--steps must all be >= 1, got {args.steps}")
    if any(s < 0 for s in args.seeds):
        raise RectiflowError(f"--seeds must all be >= 0, got {args.seeds}")
    device, dtype = device_and_dtype(args.device, args.dtype)
    pipelines = load_pipelines(args.model, device, dtype, resolve_default=lambda: _model_path(None))
    pipelines.update(lora_variants(args.model, args.lora, device, dtype))
    options = {k: v for k, v in (("cfg_scale", args.cfg_scale), ("sampler", args.sampler),
                                 ("width", args.width), ("height", args.height)) if v is not None}
    if hasattr(args, "shift"):  # unset: the model's default
        options["shift"] = args.shift
    if args.guidance is not None:
        options["guidance"] = args.guidance
    report = compare(pipelines, prompts, args.output, steps=args.steps, seeds=args.seeds, options=options,
                     settings_extra={"rectiflow_version": __version__})
    print(f"{args.output}/index.html: {len(prompts)} sheet(s), {report['generated']} image(s) generated, "
          f"{report['reused']} reused")
    for label, acc in report.get("accuracy", {}).items():
        print(f"  {label}: {acc:.2f} correct (shapes-world scorer)")
    return 0

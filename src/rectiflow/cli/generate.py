"""`rectiflow generate PROMPT`: text to PNG images carrying their settings (user docs: docs/generate.md).

Output naming (-o OUT, default out.png): OUT ending in .png is the file for a single image; with several
images (-n, several prompts) they are OUT with -0, -1, ... before the suffix. Any other OUT is a directory
(created) holding image-0.png, image-1.png, ... . Images are in call order: prompt by prompt, -n per
prompt; image i uses seed S + i.

Without --model the bundled default model (rectiflow/assets/default/, or $RECTIFLOW_DEFAULT_MODEL) is used.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16", "fp16")
NO_DEFAULT_MODEL = (
    "the bundled default model is missing from rectiflow/assets/default/ (rebuild it with "
    "`bash recipes/shapes/run.sh`, or reinstall rectiflow); "
    "pass --model PATH, a directory with model.json (rectiflow), flux1-*.safetensors + ae.safetensors (BFL), "
    "model_index.json (diffusers: FLUX or SD3) or sd3*.safetensors (SD3)"
)


def parse_sampler(name: str) -> str:
    """argparse type of --sampler: one of rectiflow.flow's solvers (imported only when the flag is given, so
    building the parser does not import torch)."""
    from rectiflow.flow import METHODS

    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(METHODS)})")
    return name


def parse_shift(text: str):
    """argparse type of --shift: rectiflow.flow's TimeShift ("none"/"linear" -> None, "flux", an alpha > 0);
    an unset --shift leaves no attribute (argparse.SUPPRESS): the model's default applies."""
    from rectiflow.errors import ConfigError
    from rectiflow.flow import parse_time_shift

    try:
        return parse_time_shift(text, "--shift")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_layers(text: str) -> tuple[int, ...]:
    """argparse type of --skip-layers: comma-separated block indices >= 0."""
    try:
        layers = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 7,8,9, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"block indices must be >= 0, got {text!r}")
    return layers


def parse_cfg_interval(text: str) -> tuple[float, float]:
    """argparse type of --cfg-interval: LO,HI flow times with 0 <= LO <= HI <= 1."""
    from rectiflow.errors import ConfigError
    from rectiflow.flow import check_cfg_interval

    try:
        return check_cfg_interval(text.split(","), "--cfg-interval")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images from a text prompt",
        description="Generate PNG images from text prompts with a FLUX-style rectified-flow model. Unset "
                    "options take the model's defaults (model.json / published FLUX settings).",
    )
    p.add_argument("prompt", nargs="+", help="the prompt (several: one batch of -n images each)")
    p.add_argument("--model", help="bundle directory (rectiflow model.json, BFL, diffusers or SD3 "
                   "single-file layout); "
                                   "default: the bundled default model")
    p.add_argument("--steps", type=int, help="number of solver steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (0)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 16")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 16")
    p.add_argument("--guidance", type=float, help="guidance-embedding value (guidance-distilled models: dev)")
    p.add_argument("--cfg", type=float, dest="cfg_scale", help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-interval", type=parse_cfg_interval, metavar="LO,HI",
                   help="guide only at flow times LO <= t <= HI (1 = noise), e.g. 0.5,1: the first half of "
                        "the steps; the conditional model alone (half the forwards) elsewhere")
    p.add_argument("--negative-prompt", help="negative prompt (needs --cfg above 1)")
    p.add_argument("--skip-layers", type=parse_layers, help="SD3.5 skip-layer guidance: joint blocks to "
                   "skip, e.g. 7,8,9 (scale 2.8 in the first 1-20%% of the steps; see docs/sd3.md)")
    p.add_argument("--sampler", type=parse_sampler, help="ODE solver: euler, midpoint, heun or rk4")
    p.add_argument("--shift", type=parse_shift, default=argparse.SUPPRESS,
                   help="time shift: none, flux (sequence-length shift) or a number (SD3 alpha)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (1)")
    p.add_argument("--batch-size", type=int, help="images per model call (default: all at once)")
    p.add_argument("-o", "--output", default="out.png", help="output .png file or directory (out.png)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="fp32 | bf16 | fp16 (auto: bf16 on "
                                                                  "CUDA, fp32 on CPU)")
    p.add_argument("--int8", action="store_true", help="int8 weight quantisation of the transformer (CPU)")
    p.add_argument("--offload", action="store_true", help="stream transformer blocks to the GPU one at a "
                                                          "time (small GPUs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA file (kohya, diffusers, BFL-named or XLabs) at SCALE (1); repeatable")
    p.set_defaults(func=run)


def _model_path(arg: str | None) -> Path:
    from rectiflow.convert.bundle import CARD_FILE, DEFAULT_MODEL_ENV, default_bundle_path
    from rectiflow.errors import RectiflowError

    if arg is not None:
        return Path(arg)
    import os

    path = default_bundle_path()
    if not (path / CARD_FILE).is_file():
        if os.environ.get(DEFAULT_MODEL_ENV):
            raise RectiflowError(f"${DEFAULT_MODEL_ENV} points to {path}, which holds no {CARD_FILE}; "
                                 "fix the variable or pass --model PATH")
        raise RectiflowError(NO_DEFAULT_MODEL)
    return path


def output_paths(output: str, n: int) -> list[Path]:
    """Where the n images go (see the module docstring)."""
    out = Path(output)
    if out.suffix.lower() == ".png" and not out.is_dir():
        if n == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    return [out / f"image-{i}.png" for i in range(n)]


def device_and_dtype(device_arg: str, dtype_arg: str):
    """(torch.device, torch.dtype) from --device (auto: cuda if available) and --dtype (auto: bf16 on CUDA,
    fp32 on the CPU)."""
    import torch

    from rectiflow.errors import RectiflowError

    device = device_arg
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise RectiflowError(f"unknown device {device_arg!r}; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RectiflowError("--device cuda but no CUDA device is available; use --device cpu")
    dtype_name = dtype_arg if dtype_arg != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]


def run(args) -> int:
    from rectiflow import __version__
    from rectiflow.errors import RectiflowError
    from rectiflow.sample import DEFAULT, Pipeline, save_png
    from rectiflow.sample.slg import SkipLayerGuidance

    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.num_images < 1:
        raise RectiflowError(f"-n must be >= 1, got {args.num_images}")
    if args.offload and device.type == "cpu":
        raise RectiflowError("--offload streams weights to a GPU; it needs --device cuda")

    t0 = time.perf_counter()
    from rectiflow.convert.lora import parse_lora_arg

    loras = [parse_lora_arg(a) for a in args.lora]  # a bad scale fails before the model loads
    pipe = Pipeline.from_bundle(_model_path(args.model), device=device, dtype=dtype, int8=args.int8,
                                offload=args.offload, loras=loras)
    t1 = time.perf_counter()
    result = pipe(
        args.prompt, steps=args.steps, width=args.width, height=args.height, seed=args.seed,
        sampler=args.sampler,
        shift=getattr(args, "shift", DEFAULT),
        guidance=DEFAULT if args.guidance is None else args.guidance, cfg_scale=args.cfg_scale,
        negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
        batch_size=args.batch_size, progress=not args.no_progress,
        skip_layer_guidance=SkipLayerGuidance(layers=args.skip_layers) if args.skip_layers else None,
        cfg_interval=args.cfg_interval,
    )
    t2 = time.perf_counter()
    paths = output_paths(args.output, len(result.images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, settings, path in zip(result.images, result.settings, paths):
        save_png(image, path, dict(settings, rectiflow_version=__version__))
        print(path)
    log.info("%d image(s) in %.1f s (model load %.1f s) with %s on %s", len(paths), t2 - t1, t1 - t0,
             pipe.name, device)
    return 0

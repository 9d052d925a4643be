"""`rectiflow serve`: an HTTP API and a web page over models loaded once (user docs: docs/serve.md)."""

from __future__ import annotations

from rectiflow.cli.generate import DTYPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a web page and an HTTP API that generate images",
        description="Load the models once and serve POST /v1/generate, job progress, the PNGs and a page "
                    "to type prompts into and compare models, step counts and seeds. Binds to 127.0.0.1 "
                    "unless --host says otherwise (there is no authentication).",
    )
    p.add_argument("--model", action="append", default=[], metavar="[ID=]PATH",
                   help="a bundle directory, served under ID (default: the directory name); repeatable. "
                        "`default` is the bundled model (also what is served without --model)")
    p.add_argument("--lora", action="append", default=[], metavar="[ID=]PATH",
                   help="a LoRA file, loaded onto every served model it fits and switched on per request by "
                        "ID (default: the file name); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--queue", type=int, default=16, help="jobs that may wait; more are answered 429 (16)")
    p.add_argument("--workers", type=int, default=1, help="jobs run at once (1)")
    p.add_argument("--max-batch", type=int, default=1,
                   help="merge queued jobs with equal settings into model calls of up to this many images "
                        "(1: every job alone, byte-identical to `rectiflow generate`)")
    p.add_argument("--store-mb", type=float, default=256, help="memory for finished PNGs; least recently "
                                                               "used ones are dropped first (256)")
    p.add_argument("--max-steps", type=int, default=100, help="per-request cap on steps (100)")
    p.add_argument("--max-n", type=int, default=8, help="per-request cap on images (8)")
    p.add_argument("--max-side", type=int, default=2048, help="per-request cap on width and height (2048)")
    p.add_argument("--max-cost", type=int, default=1024 * 1024 * 16,
                   help="per-request cap on width x height x steps x n (16777216: 1024x1024 at 16 steps)")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="prompt length cap (2000)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="fp32 | bf16 | fp16 (auto: bf16 on CUDA, "
                                                                  "fp32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rectiflow.cli.generate import _model_path, device_and_dtype
    from rectiflow.errors import RectiflowError
    from rectiflow.sample.model_ids import load_pipelines
    from rectiflow.web.schemas import Limits
    from rectiflow.web.server import serve

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RectiflowError(f"`rectiflow serve` needs {e.name}: pip install 'rectiflow[serve]'") from e
    if not 0 <= args.port <= 65535:
        raise RectiflowError(f"--port must be 0..65535, got {args.port}")
    for name in ("queue", "workers", "max_batch"):
        if getattr(args, name) < 1:
            raise RectiflowError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.store_mb <= 0:
        raise RectiflowError(f"--store-mb must be > 0, got {args.store_mb}")
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_steps=args.max_steps, max_n=args.max_n,
                    max_side=args.max_side, max_cost=args.max_cost)
    device, dtype = device_and_dtype(args.device, args.dtype)
    pipelines = load_pipelines(args.model, device, dtype, resolve_default=lambda: _model_path(None))
    serve(pipelines, host=args.host, port=args.port, queue_size=args.queue, workers=args.workers,
          max_batch=args.max_batch, store_mb=args.store_mb, limits=limits, loras=args.lora)
    return 0

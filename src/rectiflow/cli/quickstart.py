"""`rectiflow quickstart DATA --out RUN [--size 64] [--minutes N]`: your images to a model in one command."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="your own images to your own model: data check, autoencoder, cache, transformer, sample grid",
        description="Train a small text-to-image model on DATA (an image folder with captions, .txt "
        "captions, webdataset shards, class folders or a manifest) within a time budget: data check "
        "(report kept), autoencoder, latent cache, the `tiny` transformer, a sample grid of the dataset's "
        "own captions and a bundle for `rectiflow generate --model`. Each stage is skipped when done and "
        "resumed when interrupted: rerun the same command. Steps are chosen from the measured throughput.",
    )
    p.add_argument("data", help="dataset folder, .tar shards folder or manifest .jsonl")
    p.add_argument("--out", required=True, help="run directory (rerun with the same --out to continue)")
    p.add_argument("--size", type=int, default=64, help="image size, a multiple of 16 (default 64)")
    p.add_argument("--minutes", type=float, default=20.0,
                   help="time budget of the whole run in minutes (default 20)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="budget wall-clock time, or this process's CPU time on a machine shared with other "
                        "work (default wall)")
    p.add_argument("--preset", default="tiny", help="transformer preset (default tiny: 9.2M parameters)")
    p.add_argument("--text-encoder", default="minilm",
                   help="text encoder (default minilm; minilm:N reads N tokens, for long captions)")
    p.add_argument("--ae-preset", default=None,
                   help="autoencoder preset or JSON of its fields (default: the shapes recipe's, 0.78M "
                        "parameters)")
    p.add_argument("--batch-size", type=int, default=8, help="transformer batch size (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from rectiflow.errors import ConfigError
    from rectiflow.recipes.quickstart import QUICK_AE, QuickstartOptions, quickstart

    ae = args.ae_preset or dict(QUICK_AE)
    if isinstance(ae, str) and ae.lstrip().startswith("{"):
        try:
            ae = json.loads(ae)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--ae-preset is not valid JSON ({e})") from None

    opts = QuickstartOptions(data=args.data, out=args.out, size=args.size, minutes=args.minutes,
                             preset=args.preset, text_encoder=args.text_encoder, batch_size=args.batch_size,
                             clock=args.clock, seed=args.seed, progress=not args.no_progress,
                             ae_preset=ae)
    print(quickstart(opts)["summary"])
    return 0

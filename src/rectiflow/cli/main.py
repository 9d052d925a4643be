"""`rectiflow` command line: one subcommand per module in rectiflow.cli.

Each subcommand module defines `register(subparsers)` which adds its parser and sets `func=run`, where
`run(args) -> int`. This file only dispatches and turns user errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `rectiflow --help` lists them. Each is imported when the parser is built:
# a missing or broken one fails every command loudly (a silent skip hid a broken subcommand).
SUBCOMMANDS = [
    "generate",
    "convert",
    "data",
    "cache",
    "train",
    "train_ae",
    "eval",
    "serve",
    "compare",
    "lora",
    "study",
    "reflow",
    "tune",
    "quickstart",
]


def build_parser() -> argparse.ArgumentParser:
    from rectiflow import __version__

    parser = argparse.ArgumentParser(
        prog="rectiflow",
        description="Rectified-flow transformers for text-to-image: generate, convert, train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"rectiflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"rectiflow.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rectiflow.errors import RectiflowError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RectiflowError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""`rectiflow data check PATH`: report unusable samples and optionally write a manifest of the good ones.
`rectiflow data icons --out DIR --n N [--size S] [--seed K]`: write procedural icons (rectiflow.data.icons).
`rectiflow data shapes --out DIR --n N [--size S] [--seed K] [--workers W] [--task-weights T=W,...]
[--caption-order any|reading] [--counterfactual [all|two-shape]]`: write shapes-world training images, or
with --counterfactual their counterfactual twins (rectiflow.data.shapes.write_imagefolder)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Options saying how to read a dataset path (shared with `rectiflow cache`)."""
    p.add_argument("--kind", choices=["imagefolder", "txt", "webdataset", "classes", "manifest"],
                   help="dataset layout (default: guessed from the path)")
    p.add_argument("--caption-column", action="append", dest="caption_columns", metavar="NAME",
                   help="caption column / json key; repeat for several caption fields")
    p.add_argument("--template", help='caption template for class folders (default "a photo of a {class}")')
    p.add_argument("--trigger", metavar="WORD", help='a LoRA trigger word put into every caption ("WORD, '
                                                     'caption", or in place of "[trigger]")')


def open_source_from_args(args, on_error: str = "skip"):
    from rectiflow.data.sources import open_source

    source = open_source(args.data if hasattr(args, "data") else args.path, kind=args.kind,
                         caption_columns=args.caption_columns, template=args.template, on_error=on_error)
    if getattr(args, "trigger", None):
        source.add_trigger(args.trigger)
    return source


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools (check, shapes, icons)")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="find unreadable images, missing captions, small images, long captions, "
                                     "near-duplicates; write a manifest of the rest")
    c.add_argument("path", help="dataset folder, .tar shard(s) folder, or manifest .jsonl")
    add_source_arguments(c)
    c.add_argument("--size", type=int, help="training size: report images whose shorter side is smaller")
    limit = c.add_mutually_exclusive_group()
    limit.add_argument("--max-tokens", type=int,
                       help="caption limit in tokens, counted approximately as 4/3 x whitespace words")
    limit.add_argument("--text-encoder", metavar="NAME",
                       help="count tokens with this text encoder's tokenizer against its limit (e.g. minilm)")
    c.add_argument("--dedup", action="store_true",
                   help="find near-duplicates: perceptual hash (structure) and colour thumbnail both close; "
                        "each group keeps its largest image, then the first listed")
    c.add_argument("--hamming", type=int, default=None,
                   help="pHash Hamming threshold for --dedup (default 4 of 64 bits)")
    c.add_argument("--colour", type=float, default=None,
                   help="colour threshold for --dedup: largest RGB distance between 4x4 thumbnail cells "
                        "(0-441; default 16)")
    c.add_argument("--write-manifest", metavar="OUT", help="write the kept samples to this .jsonl")
    c.add_argument("--report", metavar="FILE",
                   help="write the full report (every problem, every duplicate group) to this text file")
    c.add_argument("--strict", action="store_true", help="exit with status 1 if any problem was found")
    c.set_defaults(func=run)
    s = sub.add_parser("shapes", help="write training images of the shapes world (held-out combinations "
                                      "excluded) as an imagefolder with all true captions per image")
    s.add_argument("--out", required=True, help="output folder (PNG files + metadata.jsonl)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="world seed: image i depends only on (seed, i)")
    s.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    s.add_argument("--task-weights", type=parse_task_weights, metavar="TASK=W,...",
                   help="relative frequency of each caption task, e.g. position=2.5,color_attr=2.5 "
                        "(tasks not named keep weight 1; default: all six tasks equally often)")
    s.add_argument("--shape-weights", type=parse_shape_weights, metavar="SHAPE=W,...",
                   help="draw each caption in proportion to the product of its shapes' weights, e.g. "
                        "star=2,cross=2 to show the hardest shapes more often (default: uniform)")
    s.add_argument("--caption-order", choices=["any", "reading"], default="any",
                   help="'reading': a two-object image's two_object / color_attr captions name its objects "
                        "left-to-right (top-to-bottom when stacked) only; default 'any': both orders")
    s.add_argument("--counterfactual", nargs="?", const="all", choices=["all", "two-shape"],
                   help="write each image's counterfactual instead (same names and captions, a named shape "
                        "changed so that every caption is false): the negatives of flow.contrastive = "
                        "'counterfactual' (data.negative_cache); 'two-shape': only for images of two "
                        "shapes, the others kept as they are")
    s.add_argument("--overwrite", action="store_true", help="replace an existing metadata.jsonl in --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_shapes)
    i = sub.add_parser("icons", help="write a small procedural dataset of flat icons with one-line captions "
                                     "(16 objects, 9 colours, 5 backgrounds) to try your-own-data training")
    i.add_argument("--out", required=True, help="output folder (PNG files + metadata.jsonl)")
    i.add_argument("--n", type=int, required=True, help="number of images")
    i.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    i.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing metadata.jsonl in --out")
    i.set_defaults(func=run_icons)


def token_limit(name: str):
    """(count_tokens, max_tokens) for a text encoder: its tokenizer without truncation, and its length."""
    from rectiflow.models.text import load_text_encoder

    encoder = load_text_encoder(name)
    return encoder.count_tokens, encoder.max_length


def run(args) -> int:
    import sys

    from rectiflow.data.check import DEFAULT_COLOUR, DEFAULT_HAMMING, check_dataset, long_caption_hint

    source = open_source_from_args(args)
    count_tokens, max_tokens = None, args.max_tokens
    if args.text_encoder:
        count_tokens, max_tokens = token_limit(args.text_encoder)
    report = check_dataset(
        source, size=args.size, max_tokens=max_tokens, count_tokens=count_tokens, dedup=args.dedup,
        hamming_threshold=DEFAULT_HAMMING if args.hamming is None else args.hamming,
        colour_threshold=DEFAULT_COLOUR if args.colour is None else args.colour)
    print(report.table())
    if max_tokens is not None and count_tokens is None:
        print(f"(caption length approximated as 4/3 x words against {max_tokens}; "
              "pass --text-encoder to count real tokens)")
    hint = long_caption_hint(report, args.text_encoder)
    if hint:
        print(hint)
    if report.duplicate_groups:
        print("duplicate groups:\n" + report.duplicates_text(limit=10))
    warning = report.large_dedup_warning()
    if warning:  # before anything is written
        bar = "!" * 100
        print(f"{bar}\n{warning}\n{bar}", file=sys.stderr)
    if args.report:
        print(f"wrote the full report to {report.write_report(args.report)}")
    if args.write_manifest:
        path = report.write_manifest(args.write_manifest)
        print(f"wrote {len(report.kept)} samples to {path}")
    return 1 if args.strict and not report.ok else 0


def _parse_weights(text: str, names, what: str) -> dict[str, float]:
    """"a=2.5,b=2" -> every name with a weight (names not given keep 1.0); one clear error otherwise."""
    weights = dict.fromkeys(names, 1.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise argparse.ArgumentTypeError(
                f"bad {what} weight {part!r}: use {what.upper()}=WEIGHT with {what.upper()} one of "
                f"{', '.join(names)}")
        try:
            w = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad {what} weight {part!r}: {value!r} is not a number") from None
        if not (w >= 0 and w != float("inf")):
            raise argparse.ArgumentTypeError(f"bad {what} weight {part!r}: weights must be finite and >= 0")
        weights[name] = w
    if not any(weights.values()):
        raise argparse.ArgumentTypeError(f"{what} weights are all zero: no {what} left to draw")
    return weights


def parse_task_weights(text: str) -> dict[str, float]:
    """"position=2.5,color_attr=2.5" -> all six tasks with weights (unnamed tasks keep 1.0)."""
    from rectiflow.data.shapes import TASKS

    return _parse_weights(text, TASKS, "task")


def parse_shape_weights(text: str) -> dict[str, float]:
    """"star=2,cross=2" -> all six shapes with weights (unnamed shapes keep 1.0)."""
    from rectiflow.data.shapes import SHAPES

    return _parse_weights(text, tuple(SHAPES), "shape")


def run_shapes(args) -> int:
    from rectiflow.data.shapes import write_imagefolder

    out = write_imagefolder(args.out, args.n, args.size, args.seed, task_weights=args.task_weights,
                            caption_order=args.caption_order, counterfactual=args.counterfactual,
                            overwrite=args.overwrite, progress=not args.no_progress, workers=args.workers,
                            shape_weights=args.shape_weights)
    mix = "" if args.caption_order == "any" else f", captions in {args.caption_order} order"
    mix += f", counterfactual images ({args.counterfactual})" if args.counterfactual else ""
    if args.task_weights:
        total = sum(args.task_weights.values())
        mix += ", tasks " + " ".join(f"{t} {w / total:.2f}" for t, w in args.task_weights.items())
    if args.shape_weights:
        mix += ", shape weights " + " ".join(f"{s} {w:g}" for s, w in args.shape_weights.items())
    print(f"wrote {args.n} shapes-world images ({args.size}px, seed {args.seed}{mix}) to {out}")
    return 0


def run_icons(args) -> int:
    from rectiflow.data.icons import write_icons

    out = write_icons(args.out, args.n, args.size, args.seed, overwrite=args.overwrite)
    print(f"wrote {args.n} icons ({args.size}px, seed {args.seed}) to {out}")
    return 0

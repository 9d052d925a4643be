"""`rectiflow lora`: inspect, merge, extract and convert LoRA files (rectiflow.convert.lora / lora_ops)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("lora", help="LoRA files: info, merge, extract, convert")
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    q = sub.add_parser("info", help="format, rank, alpha, targeted modules and base hints of a LoRA file")
    q.add_argument("file", help="LoRA file (kohya, diffusers, BFL, XLabs or rectiflow layout)")
    q.add_argument("--json", action="store_true", help="print the description as JSON")
    q.set_defaults(func=run_info)

    q = sub.add_parser(
        "merge",
        help="add a LoRA into a transformer's weights and save the result",
    )
    q.add_argument("base", help="transformer weights (any format `rectiflow convert` reads)")
    q.add_argument("lora", help="LoRA file")
    q.add_argument("out", help="output file (bfl / rectiflow) or folder (diffusers)")
    q.add_argument("--scale", default="1.0", help="LoRA multiplier (default 1.0)")
    q.add_argument("--format", choices=["rectiflow", "bfl", "diffusers"], default="rectiflow",
                   help="layout of the merged transformer (default rectiflow)")
    q.set_defaults(func=run_merge)

    q = sub.add_parser(
        "extract",
        help="a LoRA approximating TUNED - BASE by truncated SVD (kohya's method)",
    )
    q.add_argument("base", help="the transformer before fine-tuning (any format `rectiflow convert` reads)")
    q.add_argument("tuned", help="the fine-tuned transformer")
    q.add_argument("out", help="output LoRA file")
    q.add_argument("--rank", type=int, required=True, help="rank of the extracted adapters")
    q.add_argument("--to", choices=["kohya", "diffusers"], default="kohya",
                   help="file layout (default kohya)")
    q.add_argument(
        "--min-change",
        type=float,
        default=0.0,
        help="skip layers whose relative change |dW|/|W| is at most this (default 0)",
    )
    q.set_defaults(func=run_extract)

    q = sub.add_parser(
        "convert", help="rewrite a LoRA (kohya / diffusers / BFL-named / XLabs) as kohya or diffusers"
    )
    q.add_argument("src", help="LoRA file to convert")
    q.add_argument("dst", help="output LoRA file")
    q.add_argument("--to", choices=["kohya", "diffusers"], required=True, help="layout to write")
    q.set_defaults(func=run_convert)

    q = sub.add_parser("export", help="write the adapter of a LoRA training checkpoint as LoRA files")
    q.add_argument("checkpoint", help="a step-N directory of a run with a [lora] section")
    q.add_argument("out", help="output directory")
    q.add_argument(
        "--to",
        choices=["kohya", "diffusers"],
        action="append",
        help="layout (repeatable; default: the run's lora.formats)",
    )
    q.add_argument("--no-ema", action="store_true", help="the live adapter instead of its EMA")
    q.set_defaults(func=run_export)


def run_info(args) -> int:
    from rectiflow.convert.lora import read_lora
    from rectiflow.convert.lora_ops import describe_lora

    d = describe_lora(read_lora(args.file))
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(
        f"{d['file']}: {d['format']} LoRA, {d['modules']} modules, rank {d['rank']}, alpha {d['alpha']}, "
        f"{d['parameters']:,} parameters"
    )
    print("targets: " + ", ".join(f"{g} ({n})" for g, n in d["targets"].items()))
    print(f"blocks: double {d['blocks']['double']}, single {d['blocks']['single']}")
    if d["trigger"]:
        print(f"trigger: {d['trigger']}")
    for k, v in d["base_hints"].items():
        print(f"base {k}: {v}")
    if d["skipped_text_encoder_tensors"]:
        print(f"text-encoder tensors (not applied): {d['skipped_text_encoder_tensors']}")
    return 0


def run_merge(args) -> int:
    from rectiflow.convert.lora import parse_scale
    from rectiflow.convert.lora_ops import merge_into

    print(merge_into(args.base, args.lora, args.out, scale=parse_scale(args.scale), format=args.format))
    return 0


def run_extract(args) -> int:
    from rectiflow.convert.lora_ops import extract_lora

    r = extract_lora(args.base, args.tuned, args.out, args.rank, format=args.to, min_change=args.min_change)
    print(
        f"{r.path}: rank {r.rank}, {r.modules} layers ({r.unchanged} unchanged skipped), kept energy "
        f"{r.energy:.4f} (worst layer {r.min_energy:.4f})"
    )
    return 0


def run_convert(args) -> int:
    from rectiflow.convert.lora_ops import convert_file

    print(convert_file(args.src, args.dst, args.to))
    return 0


def run_export(args) -> int:
    from rectiflow.train.lora import export_checkpoint

    for p in export_checkpoint(args.checkpoint, args.out, args.to, ema=not args.no_ema):
        print(p)
    return 0

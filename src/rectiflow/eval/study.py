"""`rectiflow study SPEC.toml`: equal-compute experiments. Every variant of a spec (rectiflow.eval.study_spec)
is trained once per seed as an ordinary `rectiflow train` run, scored with the shapes-world benchmark at the
spec's fractions of the budget, and the whole study is summarised in study.md / study.json with plots of
score against training CPU time (rectiflow.eval.study_report).

    OUT/runs/<variant>/seed-<s>/train/        the run (checkpoints/, logs/metrics.jsonl, export/bundle/)
    OUT/runs/<variant>/seed-<s>/eval/step-N-<key>/   the benchmark's report of step N (key: eval settings)
    OUT/runs/<variant>/seed-<s>/study-run.json       what the study knows of the run (below)
    OUT/study.md, OUT/study.json, OUT/score-vs-cpu-*.png

Resumable at every level: a run resumes from its newest checkpoint, a scored step is never scored again with
the same settings, a finished run is skipped. The budget is the same for every variant: `samples` fixes
train.steps = samples / batch size; `cpu_minutes` measures each variant's training CPU seconds per step in
a short calibration (kept in study-run.json, so a resumed study keeps the same step count) and sets
train.steps = budget / that. A run's training CPU time is its measured mean CPU time per step times its
steps (time.process_time over the training segments, all threads), so steps repeated after a kill are not
counted twice. Runs with optim.schedule = "constant" can be continued to a larger budget in the same
folder; with a decaying schedule the learning rate depends on train.steps and a new budget needs a new
study.out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.eval.study_layout import eval_key, load_run_state, milestones, run_dir, save_run_state
from rectiflow.eval.study_spec import EvalSettings, StudySpec, Variant
from rectiflow.train.config import RunConfig, config_to_dict

log = logging.getLogger(__name__)

__all__ = ["run_study", "plan_study", "run_dir", "eval_key", "load_run_state", "StudyInterrupted"]

class StudyInterrupted(RectiflowError):
    """Ctrl-C / SIGTERM reached a training run: its checkpoint and the study state are written."""


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for every key where a run's saved config `old` and the config the spec now
    gives `new` (both resolved dicts) differ, compared as this rectiflow reads them (train.resume's
    config_changes: defaults filled in for fields added since, values normalised, e.g. an old "" shift is
    None now), except train.steps (a constant-schedule run may go on), train.progress (display only) and
    fields this rectiflow no longer has (they cannot change the run)."""
    from rectiflow.train.config import config_from_dict
    from rectiflow.train.resume import config_changes as changed

    known = config_to_dict(RunConfig())
    old = {s: {k: v for k, v in vals.items() if k in known[s]} for s, vals in old.items() if s in known}
    try:
        diffs = changed(old, config_from_dict(new))
    except ConfigError as e:  # a value this version refuses: the run cannot be continued as it was
        return [f"{e}"]
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs if k not in ("train.steps", "train.progress")]


class _RunLock:
    """`study-run.lock` (the owner's pid) in a run folder while a process trains or scores it, so that two
    `rectiflow study` processes (e.g. one per --only group on a machine with cores to spare) never work on
    the same run; a lock whose process is gone is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / "study-run.lock"
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    return False
                self.path.unlink(missing_ok=True)  # a dead owner's lock
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def _owner_alive(self) -> bool:
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return False
        if pid <= 0 or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _latest_step(ckpt_dir: Path) -> int:
    from rectiflow.train.checkpoint import find_latest

    latest = find_latest(ckpt_dir)
    return int(latest.name.rsplit("-", 1)[-1]) if latest is not None else 0


def _trained_config(ckpt_dir: Path) -> dict[str, Any] | None:
    """The resolved config saved beside the newest checkpoint (None without one)."""
    from rectiflow.train.checkpoint import find_latest

    latest = find_latest(ckpt_dir)
    if latest is None or not (latest / "config.json").is_file():
        return None
    return json.loads((latest / "config.json").read_text())


# ---- budget ----------------------------------------------------------------------------------------------


def _calibrate(spec: StudySpec, variant: Variant, seed: int, where: Path) -> float:
    """Training CPU seconds per step of this variant (process CPU time, all threads), measured over
    spec.calibration_steps plain training steps after two warm-up steps, in a scratch folder."""
    from rectiflow.train.trainer import Trainer

    scratch = where / "calibration"
    cfg = spec.run_config(variant, seed, scratch, spec.calibration_steps + 2)
    cfg = cfg.replace(validation={"every": 0}, checkpoint={"every": 0}, export={"bundle": False})
    try:
        trainer = Trainer(cfg)
        for _ in range(2):
            trainer.train_step()
        c0 = time.process_time()
        for _ in range(spec.calibration_steps):
            trainer.train_step()
        per_step = (time.process_time() - c0) / spec.calibration_steps
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return per_step


def _planned_steps(spec: StudySpec, variant: Variant, seed: int, state: dict[str, Any], where: Path,
                   dry_run: bool) -> int | None:
    if spec.budget_samples is not None:
        return spec.steps_for_samples(variant)
    calib = state.get("calibration")
    if calib is None:
        if dry_run:
            return None
        per_step = _calibrate(spec, variant, seed, where)
        calib = state["calibration"] = {"cpu_s_per_step": per_step, "steps": spec.calibration_steps,
                                        "threads": _threads()}
        log.info("%s seed %d: %.3f CPU s per training step (calibration)", variant.name, seed, per_step)
    assert spec.budget_cpu_minutes is not None
    return max(1, math.floor(spec.budget_cpu_minutes * 60 / calib["cpu_s_per_step"]))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- one run ---------------------------------------------------------------------------------------------


def _val_loss(train_dir: Path, step: int) -> float | None:
    """The newest validation loss (mean over timestep buckets) logged at or before `step`."""
    f = train_dir / "logs" / "metrics.jsonl"
    if not f.is_file():
        return None
    best = None
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if row.get("kind") == "val" and row.get("step", 0) <= step and "loss" in row and \
                (best is None or row["step"] >= best[0]):
            best = (row["step"], row["loss"])
    return None if best is None else float(best[1])


def _score(bundle: Path, cfg: RunConfig, ev: EvalSettings, out: Path) -> dict[str, Any]:
    """The shapes-world benchmark of one bundle with the variant's sampler settings."""
    import torch

    from rectiflow.eval.shapes_eval import evaluate_shapes
    from rectiflow.sample.pipeline import DEFAULT, Pipeline

    pipe = Pipeline.from_bundle(bundle, device=cfg.train.device, dtype=torch.float32)
    path = getattr(pipe, "flow_path", None)
    trained = cfg.flow.path
    if (path.name if path is not None else "rectified_flow") != trained:
        raise RectiflowError(f"{bundle} samples as {getattr(path, 'name', 'rectified_flow')!r} but was "
                             f"trained on flow.path={trained!r}; this build's bundles do not record the flow "
                             "path, so its scores would be wrong")
    shift: Any = DEFAULT if ev.shift is None else (None if ev.shift == "none" else ev.shift)
    return evaluate_shapes(pipe, steps=ev.steps, sampler=ev.sampler, shift=shift, cfg_scale=ev.cfg,
                           size=ev.size, splits=ev.splits, out_dir=out, limit=ev.limit,
                           batch_prompts=ev.batch_prompts, progress=False)


def _train_to(cfg: RunConfig, step: int, state: dict[str, Any]) -> bool:
    """Train (resuming) up to `step`, export the bundle there; record the segment. False if interrupted."""
    from rectiflow.train.trainer import Trainer

    train_dir = Path(cfg.train.out_dir)
    done = _latest_step(train_dir / "checkpoints")
    trainer = Trainer(cfg)
    if done:
        trainer.resume(None)
    if done < step:
        c0, w0 = time.process_time(), time.perf_counter()
        result = trainer.fit(stop_at=step)
        state.setdefault("segments", []).append({
            "from": done, "to": result["step"], "cpu_s": round(time.process_time() - c0, 3),
            "wall_s": round(time.perf_counter() - w0, 3), "threads": _threads()})
        if result["interrupted"]:
            return False
        if result["step"] < cfg.train.steps:
            trainer.export()
    else:
        trainer.export()  # trained to `step` before (e.g. interrupted while scoring): the bundle again
    state["exported_step"] = step
    return True


def train_cost(state: dict[str, Any], steps: int) -> tuple[float, float]:
    """(training CPU s, wall s) of the first `steps` steps: measured mean per step x steps."""
    segs = [s for s in state.get("segments", []) if s["to"] > s["from"]]
    n = sum(s["to"] - s["from"] for s in segs)
    if not n:
        return 0.0, 0.0
    return (sum(s["cpu_s"] for s in segs) / n * steps, sum(s["wall_s"] for s in segs) / n * steps)


def _run(spec: StudySpec, variant: Variant, seed: int, dry_run: bool, say: Callable[[str], None]
         ) -> dict[str, Any]:
    where = run_dir(spec, variant, seed)
    if dry_run:
        return _run_locked(spec, variant, seed, where, True, say)
    lock = _RunLock(where)
    if not lock.acquire():
        say(f"{variant.name} seed {seed}: another process is working on it (skipped)")
        return load_run_state(where)
    try:
        return _run_locked(spec, variant, seed, where, False, say)
    finally:
        lock.release()


def _run_locked(spec: StudySpec, variant: Variant, seed: int, where: Path, dry_run: bool,
                say: Callable[[str], None]) -> dict[str, Any]:
    state = load_run_state(where)
    steps = _planned_steps(spec, variant, seed, state, where, dry_run)
    label = f"{variant.name} seed {seed}"
    if steps is None:
        say(f"{label}: new; calibrate, then train {spec.budget_text()} and score")
        return state
    cfg = spec.run_config(variant, seed, where / "train", steps)
    trained = _trained_config(where / "train" / "checkpoints")
    changed = config_changes(trained, config_to_dict(cfg)) if trained is not None else []
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise ConfigError(f"{where} holds a run of another config ({changed[0]}{more}); delete that folder "
                          "or set study.out to a new directory")
    done = _latest_step(where / "train" / "checkpoints")
    if state.get("steps") not in (None, steps) and done and cfg.optim.schedule != "constant":
        raise ConfigError(f"{where} was trained toward {state['steps']} steps, the budget now asks for "
                          f"{steps}; its {cfg.optim.schedule} learning-rate schedule depends on that, so set "
                          "study.out to a new directory (or use optim.schedule = \"constant\")")
    state.pop("fingerprint", None)  # written by the first version of this module
    state.update(variant=variant.name, seed=seed, steps=steps,
                 batch_size=cfg.data.batch_size, flow_path=cfg.flow.path)
    key = eval_key(variant.eval)
    scored = state.setdefault("evals", {}).setdefault(key, {})
    state.setdefault("eval_settings", {})[key] = variant.eval.scoring()
    todo = [m for m in milestones(steps, variant.eval.at) if str(m) not in scored]
    if dry_run:
        status = "done" if not todo else (f"at step {done}" if done else "new")
        say(f"{label}: {status}; {steps} steps x batch {cfg.data.batch_size}; "
            f"score at steps {todo or 'none left'} ({variant.eval.steps} sampling steps); {where}")
        return state
    if not todo:
        say(f"{label}: done (skipped)")
        return state
    for m in todo:
        if done > m:
            log.warning("%s: trained to step %d already; step %d cannot be scored any more", label, done, m)
            continue
        say(f"{label}: training to step {m} of {steps}")
        ok = _train_to(cfg, m, state)
        save_run_state(where, state)
        if not ok:
            raise StudyInterrupted(f"interrupted in {label}; its checkpoint is written: rerun the same "
                                   "command to continue")
        done = m
        say(f"{label}: scoring step {m}")
        c0, w0 = time.process_time(), time.perf_counter()
        out = where / "eval" / f"step-{m}-{key}"
        report = _score(where / "train" / "export" / "bundle", cfg, variant.eval, out)
        cpu_s, wall_s = train_cost(state, m)
        scored[str(m)] = {
            "step": m, "samples": m * cfg.data.batch_size, "train_cpu_s": round(cpu_s, 2),
            "train_wall_s": round(wall_s, 2), "val_loss": _val_loss(where / "train", m),
            "eval_cpu_s": round(time.process_time() - c0, 2),
            "eval_wall_s": round(time.perf_counter() - w0, 2),
            "settings": report["settings"], "report": str(out.relative_to(spec.out)),
            "results": {split: {n: {"overall": s["overall"], "per_task": {t: v["accuracy"] for t, v in
                                                                           s["per_task"].items()}}
                                for n, s in by_steps.items()}
                        for split, by_steps in report["results"].items()},
        }
        save_run_state(where, state)
        say(f"{label}: step {m}: " + ", ".join(f"{split} {n} steps {s['overall']:.3f}"
                                              for split, by in report["results"].items()
                                              for n, s in by.items()))
    return state


def plan_study(spec: StudySpec, only: Sequence[str] | None = None) -> list[Variant]:
    """The variants to run: all, or those named in `only` (an unknown name is an error)."""
    if not only:
        return list(spec.variants)
    names = [v.name for v in spec.variants]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only names {unknown[0]!r}, which is not a variant of {spec.name}; variants: "
                          f"{', '.join(names)}")
    return [v for v in spec.variants if v.name in only]


def run_study(spec: StudySpec, *, only: Sequence[str] | None = None, dry_run: bool = False,
              say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run (or with dry_run, only list) every variant x seed, then write the report; returns its summary
    (None for a dry run). Runs go variant by variant, seed by seed, in the spec's order."""
    from rectiflow.eval.study_report import summarize, write_report

    variants = plan_study(spec, only)
    say(f"study {spec.name}: {len(variants)} variants x {len(spec.seeds)} seeds, {spec.budget_text()}, "
        f"out {spec.out}")
    for v in variants:
        for seed in spec.seeds:
            _run(spec, v, seed, dry_run, say)
    if dry_run:
        return None
    summary = summarize(spec)
    paths = write_report(spec, summary)
    say(f"report: {', '.join(str(p) for p in paths)}")
    return summary

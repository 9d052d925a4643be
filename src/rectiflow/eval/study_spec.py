"""Study specs (`rectiflow study SPEC.toml`): a base run config, a compute budget per run, seeds, evaluation
settings and variants (config overrides), validated up front so that a typo stops the study before any run.

    [study]
    name = "formulations"
    base = "../configs/shapes.toml"        # the run config every variant starts from (relative to the spec)
    out = "runs/studies/formulations"      # where runs and the report go (relative to the working directory)
    seeds = [0, 1]                         # train.seed of each run; every variant runs once per seed

    [overrides]                            # config overrides for every variant, as config tables
    optim.schedule = "constant"

    [budget]                               # exactly one of:
    samples = 320000                       #   training samples per run (train.steps = samples / batch size)
    # cpu_minutes = 30                     #   training CPU minutes per run (steps from a short calibration)

    [eval]                                 # the shapes-world benchmark (rectiflow.eval.shapes_eval)
    steps = [5, 25]                        # sampling step counts
    at = [0.5, 1.0]                        # fractions of the budget at which each run is scored
    cfg = 3.0                              # also: sampler, shift ("none", "flux", a number), size, splits,
                                           # limit (prompts per task; 0 = all), batch_prompts

    [[variants]]
    name = "rf/lognorm(0.00,1.00)"
    flow.timesteps = "logit_normal"        # any config key, as in a config file
    flow.timestep_params = {m = 0.0, s = 1.0}
    eval.shift = 3                         # the variant's own sampler settings override [eval]'s

Every mistake is a one-line ConfigError: unknown tables or keys, a variant overriding a config key that does
not exist, a missing or doubled budget, duplicate variant names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rectiflow.errors import ConfigError
from rectiflow.train.config import RunConfig, apply_overrides, config_from_dict, config_to_dict

try:  # py3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - py3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["EvalSettings", "Variant", "StudySpec", "load_spec", "spec_from_dict", "slug"]

TOP_LEVEL = ("study", "overrides", "budget", "eval", "variants")
STUDY_KEYS = ("name", "description", "base", "out", "seeds")
BUDGET_KEYS = ("samples", "cpu_minutes", "calibration_steps")
EVAL_KEYS = ("steps", "at", "splits", "limit", "cfg", "sampler", "shift", "size", "batch_prompts")
VARIANT_EVAL_KEYS = ("cfg", "sampler", "shift")  # a formulation's own sampler settings
VARIANT_KEYS = ("name", "description", "eval")


def slug(name: str) -> str:
    """A variant name as a folder name: rf/lognorm(0.00,1.00) -> rf-lognorm-0.00-1.00."""
    s = re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-.")
    return s or "variant"


@dataclass(frozen=True)
class EvalSettings:
    """How a run is scored; `shift` as the CLI takes it: None (the model's default), "none", "flux" or an
    SD3 alpha. limit None = every prompt of the protocol."""

    steps: tuple[int, ...] = (5, 25)
    at: tuple[float, ...] = (1.0,)
    splits: tuple[str, ...] = ("seen", "held_out")
    limit: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    shift: str | float | None = None
    size: int | None = None
    batch_prompts: int = 16

    def scoring(self) -> dict[str, Any]:
        """The settings that make two evaluations comparable (the key of stored results)."""
        return {"steps": list(self.steps), "splits": list(self.splits), "limit": self.limit, "cfg": self.cfg,
                "sampler": self.sampler, "shift": self.shift, "size": self.size}


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, dict[str, Any]]  # config section -> key -> value
    eval: EvalSettings
    description: str = ""
    config: RunConfig = field(default_factory=RunConfig, repr=False)  # resolved for seed 0 (validated)

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass(frozen=True)
class StudySpec:
    name: str
    base: Path
    out: Path
    seeds: tuple[int, ...]
    base_config: dict[str, Any]  # the base TOML with [overrides] applied, as nested dicts
    budget_samples: int | None
    budget_cpu_minutes: float | None
    calibration_steps: int
    eval: EvalSettings
    variants: tuple[Variant, ...]
    description: str = ""
    source: Path | None = None

    def run_config(self, variant: Variant, seed: int, out_dir: Path, steps: int) -> RunConfig:
        """The resolved config of one run: base, the variant's overrides, the seed, its folder and steps.
        Runs write only the bundle at the end (the study scores it) and no TensorBoard files."""
        d = _merge(self.base_config, variant.overrides)
        d.setdefault("train", {}).update(seed=seed, out_dir=str(out_dir), steps=steps, progress=False)
        d.setdefault("export", {}).update(formats=[], bundle=True)
        d.setdefault("logging", {}).update(tensorboard=False)
        return config_from_dict(d)

    def steps_for_samples(self, variant: Variant) -> int:
        assert self.budget_samples is not None
        return max(1, math.ceil(self.budget_samples / variant.config.data.batch_size))

    def budget_text(self) -> str:
        if self.budget_samples is not None:
            return f"{self.budget_samples:,} training samples per run"
        return f"{self.budget_cpu_minutes:g} training CPU minutes per run"


def _merge(base: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of `base` with the overrides' keys replaced (a table value replaces the whole value, e.g.
    flow.timestep_params = {m = 0.5, s = 0.6} drops the base's other parameters)."""
    d = {k: dict(v) for k, v in base.items()}
    for section, values in overrides.items():
        d.setdefault(section, {}).update(values)
    return d


def _table(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a table, got {d!r}")
    return d


def _no_unknown(d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(allowed)}")


def _config_tables(d: Any, where: str) -> dict[str, dict[str, Any]]:
    """Config overrides as section -> key -> value; a key that is not a config key is an error."""
    d = _table(d, where)
    defaults = config_to_dict(RunConfig())
    for section, values in d.items():
        if section not in defaults:
            raise ConfigError(f"{where} overrides unknown config section {section!r}; sections: "
                              f"{', '.join(defaults)}")
        values = _table(values, f"{where} {section}")
        for key in values:
            if key not in defaults[section]:
                raise ConfigError(f"{where} overrides {section}.{key}, which is not a config key; valid keys "
                                  f"in [{section}]: {', '.join(defaults[section])}")
    return {s: dict(v) for s, v in d.items()}


def _positive_ints(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or any(not isinstance(x, int) or isinstance(x, bool) or x < 1
                                               for x in v):
        raise ConfigError(f"{where} must be a non-empty list of integers >= 1, got {v!r}")
    return tuple(dict.fromkeys(v))


def _eval_settings(d: dict[str, Any], base: EvalSettings | None, where: str, allowed: tuple[str, ...]
                   ) -> EvalSettings:
    from rectiflow.eval.shapes import normalize_split

    d = _table(d, where)
    _no_unknown(d, allowed, where)
    kw: dict[str, Any] = {}
    if "steps" in d:
        kw["steps"] = _positive_ints(d["steps"], f"{where} steps")
    if "at" in d:
        at = d["at"]
        if not isinstance(at, list) or not at or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                      or not 0 < x <= 1 for x in at):
            raise ConfigError(f"{where} at must be a non-empty list of budget fractions in (0, 1], "
                              f"got {at!r}")
        kw["at"] = tuple(sorted({float(x) for x in at}))
    if "splits" in d:
        if not isinstance(d["splits"], list) or not d["splits"]:
            raise ConfigError(f"{where} splits must be a non-empty list (seen, held_out), "
                              f"got {d['splits']!r}")
        kw["splits"] = tuple(dict.fromkeys(normalize_split(str(s)) for s in d["splits"]))
    if "limit" in d:
        lim = d["limit"]
        if not isinstance(lim, int) or isinstance(lim, bool) or lim < 0:
            raise ConfigError(f"{where} limit must be an integer >= 0 (0 = every prompt), got {lim!r}")
        kw["limit"] = lim or None
    if "cfg" in d:
        if isinstance(d["cfg"], bool) or not isinstance(d["cfg"], (int, float)) or d["cfg"] < 0:
            raise ConfigError(f"{where} cfg must be a number >= 0, got {d['cfg']!r}")
        kw["cfg"] = float(d["cfg"])
    if "sampler" in d:
        from rectiflow.flow import METHODS

        if d["sampler"] not in METHODS:
            raise ConfigError(f"{where} sampler {d['sampler']!r}; choose one of {', '.join(METHODS)}")
        kw["sampler"] = d["sampler"]
    if "shift" in d:
        kw["shift"] = _shift(d["shift"], where)
    for key in ("size", "batch_prompts"):
        if key in d:
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (key == "size" and v % 16):
                what = "a positive multiple of 16" if key == "size" else "a positive integer"
                raise ConfigError(f"{where} {key} must be {what}, got {v!r}")
            kw[key] = v
    if base is None:
        return EvalSettings(**kw)
    return EvalSettings(**{**base.__dict__, **kw})


def _shift(v: Any, where: str) -> str | float:
    if isinstance(v, str) and v in ("none", "flux"):
        return v
    if not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0:
        return float(v)
    raise ConfigError(f"{where} shift must be \"none\", \"flux\" or an SD3 alpha > 0, got {v!r}")


def spec_from_dict(d: dict[str, Any], source: Path | None = None) -> StudySpec:
    """A validated StudySpec from the parsed TOML (`source`: the spec file, for relative base paths)."""
    from rectiflow.train.config import load_config

    _no_unknown(d, TOP_LEVEL, "the study spec")
    study = _table(d.get("study", {}), "[study]")
    _no_unknown(study, STUDY_KEYS, "[study]")
    for key in ("name", "base", "out"):
        if not isinstance(study.get(key), str) or not study[key]:
            raise ConfigError(f"[study] {key} is missing; set it to a string (see rectiflow.eval.study_spec)")
    seeds = study.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or isinstance(s, bool)
                                                       for s in seeds):
        raise ConfigError(f"[study] seeds must be a non-empty list of integers, got {seeds!r}")
    base = Path(study["base"])
    if not base.is_absolute() and source is not None:
        base = source.parent / base
    base_dict = config_to_dict(load_config(base))  # a missing or bad base config: its own one-line error
    overrides = _config_tables(d.get("overrides", {}), "[overrides]")
    base_dict = _merge(base_dict, overrides)

    if "budget" not in d:
        raise ConfigError("[budget] is missing; set samples = N (training samples per run) or "
                          "cpu_minutes = M (training CPU minutes per run)")
    budget = _table(d["budget"], "[budget]")
    _no_unknown(budget, BUDGET_KEYS, "[budget]")
    samples, minutes = budget.get("samples"), budget.get("cpu_minutes")
    given = sorted(k for k in budget if k != "calibration_steps")
    if (samples is None) == (minutes is None):
        raise ConfigError("[budget] needs exactly one of samples (training samples per run) or cpu_minutes "
                          f"(training CPU minutes per run); got {given or 'neither'}")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
        raise ConfigError(f"[budget] samples must be a positive integer, got {samples!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or minutes <= 0):
        raise ConfigError(f"[budget] cpu_minutes must be a positive number, got {minutes!r}")
    calib = budget.get("calibration_steps", 20)
    if not isinstance(calib, int) or isinstance(calib, bool) or calib < 3:
        raise ConfigError(f"[budget] calibration_steps must be an integer >= 3, got {calib!r}")

    ev = _eval_settings(d.get("eval", {}), None, "[eval]", EVAL_KEYS)
    raw_variants = d.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ConfigError("the spec has no [[variants]]; add at least one (name = \"...\" and its config "
                          "keys)")
    variants, names = [], set()
    for i, v in enumerate(raw_variants):
        v = _table(v, f"[[variants]] #{i + 1}")
        name = v.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"[[variants]] #{i + 1} has no name; set name = \"...\"")
        where = f"variant {name!r}"
        if name in names or slug(name) in {slug(n) for n in names}:
            raise ConfigError(f"{where} appears twice (names must differ, also as folder names)")
        names.add(name)
        desc = v.get("description", "")
        tables = {k: x for k, x in v.items() if k not in VARIANT_KEYS}
        variant_over = _config_tables(tables, where)
        variant_eval = _eval_settings(v.get("eval", {}), ev, f"{where} eval", VARIANT_EVAL_KEYS)
        try:
            cfg = config_from_dict(_merge(base_dict, variant_over))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        variants.append(Variant(name=name, overrides=variant_over, eval=variant_eval, description=str(desc),
                                config=cfg))
    return StudySpec(name=study["name"], base=base, out=Path(study["out"]), seeds=tuple(dict.fromkeys(seeds)),
                     base_config=base_dict, budget_samples=samples,
                     budget_cpu_minutes=float(minutes) if minutes is not None else None,
                     calibration_steps=calib, eval=ev, variants=tuple(variants),
                     description=str(study.get("description", "")), source=source)


def load_spec(path: str | Path, sets: list[str] | None = None) -> StudySpec:
    """Read and validate a spec; `sets` are `table.key=value` changes of the spec itself (as `rectiflow
    train` overrides), e.g. ["budget.samples=20000", "study.seeds=[0]", "eval.limit=4"]."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study spec {p} not found; pass a TOML file such as studies/formulations.toml")
    try:
        d = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
    if sets:
        d = apply_overrides(d, sets)
    return spec_from_dict(d, source=p)

"""`rectiflow study SPEC.toml [--only NAME ...] [--dry-run] [--set table.key=value ...]`: equal-compute
experiments (rectiflow.eval.study)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="train and score variants of a config at equal compute (studies/*.toml)",
        description="Run every variant of a study spec (studies/*.toml) once per seed as a `rectiflow train` "
        "run with the same budget, score each with the shapes-world benchmark, and write study.md / "
        "study.json and plots of score against CPU time under the spec's study.out. Rerunning the same "
        "command resumes: finished runs are skipped, interrupted ones continue from their checkpoints.")
    p.add_argument("spec", help="study spec TOML (see studies/ and docs/studies.md)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this variant (repeatable); the report still lists all")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the spec and list each run's state and plan; train nothing")
    p.add_argument("--set", action="append", default=[], metavar="table.key=value", dest="sets",
                   help="change the spec, e.g. --set budget.samples=20000 --set study.seeds=[0]")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from rectiflow.eval.study import StudyInterrupted, run_study
    from rectiflow.eval.study_spec import load_spec

    spec = load_spec(args.spec, args.sets)
    try:
        run_study(spec, only=args.only, dry_run=args.dry_run)
    except StudyInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    return 0

"""histotoken grid: run a study (models x tasks x train domains x seeds) and report it."""

from __future__ import annotations

from histotoken.cli.common import add_command

DESCRIPTION = """\
Run every combination of a study file: models x tasks x train domains x seeds (or folds).
One patient-disjoint split per seed/fold is made once and shared by every run, so runs are
comparable; each run is evaluated on every test domain (in-domain and cross-domain, on the
same test patients). Efficiency (latency, throughput, memory, FLOPs, tokens) is measured once
per model, side by side in one process. Writes STUDY_DIR/results.csv (one row per run x test
domain x metric) and STUDY_DIR/report.html.

Re-running the same command skips finished runs and resumes an interrupted one; a run that
fails is recorded with its error and the grid goes on. --dry-run lists what would run.

Study files shipped with histotoken (see configs/): demo.yaml, magnification_study.yaml,
token_efficiency_study.yaml.

Examples:
  histotoken grid configs/magnification_study.yaml --data ~/data/BreaKHis --out studies/mag
  histotoken grid configs/magnification_study.yaml --data ~/data/BreaKHis --out studies/mag --dry-run
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "grid", "run a study grid and write its report", DESCRIPTION)
    parser.add_argument("spec", metavar="SPEC.yaml", help="study file (see configs/)")
    parser.add_argument("--out", required=True, metavar="STUDY_DIR", help="study folder to write (or resume)")
    parser.add_argument("--data", metavar="DATA_ROOT", help="data root (overrides the file's 'data:')")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    parser.add_argument("--no-report", action="store_true", help="skip building report.html at the end")
    return parser


def run(args) -> int:
    from histotoken.experiments.grid import run_grid
    from histotoken.experiments.spec import expand, load_spec

    spec = load_spec(resolve_spec_path(args.spec), args.data)
    if args.dry_run:
        outcome = run_grid(spec, args.out, dry_run=True)
        print(outcome.runs.to_string(index=False))
        counts = outcome.runs["state"].value_counts()
        print("\n" + ", ".join(f"{n} {state}" for state, n in counts.items()) + f" of {len(outcome.runs)} runs")
        return 0

    print(f"study {spec.name}: {len(expand(spec))} runs -> {args.out}", flush=True)
    outcome = run_grid(spec, args.out, build_report=not args.no_report, on_run=print_run)
    return print_outcome(outcome)


def print_run(number, total, run, state) -> None:
    action = "already done" if state == "done" else ("resuming" if state == "partial" else "running")
    print(f"[{number}/{total}] {run.run_id}: {action}", flush=True)


def print_outcome(outcome) -> int:
    """Failed runs, then where the results and the report are; exit status 1 if a run failed."""
    failed = outcome.runs[outcome.runs["status"] == "failed"]
    for row in failed.itertuples():
        print(f"FAILED {row.run_id}: {row.error}")
    print(f"\nresults: {outcome.results_csv}")
    if outcome.report:
        print(f"report:  {outcome.report}  (open it in a browser; it is one self-contained file)")
    return 1 if len(failed) else 0


def resolve_spec_path(text: str):
    """A path, or the name of a study file shipped with histotoken (e.g. demo.yaml)."""
    from pathlib import Path

    path = Path(text)
    if path.is_file():
        return path
    shipped = Path(__file__).resolve().parent.parent / "configs" / path.name
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"study file {text} does not exist (shipped ones: demo.yaml, magnification_study.yaml, token_efficiency_study.yaml)")

"""histotoken grid: run a study (models x tasks x train domains x seeds) and report it."""

from __future__ import annotations

from histotoken.cli.common import DATA_FORMAT_CHOICES, add_command

DESCRIPTION = """\
Run every combination of a study file: models x tasks x train domains x seeds (or folds).
One patient-disjoint split per seed/fold is made once and shared by every run, so runs are
comparable; each run is evaluated on every test domain (in-domain and cross-domain, on the
same test patients). Efficiency (latency, throughput, memory, FLOPs, tokens) is measured once
per model, side by side in one process. Writes STUDY_DIR/results.csv (one row per run x test
domain x metric) and STUDY_DIR/report.html.

Re-running the same command skips finished runs and resumes an interrupted one; a run that
fails is recorded with its error and the grid goes on; Ctrl-C or SIGTERM stops the grid.
--dry-run lists what would run.

Clusters and several machines:
  --launcher slurm       one SLURM job per pending run (a job array through submitit); partition,
                         time and memory from the spec's `launcher:` block or the flags below; GPUs
                         and CPUs per task, unless given, what a node of the partition has (sinfo:
                         1 GPU if it has any, 8 CPUs or fewer). `launcher: {python: PATH}` picks the
                         nodes' interpreter. Waits and collects, or returns at once with --no-wait.
                         A job at its time limit saves its run and requeues itself (at most
                         --max-requeues times); the requeued job resumes from the last epoch. Jobs
                         are polled with squeue: a cancelled job is seen within 10 s, and a grid whose
                         jobs ended before their runs started exits 1 naming those runs.
  --launcher submitit-local   the same jobs as local processes, --parallel at a time (default 2).
  --shard I/N            run only runs I, I+N, I+2N, ... of the run list sorted by run id
                         (0 <= I < N), e.g. one Kubernetes indexed job or one machine each.
  Any number of such workers may share one study folder (on a shared file system): a run is
  claimed atomically (RUN_DIR/claim.json) before it is worked on, so it is trained once; a claim
  whose worker died is taken over after --claim-timeout-min without a heartbeat (sooner on the
  same host once its process is gone). When every worker has ended, rebuild the tables and the
  report with --collect.

Study files shipped with histotoken (see configs/): demo.yaml, magnification_study.yaml,
token_efficiency_study.yaml, cifar10_tokenlearner.yaml, cifar10_pruning.yaml.

Examples:
  histotoken grid configs/magnification_study.yaml --data ~/data/BreaKHis --out studies/mag
  histotoken grid configs/magnification_study.yaml --data ~/data/BreaKHis --out studies/mag --dry-run
  histotoken grid configs/magnification_study.yaml --out studies/mag --launcher slurm --partition gpu --no-wait
  histotoken grid configs/magnification_study.yaml --out studies/mag --shard 2/8    # worker 2 of 8
  histotoken grid configs/magnification_study.yaml --out studies/mag --collect      # tables + report
"""


def add_parser(subparsers):
    parser = add_command(subparsers, "grid", "run a study grid and write its report", DESCRIPTION)
    parser.add_argument("spec", metavar="SPEC.yaml", help="study file (see configs/)")
    parser.add_argument("--out", required=True, metavar="STUDY_DIR", help="study folder to write (or resume)")
    parser.add_argument("--data", metavar="DATA_ROOT", help="data root (overrides the file's 'data:')")
    parser.add_argument("--data-format", choices=DATA_FORMAT_CHOICES,
                        help="kind of data folder (overrides the file's 'data_format:'; default auto-detected)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    parser.add_argument("--no-report", action="store_true", help="skip building report.html at the end")
    parser.add_argument("--launcher", choices=("local", "slurm", "submitit-local"), default="local",
                        help="where runs execute (default local: one after another in this process)")
    parser.add_argument("--shard", metavar="I/N", help="run only this worker's share of the runs (0 <= I < N)")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rebuild runs.csv, results.csv and the report from the run folders")
    parser.add_argument("--no-wait", action="store_true", help="slurm: return once the jobs are submitted")
    cluster = parser.add_argument_group("job resources (override the spec's launcher: block)")
    cluster.add_argument("--partition", help="SLURM partition")
    cluster.add_argument("--gpus-per-task", type=int, metavar="N",
                         help="GPUs per run (default: 1 if the partition's nodes have GPUs (sinfo), else 0)")
    cluster.add_argument("--timeout-min", type=int, metavar="MIN", help="time limit per run (default 1440)")
    cluster.add_argument("--mem-gb", type=float, metavar="GB", help="memory per run")
    cluster.add_argument("--cpus-per-task", type=int, metavar="N",
                         help="CPU cores per run (default: 8, or all of a smaller node's; 2 when sinfo is absent)")
    cluster.add_argument("--parallel", type=int, metavar="N",
                         help="runs at once (slurm: array parallelism; submitit-local: default 2)")
    cluster.add_argument("--claim-timeout-min", type=float, metavar="MIN",
                         help="a claim without a heartbeat for this long is taken over (default 10)")
    cluster.add_argument("--max-requeues", type=int, metavar="N",
                         help="slurm: how often a run's job may requeue itself at its time limit (default 3)")
    return parser


def run(args) -> int:
    from histotoken.experiments.grid import collect_study, run_grid
    from histotoken.experiments.launch import launcher_settings, parse_shard, shard_runs
    from histotoken.experiments.spec import expand, load_spec

    spec_path = resolve_spec_path(args.spec)
    spec = load_spec(spec_path, args.data, args.data_format)
    shard = parse_shard(args.shard) if args.shard else None
    overrides = {
        "partition": args.partition, "gpus_per_task": args.gpus_per_task, "timeout_min": args.timeout_min,
        "mem_gb": args.mem_gb, "cpus_per_task": args.cpus_per_task, "parallel": args.parallel,
        "claim_timeout_min": args.claim_timeout_min, "max_requeues": args.max_requeues,
    }
    settings = launcher_settings(spec.launcher, overrides, str(spec_path))
    if args.collect:
        print(f"collecting study {spec.name} from {args.out}/runs", flush=True)
        return print_outcome(collect_study(spec, args.out, build_report=not args.no_report), signal_exit=False)
    if args.dry_run:
        outcome = run_grid(spec, args.out, dry_run=True, shard=shard, claim_timeout_s=settings.claim_timeout_s)
        print(outcome.runs.to_string(index=False))
        counts = outcome.runs["state"].value_counts()
        print("\n" + ", ".join(f"{n} {state}{RESUMABLE.get(state, '')}" for state, n in counts.items())
              + f" of {len(outcome.runs)} runs")
        return 0
    if args.no_wait and args.launcher != "slurm":
        raise ValueError("--no-wait needs --launcher slurm (local runs are processes of this command)")

    runs = shard_runs(expand(spec), shard)
    share = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"study {spec.name}: {len(runs)} runs{share} -> {args.out}", flush=True)
    if args.launcher != "local":
        return launch(spec, args, runs, settings)
    outcome = run_grid(
        spec, args.out, build_report=not args.no_report, on_run=print_run, shard=shard,
        collect=shard is None, claim_timeout_s=settings.claim_timeout_s,
    )
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]} done. When every shard has ended:\n  {collect_command(args)}")
        return 1 if (outcome.runs["status"] == "failed").any() else 0
    return print_outcome(outcome)


def launch(spec, args, runs, settings) -> int:
    """Submit the pending runs as submitit jobs; wait and collect, or print how to collect later."""
    from histotoken.experiments.grid import collect_study, prepare_study, run_state
    from histotoken.experiments.launch import launch_runs

    prepare_study(spec, args.out)  # splits exist before any job starts
    states = {run.run_id: run_state(args.out, run, spec, settings.claim_timeout_s) for run in runs}
    pending = [run for run in runs if states[run.run_id] not in ("done", "claimed")]
    print(f"{len(runs) - len(pending)} runs done or claimed elsewhere; submitting {len(pending)} "
          f"({args.launcher})", flush=True)
    ended = {}

    def on_done(item, result, error) -> None:
        ended[item.run.run_id] = (item.job_id, error)
        what = error or (result["outcome"] + (f": {result['error']}" if result.get("error") else ""))
        print(f"[{len(ended)}/{len(pending)}] job {item.job_id} {item.run.run_id}: {what}", flush=True)

    submitted = launch_runs(
        spec, args.out, pending, args.launcher, settings, wait=not args.no_wait,
        on_submit=lambda item: print(f"submitted job {item.job_id}: {item.run.run_id}", flush=True),
        on_done=on_done, on_stuck=lambda item, message: print(f"STUCK {message}", flush=True),
    )
    if args.no_wait:
        print(f"\n{len(submitted)} jobs submitted (logs in {args.out}/submitit). When they have ended:\n"
              f"  {collect_command(args)}")
        return 0
    outcome = collect_study(spec, args.out, build_report=not args.no_report)
    code = print_outcome(outcome)
    did_not_run = did_not_run_lines(outcome.runs, ended, settings, args.out)
    for line in did_not_run:
        print(line)
    return 1 if did_not_run else code


def did_not_run_lines(runs, ended: dict, settings, study_dir) -> list[str]:
    """One line per submitted run that is still pending (never started) after its job ended, with the job's end."""
    lines = []
    for row in runs[runs["status"] == "pending"].itertuples():
        if row.run_id not in ended:
            continue
        job_id, error = ended[row.run_id]
        how = (error or "ended").split(":")[0]
        hint = "re-run the same command to submit it again"
        if how.startswith("TIMEOUT"):
            hint = (f"the time limit (--timeout-min {settings.timeout_min}) ended it before the run started: "
                    "give it more time")
        lines.append(f"DID NOT RUN {row.run_id}: job {job_id} {how} before the run started "
                     f"(log: {study_dir}/submitit/{job_id}); {hint}")
    return lines


RESUMABLE = {"partial": " (resumable)", "interrupted": " (resumable)"}


def collect_command(args) -> str:
    """The --collect command for this study, with every option it needs to find the same spec and data."""
    import shlex

    words = ["histotoken", "grid", args.spec, "--out", str(args.out)]
    if args.data:
        words += ["--data", args.data]
    if args.data_format:
        words += ["--data-format", args.data_format]
    if args.no_report:
        words.append("--no-report")
    return shlex.join([*words, "--collect"])


def print_run(number, total, run, state) -> None:
    action = "already done" if state == "done" else ("resuming" if state in RESUMABLE else "running")
    print(f"[{number}/{total}] {run.run_id}: {action}", flush=True)


def print_outcome(outcome, signal_exit: bool = True) -> int:
    """Failed and interrupted runs, then where the results and the report are.

    Exit status: 1 if a run failed; else, with ``signal_exit``, 128 + the signal that interrupted a
    run (130 SIGINT, 143 SIGTERM), as the grid itself exits when it is interrupted; else 0.
    """
    failed = outcome.runs[outcome.runs["status"] == "failed"]
    for row in failed.itertuples():
        print(f"FAILED {row.run_id}: {row.error}")
    interrupted = outcome.runs[outcome.runs["status"] == "interrupted"]
    for row in interrupted.itertuples():
        print(f"INTERRUPTED {row.run_id}: {row.error or 'its worker stopped'}; re-run the same command to resume it")
    print(f"\nresults: {outcome.results_csv}")
    if outcome.report:
        from histotoken.reporting.report import describe_report

        print(f"report:  {describe_report(outcome.report)}")
    if len(failed):
        return 1
    if signal_exit and len(interrupted):
        return interruption_exit_code(interrupted["error"])
    return 0


def interruption_exit_code(errors) -> int:
    """128 + the signal named in an interrupted run's error ("RunInterrupted: received SIGINT"); SIGTERM's if none."""
    import re
    import signal

    for error in errors:
        found = re.search(r"received (SIG[A-Z0-9]+)", str(error))
        if found and found.group(1) in signal.Signals.__members__:
            return 128 + signal.Signals[found.group(1)]
    return 128 + signal.SIGTERM


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

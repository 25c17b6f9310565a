"""Run a study: one frozen split per seed/fold, one run folder per (model, task, domain, seed).

Resumable: finished runs are skipped, an interrupted run resumes from its last.ckpt, a run that
fails is recorded with its error (in its own status.json) and the grid goes on; an interrupted
run (Ctrl-C, SIGTERM) stops the grid.

Several workers may share one study folder (processes on one machine, machines on a shared file
system, SLURM array tasks, shards): each run is claimed atomically before it is worked on
(:mod:`histotoken.experiments.locks`) and writes only inside its own folder. The study tables
(runs.csv, results.csv) are rebuilt from the run folders by :func:`collect_study` (``histotoken
grid SPEC --collect``, and the end of an unsharded local grid), written atomically, never appended.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from histotoken import formats
from histotoken.experiments import locks
from histotoken.experiments.spec import PlannedRun, StudySpec, dump_spec, expand, model_label
from histotoken.formats import RunPaths, StudyPaths
from histotoken.io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)
RESULT_METRICS = formats.RESULT_METRICS
RESULT_COLUMNS = list(formats.RESULT_COLUMNS)
RUNS_COLUMNS = list(formats.RUNS_COLUMNS)


@dataclasses.dataclass
class GridOutcome:
    study_dir: Path
    runs: pd.DataFrame
    results_csv: Path
    report: Path | None


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What one worker did with one run: ran, failed, done (already), or claimed (by another worker)."""

    run_id: str
    outcome: str
    error: str | None = None


def run_state(study_dir: Path, run: PlannedRun, spec: StudySpec,
              claim_timeout_s: float = locks.DEFAULT_STALE_AFTER_S) -> str:
    """done (trained and evaluated on every test domain), claimed (another worker holds it),
    failed, interrupted (stopped by a signal; resumable), partial (resumable), or pending."""
    paths = RunPaths(StudyPaths(Path(study_dir)).run_dir(run.run_id))
    if locks.active_claim(paths.root, claim_timeout_s) is not None:
        return "claimed"
    return _folder_state(paths, spec)


def _folder_state(paths: RunPaths, spec: StudySpec) -> str:
    """What the run folder says, whoever holds its claim: done, failed, interrupted, partial or pending."""
    if not paths.status.is_file():
        return "pending"
    state = read_json(paths.status).get("state")
    if state == formats.STATE_FINISHED:
        missing = [d for d in spec.test_domains if not paths.eval_file(d).is_file()]
        return "partial" if missing else "done"
    if state == formats.STATE_INTERRUPTED:
        return "interrupted"
    return "failed" if state == formats.STATE_FAILED else "partial"


def check_study_folder(study_dir: Path, spec: StudySpec) -> None:
    """A study folder belongs to one spec: refuse to run a different one into it."""
    existing = StudyPaths(study_dir).spec
    if existing.is_file():
        old = yaml.safe_load(existing.read_text())
        new = yaml.safe_load(dump_spec(spec))
        shared = ("data", "tasks", "seeds", "folds", "split", "protocol")
        changed = [k for k in shared if old.get(k) != new.get(k)]
        if changed:
            raise ValueError(
                f"{study_dir} holds a study with a different {', '.join(changed)}; its runs would not be "
                "comparable. Use a new --out folder (models and domains may be added to an existing study)."
            )


def prepare_splits(spec: StudySpec, study_dir: Path, index: pd.DataFrame) -> dict[str, Path]:
    """One frozen patient-disjoint split per seed or fold, shared by every run of the study."""
    from histotoken.data.splits import make_split, write_split

    needed = sorted({(run.split_name, run.seed, run.fold) for run in expand(spec)}, key=str)
    paths = {}
    for split_name, seed, fold in needed:
        path = StudyPaths(study_dir).split_file(split_name)
        if not path.is_file():
            base = spec.base_config()
            split = make_split(
                index, base.split_scheme, base.val_fraction, base.test_fraction,
                spec.folds, fold or 0, seed,
            )
            write_split(split, path)
        paths[split_name] = path
    return paths


def describe_dataset(spec: StudySpec, study_dir: Path, result) -> dict[str, Any]:
    """dataset.json: data root, synthetic or not, images and patients per class x magnification."""
    from histotoken.data.breakhis import is_synthetic

    frame = result.frame
    counts = (
        frame.groupby(["tumor_class", "magnification"])
        .agg(n_images=("path", "size"), n_patients=("patient_id", "nunique"))
        .reset_index()
    )
    info = {
        "data_root": spec.data,
        "data_format": getattr(result, "data_format", None),  # the detected source (words the report uses)
        "synthetic": is_synthetic(spec.data),
        "n_images": int(len(frame)),
        "n_patients": int(frame["patient_id"].nunique()),
        "n_skipped": len(result.skipped),
        "counts": counts.to_dict(orient="records"),
    }
    atomic_write_json(StudyPaths(study_dir).dataset, info)
    return info


def check_domains_exist(spec: StudySpec, frame: pd.DataFrame) -> None:
    """Magnification domains need data with magnifications (BreakHis); elsewhere only 'all' applies."""
    from histotoken.data.breakhis import MAGNIFICATIONS

    named = sorted({d for d in (*spec.train_domains, *spec.test_domains) if d != "all"})
    if named and not frame["magnification"].isin(MAGNIFICATIONS).any():
        raise ValueError(
            f"study {spec.name} names magnification domains {named}, but {spec.data} has no magnifications "
            "(only BreakHis does); set train_domains: [all] and test_domains: [all] in the spec"
        )


def prepare_study(spec: StudySpec, study_dir: str | Path) -> dict[str, Path]:
    """spec.yaml, dataset.json and the frozen splits; safe to repeat from several workers at once
    (each file is written atomically, with the same content). Returns split name -> path."""
    study_dir = Path(study_dir)
    check_study_folder(study_dir, spec)
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(StudyPaths(study_dir).spec, dump_spec(spec))
    from histotoken.data.index import load_index

    index = load_index(spec.data, data_format=spec.data_format, groups=spec.groups)  # one scan for the study
    check_domains_exist(spec, index.frame)
    describe_dataset(spec, study_dir, index)
    split_paths = prepare_splits(spec, study_dir, index.frame)
    check_domains_in_splits(spec, split_paths)
    return split_paths


def check_domains_in_splits(spec: StudySpec, split_paths: dict[str, Path]) -> None:
    """Before any training: every train domain has train and validation images, and every test
    domain has test images, in every split of the study (one error naming all that are missing)."""
    from histotoken.data.domains import select_domain
    from histotoken.data.splits import read_split

    problems = []
    for split_name, path in sorted(split_paths.items()):
        split = read_split(path)
        wanted = [(side, domain) for domain in spec.train_domains for side in ("train", "val")]
        wanted += [("test", domain) for domain in spec.test_domains]
        for side, domain in wanted:
            try:
                select_domain(split[split["split"] == side], domain, f"the {side} split")
            except ValueError as error:
                problems.append(f"{split_name}: {error}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(
            f"study {spec.name}: nothing was trained, because {shown}. Change train_domains/test_domains "
            f"in the spec to domains the data has, or the split fractions (split files: {Path(next(iter(split_paths.values()))).parent})"
        )


def run_grid(
    spec: StudySpec,
    study_dir: str | Path,
    dry_run: bool = False,
    build_report: bool = True,
    on_run: Callable[[int, int, PlannedRun, str], None] | None = None,
    shard: tuple[int, int] | None = None,
    collect: bool = True,
    claim_timeout_s: float = locks.DEFAULT_STALE_AFTER_S,
) -> GridOutcome:
    """Train and evaluate every planned run (of ``shard``) that is not done, then collect and report.

    With ``collect=False`` (what shards and cluster jobs use) the study tables are not rebuilt;
    ``histotoken grid SPEC --collect`` does it once every worker has ended.
    """
    from histotoken.experiments.launch import shard_runs

    study_dir = Path(study_dir)
    runs = shard_runs(expand(spec), shard)
    if dry_run:
        table = pd.DataFrame(
            [{"run_id": r.run_id, "state": run_state(study_dir, r, spec, claim_timeout_s)} for r in runs]
        )
        return GridOutcome(study_dir, table, StudyPaths(study_dir).results_table, None)

    split_paths = prepare_study(spec, study_dir)
    for number, run in enumerate(runs, start=1):
        state = run_state(study_dir, run, spec, claim_timeout_s)
        if on_run is not None:
            on_run(number, len(runs), run, state)
        if state not in ("done", "claimed"):
            execute_run(spec, study_dir, run, split_paths[run.split_name], claim_timeout_s)
    if not collect:
        return GridOutcome(study_dir, runs_table(spec, study_dir), StudyPaths(study_dir).results_table, None)
    return collect_study(spec, study_dir, build_report=build_report)


def execute_run(
    spec: StudySpec, study_dir: Path, run: PlannedRun, splits_csv: Path,
    claim_timeout_s: float = locks.DEFAULT_STALE_AFTER_S,
    claim_token: str | None = None, claim_details: dict[str, Any] | None = None,
) -> RunOutcome:
    """Claim one run, train/evaluate it unless it is done, release it.

    A KeyboardInterrupt (or any BaseException, such as the engine's interruption on SIGTERM) is
    re-raised after the claim is released, so the caller stops instead of moving on.
    ``claim_token``/``claim_details``: see :func:`locks.claim_run` (a requeued SLURM job's own claim).
    """
    run_dir = StudyPaths(Path(study_dir)).run_dir(run.run_id)
    claim = locks.claim_run(run_dir, claim_timeout_s, token=claim_token, details=claim_details)
    if claim is None:
        logger.info("%s is claimed by another worker; skipping it", run.run_id)
        return RunOutcome(run.run_id, "claimed")
    try:
        # finished while we were claiming (our own claim is not "another worker"): no attempt to record
        if _folder_state(RunPaths(run_dir), spec) == "done":
            return RunOutcome(run.run_id, "done")
        locks.record_attempt(claim)
        with locks.heartbeat(claim, claim_timeout_s):
            error = _train_and_evaluate(spec, study_dir, run, splits_csv)
        return RunOutcome(run.run_id, "failed" if error else "ran", error)
    finally:
        locks.release(claim)


def _train_and_evaluate(spec: StudySpec, study_dir: Path, run: PlannedRun, splits_csv: Path) -> str | None:
    """Train (or resume) one run and evaluate it on every test domain; return an error text or None.

    The error is also written into the run's status.json, so runs.csv can be rebuilt from the folder.
    """
    from histotoken.engine.evaluate import evaluate_run
    from histotoken.engine.fit import train

    paths = RunPaths(StudyPaths(study_dir).run_dir(run.run_id))
    try:
        if paths.status.is_file() and read_json(paths.status).get("state") == formats.STATE_FAILED:
            logger.info("retrying %s, which failed before", run.run_id)
        config = run.config(spec, splits_csv)
        if run.probe:  # frozen features + a scikit-learn probe: the path of `train --probe`
            from histotoken.features.probe import ProbeSettings, evaluate_probe, train_probe

            train_probe(config, paths.root, ProbeSettings(kind=run.probe), img_size=config.img_size)
            evaluate = evaluate_probe
        else:
            train(config, paths.root, progress_bar=False)
            evaluate = evaluate_run
        for domain in spec.test_domains:
            if not paths.eval_file(domain).is_file():
                evaluate(paths.root, domain, n_bootstrap=config.bootstrap)
        if spec.explain and not run.probe:  # a probe keeps no network weights to explain
            from histotoken.explain.run import explain_after_evaluation

            explain_after_evaluation(paths.root, spec.explain, default_domain=run.train_domain)
        _record_error(paths, None)
        return None
    except Exception as error:  # one failing run must not stop the study
        if paths.status.is_file() and read_json(paths.status).get("state") == formats.STATE_INTERRUPTED:
            raise  # the engine was interrupted (e.g. SIGTERM): stop the grid
        logger.error("run %s failed: %s", run.run_id, error)
        logger.debug("%s", traceback.format_exc())
        text = f"{type(error).__name__}: {error}"
        _record_error(paths, text)
        return text


def _record_error(paths: RunPaths, error: str | None) -> None:
    """Merge the grid's error into status.json (state failed unless training had finished)."""
    status = read_json(paths.status) if paths.status.is_file() else {}
    if error is None and not status.get("error"):
        return
    changes: dict[str, Any] = {"error": error}
    if error is not None and status.get("state") != formats.STATE_FINISHED:
        changes["state"] = formats.STATE_FAILED
    atomic_write_json(paths.status, {**status, **changes})


def run_record(study_dir: Path, run: PlannedRun, spec: StudySpec,
               claim_timeout_s: float = locks.DEFAULT_STALE_AFTER_S) -> dict[str, Any]:
    """One runs.csv row, from the plan and the run's own folder (status.json, eval files, claim).

    status: finished (trained and evaluated on every test domain), failed (with the error),
    pending (never started), running (claimed by a live worker), interrupted, or partial.
    """
    paths = RunPaths(StudyPaths(study_dir).run_dir(run.run_id))
    status = read_json(paths.status) if paths.status.is_file() else {}
    state, error = status.get("state"), status.get("error") or ""
    claimed = locks.active_claim(paths.root, claim_timeout_s) is not None
    if claimed:
        text = "running"
    elif state == formats.STATE_INTERRUPTED:  # stopped by a signal (its error says which); resumable
        text = "interrupted"
    elif error or state == formats.STATE_FAILED:
        text = "failed"
    elif not status:
        text = "pending"
    elif state == formats.STATE_FINISHED:
        missing = [d for d in spec.test_domains if not paths.eval_file(d).is_file()]
        text = "partial" if missing else "finished"
    elif state == formats.STATE_RUNNING:  # no live claim: its worker died
        text = "interrupted"
    else:
        text = str(state)
    return {
        "run_id": run.run_id,
        "model": run.label(spec),
        "model_name": run.model.name,
        "model_kwargs": json.dumps(run.model.kwargs_dict, sort_keys=True),
        "task": run.task,
        "train_domain": run.train_domain,
        "seed": run.seed if run.fold is None else run.fold,
        "status": text,
        "error": error,
        "run_dir": f"{formats.RUNS_DIR}/{run.run_id}",
    }


def runs_table(spec: StudySpec, study_dir: str | Path) -> pd.DataFrame:
    """runs.csv's content: one row per planned run, read from the run folders."""
    study_dir = Path(study_dir)
    return pd.DataFrame([run_record(study_dir, run, spec) for run in expand(spec)], columns=RUNS_COLUMNS)


def collect_study(spec: StudySpec, study_dir: str | Path, build_report: bool = True,
                  efficiency: bool = True) -> GridOutcome:
    """Rebuild runs.csv and results.csv from the run folders; measure efficiency; build the report."""
    study_dir = Path(study_dir)
    paths = StudyPaths(study_dir)
    if not paths.spec.is_file():
        raise FileNotFoundError(f"{study_dir} is not a study folder (no {formats.SPEC_FILE}); run "
                                "`histotoken grid SPEC --out STUDY_DIR` first")
    check_study_folder(study_dir, spec)
    records = runs_table(spec, study_dir)
    atomic_write_text(paths.runs_table, records.to_csv(index=False))
    if efficiency:
        trained = {model_label(label) for label in records.loc[records["status"] == "finished", "model"]}
        measure_efficiency(spec, study_dir, [m for m in spec.models if m.label in trained])
    results_csv = collect_results(study_dir)
    report = None
    if build_report:
        from histotoken.reporting.report import build_report as make_report

        report = make_report(study_dir)
    return GridOutcome(study_dir, records, results_csv, report)


def collect_tables(study_dir: str | Path) -> pd.DataFrame:
    """Rebuild runs.csv and results.csv of a study folder from its run folders and its own spec.yaml
    (what ``histotoken report`` does first); returns the runs table."""
    from histotoken.experiments.spec import spec_from_dict

    paths = StudyPaths(Path(study_dir))
    if not paths.spec.is_file():
        raise FileNotFoundError(f"{study_dir} has no {formats.SPEC_FILE}: it was not written by `histotoken grid`")
    raw = yaml.safe_load(paths.spec.read_text(encoding="utf-8"))
    spec = spec_from_dict(raw, str(paths.spec))
    return collect_study(spec, paths.root, build_report=False, efficiency=False).runs


def measure_efficiency(spec: StudySpec, study_dir: Path, models: list | None = None) -> Path | None:
    """Benchmark the study's models once, side by side in one process, at the study's image size.

    Measured again only when the set of models changed. A failure here is logged and leaves the
    report without efficiency columns; it does not fail the study.
    """
    from histotoken.engine.benchmark import benchmark_models, write_benchmark

    models = list(spec.models if models is None else models)
    out = StudyPaths(study_dir).efficiency_table
    labels = [m.label for m in models]
    if not labels:
        return None
    if out.is_file() and sorted(pd.read_csv(out)["model"]) == sorted(labels):
        return out
    base = spec.base_config()
    settings = {"batch_size": 16, "rounds": 3, **spec.efficiency}
    num_classes = _largest_class_count(spec)
    logger.info("measuring efficiency of %d models at %d px", len(models), base.img_size)
    try:
        rows = benchmark_models(
            models, img_size=base.img_size, num_classes=num_classes,
            precision=settings.pop("precision", base.precision), **settings,
        )
    except Exception as error:  # noqa: BLE001 - efficiency is an addition to the results, not a reason to fail
        logger.error("efficiency measurement failed: %s", error)
        return None
    write_benchmark(rows, out)
    return out


def _largest_class_count(spec: StudySpec) -> int:
    """Classes of the study's largest task (the head size barely changes the cost; it must exist)."""
    from histotoken.data.sources import task_classes

    try:
        return max(len(task_classes(task, spec.data, spec.data_format)[0]) for task in spec.tasks)
    except (FileNotFoundError, ValueError):  # data not reachable here (e.g. collected elsewhere)
        return 2 if spec.tasks == ("binary",) else 8


def collect_results(study_dir: str | Path) -> Path:
    """Tidy results.csv from every run's eval/*.json (one row per run x test domain x metric)."""
    study_dir = Path(study_dir)
    runs = pd.read_csv(StudyPaths(study_dir).runs_table, dtype=str, keep_default_na=False)
    rows = []
    for run in runs.itertuples():
        for eval_file in sorted(RunPaths(study_dir / run.run_dir).eval_dir.glob("*.json")):
            if formats.is_variant_evaluation(eval_file):  # extra evaluations, e.g. test-time token merging
                continue
            result = read_json(eval_file)
            for metric in RESULT_METRICS:
                low, high = ((result.get("ci95") or {}).get(metric) or [None, None])  # null: --bootstrap 0
                rows.append(
                    {
                        "run_id": run.run_id, "model": run.model, "task": run.task,
                        "train_domain": run.train_domain, "test_domain": result["domain"], "seed": run.seed,
                        "metric": metric, "value": result[metric], "ci_low": low, "ci_high": high,
                    }
                )
    out = StudyPaths(study_dir).results_table
    atomic_write_text(out, pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(index=False))
    return out

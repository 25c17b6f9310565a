"""Run a study: one frozen split per seed/fold, one run folder per (model, task, domain, seed).

Resumable: finished runs are skipped, an interrupted run resumes from its last.ckpt, a run that
fails is recorded with its error and the grid goes on. Results are collected from the run
folders' eval files into STUDY_DIR/results.csv (tidy), written atomically.
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

from histotoken.experiments.spec import PlannedRun, StudySpec, dump_spec, expand
from histotoken.io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)
RESULT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "patient_accuracy")
RESULT_COLUMNS = [
    "run_id", "model", "task", "train_domain", "test_domain", "seed", "metric", "value", "ci_low", "ci_high",
]
RUNS_COLUMNS = ["run_id", "model", "model_name", "model_kwargs", "task", "train_domain", "seed", "status", "error", "run_dir"]


@dataclasses.dataclass
class GridOutcome:
    study_dir: Path
    runs: pd.DataFrame
    results_csv: Path
    report: Path | None


def run_state(study_dir: Path, run: PlannedRun, spec: StudySpec) -> str:
    """done (trained and evaluated on every test domain), partial, failed, or pending."""
    run_dir = study_dir / "runs" / run.run_id
    status_file = run_dir / "status.json"
    if not status_file.is_file():
        return "pending"
    state = read_json(status_file).get("state")
    if state == "finished":
        missing = [d for d in spec.test_domains if not (run_dir / "eval" / f"{d}.json").is_file()]
        return "partial" if missing else "done"
    return "failed" if state == "failed" else "partial"


def check_study_folder(study_dir: Path, spec: StudySpec) -> None:
    """A study folder belongs to one spec: refuse to run a different one into it."""
    existing = study_dir / "spec.yaml"
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
        path = study_dir / "splits" / f"{split_name}.csv"
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
        "synthetic": is_synthetic(spec.data),
        "n_images": int(len(frame)),
        "n_patients": int(frame["patient_id"].nunique()),
        "n_skipped": len(result.skipped),
        "counts": counts.to_dict(orient="records"),
    }
    atomic_write_json(study_dir / "dataset.json", info)
    return info


def run_grid(
    spec: StudySpec,
    study_dir: str | Path,
    dry_run: bool = False,
    build_report: bool = True,
    on_run: Callable[[int, int, PlannedRun, str], None] | None = None,
) -> GridOutcome:
    """Train and evaluate every planned run that is not done, then collect results and report."""
    study_dir = Path(study_dir)
    runs = expand(spec)
    if dry_run:
        table = pd.DataFrame(
            [{"run_id": r.run_id, "state": run_state(study_dir, r, spec)} for r in runs]
        )
        return GridOutcome(study_dir, table, study_dir / "results.csv", None)

    check_study_folder(study_dir, spec)
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study_dir / "spec.yaml", dump_spec(spec))
    from histotoken.data.index import load_index

    index = load_index(spec.data)  # one scan of the data folder for the whole study
    describe_dataset(spec, study_dir, index)
    split_paths = prepare_splits(spec, study_dir, index.frame)
    records = []
    for number, run in enumerate(runs, start=1):
        state = run_state(study_dir, run, spec)
        if on_run is not None:
            on_run(number, len(runs), run, state)
        error = None
        if state != "done":
            error = _train_and_evaluate(spec, study_dir, run, split_paths[run.split_name])
        records.append(_run_record(study_dir, run, error))
        atomic_write_text(study_dir / "runs.csv", pd.DataFrame(records, columns=RUNS_COLUMNS).to_csv(index=False))
    trained = {r["model"] for r in records if r["status"] == "finished"}
    measure_efficiency(spec, study_dir, [m for m in spec.models if m.label in trained])
    results_csv = collect_results(study_dir)
    report = None
    if build_report:
        from histotoken.reporting.report import build_report as make_report

        report = make_report(study_dir)
    return GridOutcome(study_dir, pd.DataFrame(records, columns=RUNS_COLUMNS), results_csv, report)


def _train_and_evaluate(spec: StudySpec, study_dir: Path, run: PlannedRun, splits_csv: Path) -> str | None:
    """Train (or resume) one run and evaluate it on every test domain; return an error text or None."""
    from histotoken.engine.evaluate import evaluate_run
    from histotoken.engine.fit import train

    run_dir = study_dir / "runs" / run.run_id
    try:
        status_file = run_dir / "status.json"
        if status_file.is_file() and read_json(status_file).get("state") == "failed":
            logger.info("retrying %s, which failed before", run.run_id)
        config = run.config(spec, splits_csv)
        train(config, run_dir, progress_bar=False)
        for domain in spec.test_domains:
            if not (run_dir / "eval" / f"{domain}.json").is_file():
                evaluate_run(run_dir, domain, n_bootstrap=config.bootstrap)
        return None
    except KeyboardInterrupt:
        raise
    except Exception as error:  # one failing run must not stop the study
        logger.error("run %s failed: %s", run.run_id, error)
        logger.debug("%s", traceback.format_exc())
        return f"{type(error).__name__}: {error}"


def _run_record(study_dir: Path, run: PlannedRun, error: str | None) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "model": run.model.label,
        "model_name": run.model.name,
        "model_kwargs": json.dumps(run.model.kwargs_dict, sort_keys=True),
        "task": run.task,
        "train_domain": run.train_domain,
        "seed": run.seed if run.fold is None else run.fold,
        "status": "failed" if error else "finished",
        "error": error or "",
        "run_dir": f"runs/{run.run_id}",
    }


def measure_efficiency(spec: StudySpec, study_dir: Path, models: list | None = None) -> Path | None:
    """Benchmark the study's models once, side by side in one process, at the study's image size.

    Measured again only when the set of models changed. A failure here is logged and leaves the
    report without efficiency columns; it does not fail the study.
    """
    from histotoken.engine.benchmark import benchmark_models, write_benchmark

    models = list(spec.models if models is None else models)
    out = study_dir / "efficiency.csv"
    labels = [m.label for m in models]
    if not labels:
        return None
    if out.is_file() and sorted(pd.read_csv(out)["model"]) == sorted(labels):
        return out
    base = spec.base_config()
    settings = {"batch_size": 16, "rounds": 3, **spec.efficiency}
    num_classes = 2 if spec.tasks == ("binary",) else 8
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


def collect_results(study_dir: str | Path) -> Path:
    """Tidy results.csv from every run's eval/*.json (one row per run x test domain x metric)."""
    study_dir = Path(study_dir)
    runs = pd.read_csv(study_dir / "runs.csv", dtype=str, keep_default_na=False)
    rows = []
    for run in runs.itertuples():
        for eval_file in sorted((study_dir / run.run_dir / "eval").glob("*.json")):
            if "__" in eval_file.stem:  # extra evaluations, e.g. test-time token merging
                continue
            result = read_json(eval_file)
            for metric in RESULT_METRICS:
                low, high = (result.get("ci95", {}).get(metric) or [None, None])
                rows.append(
                    {
                        "run_id": run.run_id, "model": run.model, "task": run.task,
                        "train_domain": run.train_domain, "test_domain": result["domain"], "seed": run.seed,
                        "metric": metric, "value": result[metric], "ci_low": low, "ci_high": high,
                    }
                )
    out = study_dir / "results.csv"
    atomic_write_text(out, pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(index=False))
    return out

"""Statistics a reviewer accepts, read from the files evaluation writes: the report's front to :mod:`histotoken.stats`.

Every number (metrics from confusion matrices, patient resampling with class strata, pooled
intervals across seeds/folds, paired differences, McNemar's exact test) comes from
:mod:`histotoken.stats`, the one statistics module that evaluation, slide prediction and
explanations also use: an interval means the same thing in every table (``docs/statistics.md``).
This module adds only the reading of ``eval/<domain>.predictions.csv`` files.

Three kinds of numbers, and which one a table shows is always stated:

* **One run on one test domain**: the point value and the 95% patient-bootstrap interval written
  by evaluation.
* **Across seeds or folds**: the mean and standard deviation (ddof=1) of the per-seed values
  (:func:`seed_spread`), and a **pooled interval** (:func:`pooled_interval`): each resample draws
  patients within each fold/seed, recomputes each fold's metric and averages them.
* **Paired comparison of A and B** (:func:`paired_difference`): the same resampled patients for A
  and B; the difference A - B, its interval, the share of resamples in which A is ahead, and
  McNemar's exact test for accuracy on the same images.

A difference is **resolved** at this sample size when its interval excludes zero
(:func:`is_resolved`); the report states a direction only then.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from histotoken.formats import PREDICTION_COLUMNS, PROBABILITY_PREFIX, RunPaths
from histotoken.stats import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    Difference,
    Predictions,
    Spread,
    align,
    is_resolved,
    mcnemar_exact,
    metric_values,
    paired_difference,
    pooled_interval,
    seed_spread,
)

__all__ = [
    "CONFIDENCE", "DEFAULT_RESAMPLES", "Difference", "Predictions", "Spread", "align", "is_resolved",
    "mcnemar_exact", "metric_values", "num_classes_of", "paired_difference", "pooled_interval",
    "predictions_from_frame", "read_predictions", "seed_spread",
]


def predictions_from_frame(frame: pd.DataFrame) -> Predictions:
    """From an ``eval/<domain>.predictions.csv`` frame (columns ``PREDICTION_COLUMNS``)."""
    import numpy as np

    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"a predictions table lacks the column(s) {missing} (see docs/formats.md)")
    return Predictions(
        np.array(frame["target"], dtype=np.int64), np.array(frame["prediction"], dtype=np.int64),
        np.array(frame["patient_id"].astype(str)), np.array(frame["path"].astype(str)),
    )


def read_predictions(run_dir: str | Path, domain: str) -> Predictions | None:
    """A run's ``eval/<domain>.predictions.csv``, or None when it has none."""
    path = RunPaths(Path(run_dir)).predictions_file(domain)
    if not path.is_file():
        return None
    text = {"patient_id": str, "path": str}  # a patient "NA" stays "NA"
    return predictions_from_frame(pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""]))


def num_classes_of(path: str | Path) -> int | None:
    """Number of classes from a predictions file's ``prob/<class>`` columns (None if it has none)."""
    header = pd.read_csv(path, nrows=0).columns
    count = sum(str(column).startswith(PROBABILITY_PREFIX) for column in header)
    return count or None


def evaluation_notes(study, in_domain_only: bool = False) -> list[str]:
    """"run_id on domain: note" for every note the study's evaluations wrote (``notes`` in
    ``eval/<domain>.json``: few test patients per class, degenerate intervals), in run order.

    ``study`` is a :class:`histotoken.reporting.study.StudyFiles`; with ``in_domain_only``, only
    evaluations on the run's own train domain.
    """
    from histotoken.formats import EVAL_NOTES, is_variant_evaluation
    from histotoken.reporting.tables import read_json_if_present

    info = study.run_info()
    lines = []
    for run_id, folder in study.run_folders():
        train_domain = str(info.get(run_id, {}).get("train_domain", ""))
        for path in sorted(RunPaths(folder).eval_dir.glob("*.json")):
            if is_variant_evaluation(path):
                continue
            evaluation = read_json_if_present(path)
            if not isinstance(evaluation, dict):
                continue
            domain = str(evaluation.get("domain", path.stem))
            if in_domain_only and domain != train_domain:
                continue
            lines += [f"{run_id} on {domain}: {note}" for note in evaluation.get(EVAL_NOTES) or []]
    return lines


def notes_blocks(study, in_domain_only: bool = False, shown: int = 12) -> list:
    """Report blocks for :func:`evaluation_notes`: a Note with the first ``shown``, all of them in a table."""
    from histotoken.reporting.blocks import Details, Note, Table

    lines = evaluation_notes(study, in_domain_only)
    if not lines:
        return []
    more = f"; and {len(lines) - shown} more (table below)" if len(lines) > shown else ""
    blocks: list = [Note(
        f"{len(lines)} evaluation note(s): these numbers rest on too little to support them: "
        + "; ".join(lines[:shown]) + more + "."
    )]
    if len(lines) > shown:
        blocks.append(Details("Every evaluation note", [Table(pd.DataFrame({"note": lines}))]))
    return blocks

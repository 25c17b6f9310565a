"""The study's comparisons, computed from the runs' per-image predictions files.

Which runs exist comes from ``runs.csv`` (finished runs only); each run's predictions on a test
domain come from ``RUN_DIR/eval/<domain>.predictions.csv``. Runs of two models are paired seed
by seed (the same seed or fold means the same frozen split, hence the same test patients).
Every function returns a numeric frame; :mod:`histotoken.reporting.sections.statistics` turns
them into text. A comparison whose predictions files are missing is left out (the section says so).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from histotoken.formats import HEADLINE_METRICS, RunPaths
from histotoken.reporting import statistics as st
from histotoken.reporting import tables
from histotoken.reporting.study import StudyFiles

logger = logging.getLogger(__name__)

DIFFERENCE_COLUMNS = (
    "a", "b", "difference", "low", "high", "share_a_better", "n_folds", "n_patients",
    "mcnemar_p", "a_only_correct", "b_only_correct",
)


class StudyPredictions:
    """Finished runs of a study by (model, task, train domain) and seed, with their predictions."""

    def __init__(self, study: StudyFiles, n_resamples: int = st.DEFAULT_RESAMPLES):
        self.study = study
        self.n_resamples = n_resamples
        self.runs: dict[tuple[str, str, str], dict[str, Path]] = {}
        self._predictions: dict[tuple[Path, str], st.Predictions | None] = {}
        self._compared: dict[tuple, dict[str, st.Difference] | None] = {}
        info = study.run_info()
        for run_id, folder in study.run_folders():
            row = info.get(run_id, {})
            if str(row.get("status", "finished")) != "finished" or "model" not in row:
                continue
            key = (str(row["model"]), str(row["task"]), str(row["train_domain"]))
            self.runs.setdefault(key, {})[str(row.get("seed", ""))] = folder

    def predictions(self, folder: Path, domain: str) -> st.Predictions | None:
        """A run's predictions on a test domain (read once), or None."""
        if (folder, domain) not in self._predictions:
            try:
                found = st.read_predictions(folder, domain)
            except (OSError, ValueError, KeyError) as error:
                logger.warning("cannot read the predictions of %s on %s: %s", folder, domain, error)
                found = None
            self._predictions[(folder, domain)] = found
        return self._predictions[(folder, domain)]

    def num_classes(self, task: str) -> int | None:
        """From the class names an evaluation of this task wrote (or a predictions file's columns)."""
        for (_, run_task, _), seeds in self.runs.items():
            if run_task != task:
                continue
            for folder in seeds.values():
                for path in sorted(RunPaths(folder).eval_dir.glob("*.json")):
                    evaluation = tables.read_json_if_present(path)
                    if isinstance(evaluation, dict) and evaluation.get("class_names"):
                        return len(evaluation["class_names"])
                for path in sorted(RunPaths(folder).eval_dir.glob("*.predictions.csv")):
                    return st.num_classes_of(path)
        return None

    def folds(self, model: str, task: str, train_domain: str, test_domain: str) -> dict[str, st.Predictions]:
        """seed -> predictions of the model's run(s) trained on ``train_domain``, on ``test_domain``."""
        found = {}
        for seed, folder in self.runs.get((model, task, train_domain), {}).items():
            predictions = self.predictions(folder, test_domain)
            if predictions is not None:
                found[seed] = predictions
        return found

    def compare(self, a: tuple[str, str, str], b: tuple[str, str, str], task: str,
                same_images: bool) -> dict[str, st.Difference] | None:
        """A - B, each side (model, train domain, test domain), paired over their common seeds.

        ``same_images``: both sides were tested on the same domain; their images are aligned by path.
        Computed once per pair (the summary and the statistics section quote the same numbers).
        """
        key = (a, b, task, same_images)
        if key not in self._compared:
            self._compared[key] = self._compare(a, b, task, same_images)
        return self._compared[key]

    def _compare(self, a: tuple[str, str, str], b: tuple[str, str, str], task: str,
                 same_images: bool) -> dict[str, st.Difference] | None:
        side_a, side_b = self.folds(a[0], task, a[1], a[2]), self.folds(b[0], task, b[1], b[2])
        seeds = sorted(set(side_a) & set(side_b))
        num_classes = self.num_classes(task)
        if not seeds or num_classes is None:
            return None
        pairs = []
        for seed in seeds:
            pair = (side_a[seed], side_b[seed])
            if same_images and pair[0].paths is not None and pair[1].paths is not None:
                pair = st.align(*pair)
            pairs.append(pair)
        try:
            return st.paired_difference(pairs, num_classes, self.n_resamples, seed=0)
        except ValueError as error:
            logger.warning("cannot compare %s with %s: %s", a, b, error)
            return None


def _difference_row(keys: dict, differences: dict[str, st.Difference]) -> list[dict]:
    rows = []
    for metric in HEADLINE_METRICS:
        difference = differences[metric]
        rows.append({**keys, "metric": metric, **{c: getattr(difference, c) for c in DIFFERENCE_COLUMNS}})
    return rows


def _frame(rows: list[dict], keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*keys, "metric", *DIFFERENCE_COLUMNS])


def reference_differences(data: StudyPredictions, reference: str, task: str) -> pd.DataFrame:
    """Every other model minus the reference model, per train x test cell, on the same test images."""
    summary = data.study.summary[data.study.summary["task"] == task]
    keys = ["model", "train_domain", "test_domain"]
    rows = []
    cells = tables.ordered_unique(zip(summary["train_domain"], summary["test_domain"]))
    for model in tables.ordered_unique(summary["model"]):
        if model == reference:
            continue
        for train_domain, test_domain in sorted(cells, key=lambda c: (tables.domain_sort_key(c[0]),
                                                                      tables.domain_sort_key(c[1]))):
            found = data.compare((model, train_domain, test_domain), (reference, train_domain, test_domain),
                                 task, same_images=True)
            if found:
                rows += _difference_row(dict(zip(keys, (model, train_domain, test_domain))), found)
    return _frame(rows, keys)


def asymmetry_differences(data: StudyPredictions, task: str) -> pd.DataFrame:
    """For single magnifications low < high trained and tested both ways, per model:
    (train high -> test low) - (train low -> test high), paired over the same test patients."""
    summary = data.study.summary[data.study.summary["task"] == task]
    singles = [d for d in tables.sort_domains(summary["train_domain"])
               if tables.is_single_magnification(d) and d in set(summary["test_domain"])]
    keys = ["model", "low_domain", "high_domain"]
    rows = []
    for model in tables.ordered_unique(summary["model"]):
        for i, low in enumerate(singles):
            for high in singles[i + 1:]:
                found = data.compare((model, high, low), (model, low, high), task, same_images=False)
                if found:
                    rows += _difference_row({"model": model, "low_domain": low, "high_domain": high}, found)
    return _frame(rows, keys)


def mixed_gain_differences(data: StudyPredictions, task: str) -> pd.DataFrame:
    """For each mixed train domain M and each single magnification d in M that was also trained on
    alone, per model: (train M -> test d) - (train d -> test d), on the same test images."""
    summary = data.study.summary[data.study.summary["task"] == task]
    train_domains = set(summary["train_domain"])
    test_domains = set(summary["test_domain"])
    keys = ["model", "mixed_domain", "test_domain"]
    rows = []
    for model in tables.ordered_unique(summary["model"]):
        for mixed in (d for d in tables.sort_domains(train_domains) if tables.is_mixed(d)):
            for single in mixed.split("+"):
                if single not in train_domains or single not in test_domains:
                    continue
                found = data.compare((model, mixed, single), (model, single, single), task, same_images=True)
                if found:
                    rows += _difference_row({"model": model, "mixed_domain": mixed, "test_domain": single}, found)
    return _frame(rows, keys)


def pooled_table(data: StudyPredictions, task: str) -> pd.DataFrame:
    """Per model x train x test with predictions: mean and SD over seeds and the pooled interval."""
    summary = data.study.summary[data.study.summary["task"] == task]
    num_classes = data.num_classes(task)
    rows = []
    if num_classes is None:
        return pd.DataFrame(rows)
    cells = tables.ordered_unique(zip(summary["model"], summary["train_domain"], summary["test_domain"]))
    for model, train_domain, test_domain in cells:
        folds = data.folds(model, task, train_domain, test_domain)
        if not folds:
            continue
        pooled = st.pooled_interval([folds[s] for s in sorted(folds)], num_classes, data.n_resamples, seed=0)
        for metric, spread in pooled.items():
            rows.append({"model": model, "train_domain": train_domain, "test_domain": test_domain,
                         "metric": metric, "mean": spread.mean, "sd": spread.sd, "n_seeds": spread.n,
                         "low": spread.low, "high": spread.high})
    return pd.DataFrame(rows)

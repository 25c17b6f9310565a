"""Read a study folder's result files and shape them into the report's tables.

Everything here is pandas on the files described in ``docs/formats.md``; nothing is re-run
and no model code is imported. Functions return numeric frames; turning numbers into text
for a page is done by :mod:`histotoken.reporting.formatting`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "patient_accuracy")
METRIC_LABELS = {
    "macro_f1": "macro-F1",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "patient_accuracy": "patient-level accuracy",
}
RESULT_COLUMNS = (
    "run_id", "model", "task", "train_domain", "test_domain", "seed", "metric", "value", "ci_low", "ci_high",
)
# Columns read as text: domains such as "100" must not become integers next to "100+400".
TEXT_COLUMNS = {"run_id": str, "model": str, "task": str, "train_domain": str, "test_domain": str, "seed": str}
SUBTYPE_CLASSES = (
    "adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma",
    "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma",
)
BINARY_CLASSES = ("benign", "malignant")
# efficiency.csv column -> heading in the report (with units).
EFFICIENCY_COLUMNS = {
    "latency_ms_median": "latency median (ms)",
    "throughput_img_s": "throughput (img/s)",
    "peak_memory_mb": "peak memory (MB)",
    "params_m": "parameters (M)",
    "gflops": "GFLOPs",
    "tokens_final": "tokens at head",
}


# --------------------------------------------------------------------------- reading files


def read_results(path: Path) -> pd.DataFrame:
    """Read ``results.csv`` (tidy: one row per run x test domain x metric) and check its columns."""
    if not path.is_file():
        study_dir = path.parent
        raise FileNotFoundError(
            f"{study_dir} is not a study folder (no results.csv in it); "
            f"run `histotoken grid SPEC --out {study_dir}` first, then `histotoken report {study_dir}`"
        )
    try:
        results = pd.read_csv(path, dtype=TEXT_COLUMNS, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty; re-run `histotoken grid` to write it") from None
    missing = [column for column in RESULT_COLUMNS if column not in results.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)} (see docs/formats.md); "
            "re-run `histotoken grid` to rewrite it"
        )
    for column in ("value", "ci_low", "ci_high"):
        results[column] = pd.to_numeric(results[column], errors="coerce")
    return results


def read_csv_if_present(path: Path, text_columns: dict[str, type] | None = None) -> pd.DataFrame | None:
    """A CSV file as a frame, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        logger.info("%s is missing", path)
        return None
    try:
        return pd.read_csv(path, dtype=text_columns or {}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        logger.warning("cannot read %s: %s", path, error)
        return None


def read_json_if_present(path: Path) -> Any | None:
    """A JSON file's content, or None (logged) when it is missing or not valid JSON."""
    if not path.is_file():
        logger.info("%s is missing", path)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("cannot read %s: %s", path, error)
        return None


def read_runs(path: Path) -> pd.DataFrame | None:
    """``runs.csv``: one row per planned run with its status and error."""
    return read_csv_if_present(
        path, {"run_id": str, "model": str, "task": str, "train_domain": str, "seed": str, "run_dir": str}
    )


def read_efficiency(path: Path) -> pd.DataFrame | None:
    """``efficiency.csv``: benchmark rows, one per model label."""
    efficiency = read_csv_if_present(path, {"model": str})
    if efficiency is None:
        return None
    if "model" not in efficiency.columns:
        logger.warning("%s has no 'model' column; ignoring it", path)
        return None
    for column in EFFICIENCY_COLUMNS:
        if column in efficiency.columns:
            efficiency[column] = pd.to_numeric(efficiency[column], errors="coerce")
    return efficiency


# --------------------------------------------------------------------------- domains and order


def domain_sort_key(domain: str) -> tuple:
    """Order domains as single magnifications (ascending), then mixed sets, then ``all``."""
    parts = str(domain).split("+")
    if domain == "all":
        return (2, 0, (), domain)
    try:
        magnifications = tuple(int(part) for part in parts)
    except ValueError:
        return (3, 0, (), domain)
    return (0 if len(parts) == 1 else 1, len(parts), magnifications, domain)


def sort_domains(domains: Iterable[str]) -> list[str]:
    return sorted(set(domains), key=domain_sort_key)


def is_single_magnification(domain: str) -> bool:
    return domain_sort_key(domain)[0] == 0


def is_mixed(domain: str) -> bool:
    return "+" in str(domain)


def shares_magnification(train_domain: str, test_domain: str) -> bool:
    """Whether the test domain contains any magnification seen in training (``all`` contains every one)."""
    if "all" in (train_domain, test_domain):
        return True
    return bool(set(train_domain.split("+")) & set(test_domain.split("+")))


def ordered_unique(values: Iterable[Any]) -> list[Any]:
    """Unique values in first-seen order (the order of the study specification)."""
    return list(dict.fromkeys(value for value in values if not _is_missing(value)))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def magnification_label(value: Any) -> str:
    """``40``, ``"40"``, ``"40X"`` -> ``"40"``."""
    text = str(value).strip().upper().removesuffix("X")
    try:
        return str(int(float(text)))
    except ValueError:
        return str(value)


def class_order(names: Iterable[str]) -> list[str]:
    """Known BreakHis classes in their documented order, then any others alphabetically."""
    names = set(names)
    known = [name for name in (*BINARY_CLASSES, *SUBTYPE_CLASSES) if name in names]
    return known + sorted(names - set(known))


# --------------------------------------------------------------------------- result tables


def mean_over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per model x task x train domain x test domain x metric, averaged over seeds/folds.

    ``value`` is the mean over seeds, ``sd`` their standard deviation (ddof=1) and ``n_seeds`` their
    number. ``ci_low``/``ci_high`` are the run's own patient-bootstrap interval when there is one
    seed, and NaN with several: averaging interval bounds is not an interval of anything (the pooled
    interval over seeds comes from :func:`histotoken.reporting.statistics.pooled_interval`).
    """
    keys = ["model", "task", "train_domain", "test_domain", "metric"]
    summary = (
        results.groupby(keys, sort=False, dropna=False)
        .agg(value=("value", "mean"), sd=("value", "std"), ci_low=("ci_low", "first"),
             ci_high=("ci_high", "first"), n_seeds=("seed", "nunique"))
        .reset_index()
    )
    several = summary["n_seeds"] > 1
    summary.loc[several, ["ci_low", "ci_high"]] = np.nan
    return summary


def seed_spread_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Cells (model x task x train domain x test domain) with several seeds or folds: for each metric the
    mean over seeds (``<metric>``) and their standard deviation with ddof=1 (``<metric>_sd``), as eva reports.

    The model label carries the probe (``resnet18 [probe=linear]``), so probe and fine-tuned arms are
    separate rows. Columns: ``model, task, train_domain, test_domain, n_seeds`` and the metric columns.
    """
    keys = ["model", "task", "train_domain", "test_domain"]
    several = summary[summary["n_seeds"] > 1]
    rows = []
    for key, group in several.groupby(keys, sort=False):
        row: dict[str, Any] = dict(zip(keys, key))
        row["n_seeds"] = int(group["n_seeds"].max())
        by_metric = group.set_index("metric")
        for metric in METRICS:
            found = metric in by_metric.index
            row[metric] = by_metric.at[metric, "value"] if found else np.nan
            row[f"{metric}_sd"] = by_metric.at[metric, "sd"] if found else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # test domains by magnification within each model and train domain (the sort below is stable)
    table = table.iloc[sorted(range(len(table)), key=lambda i: domain_sort_key(table["test_domain"].iloc[i]))]
    return _sort_by_model_and_domain(table.reset_index(drop=True), summary)


def in_domain_table(summary: pd.DataFrame) -> pd.DataFrame:
    """In-domain rows (test domain == train domain), one row per model x task x train domain.

    Columns: ``model, task, train_domain, n_seeds`` and for each metric ``<metric>``,
    ``<metric>_low``, ``<metric>_high``.
    """
    in_domain = summary[summary["train_domain"] == summary["test_domain"]]
    rows = []
    for (model, task, train_domain), group in in_domain.groupby(
        ["model", "task", "train_domain"], sort=False
    ):
        row: dict[str, Any] = {
            "model": model, "task": task, "train_domain": train_domain, "n_seeds": int(group["n_seeds"].max())
        }
        by_metric = group.set_index("metric")
        for metric in METRICS:
            found = metric in by_metric.index
            row[metric] = by_metric.at[metric, "value"] if found else np.nan
            row[f"{metric}_low"] = by_metric.at[metric, "ci_low"] if found else np.nan
            row[f"{metric}_high"] = by_metric.at[metric, "ci_high"] if found else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return _sort_by_model_and_domain(table, summary)


def _sort_by_model_and_domain(table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Models and tasks in study order (first seen in results), train domains by magnification."""
    model_rank = {model: rank for rank, model in enumerate(ordered_unique(summary["model"]))}
    task_rank = {task: rank for rank, task in enumerate(ordered_unique(summary["task"]))}
    order = sorted(
        range(len(table)),
        key=lambda i: (
            model_rank.get(table["model"].iloc[i], len(model_rank)),
            task_rank.get(table["task"].iloc[i], len(task_rank)),
            domain_sort_key(table["train_domain"].iloc[i]),
        ),
    )
    return table.iloc[order].reset_index(drop=True)


def join_efficiency(table: pd.DataFrame, efficiency: pd.DataFrame | None) -> pd.DataFrame:
    """Add the efficiency columns (``EFFICIENCY_COLUMNS``) to ``table`` by model label."""
    if efficiency is None:
        return table
    columns = ["model"] + [column for column in EFFICIENCY_COLUMNS if column in efficiency.columns]
    per_model = efficiency[columns].drop_duplicates("model", keep="last").rename(columns={"model": "_model"})
    # a label may name a factor arm, "resnet18 [stain_norm=macenko]"; its cost is the model's
    keyed = table.assign(_model=table["model"].astype(str).str.split(" [", n=1, regex=False).str[0])
    return keyed.merge(per_model, on="_model", how="left").drop(columns="_model")


def cross_domain_matrix(summary: pd.DataFrame, model: str, task: str, metric: str = "macro_f1") -> pd.DataFrame:
    """Train domain (rows) x test domain (columns) matrix of a metric for one model, seeds averaged."""
    cells = summary[(summary["model"] == model) & (summary["task"] == task) & (summary["metric"] == metric)]
    matrix = cells.pivot_table(index="train_domain", columns="test_domain", values="value", aggfunc="mean")
    rows = sort_domains(cells["train_domain"])
    columns = sort_domains(cells["test_domain"])
    matrix = matrix.reindex(index=rows, columns=columns)
    matrix.index.name, matrix.columns.name = "train_domain", "test_domain"
    return matrix


def model_task_pairs(summary: pd.DataFrame) -> list[tuple[str, str]]:
    return ordered_unique(zip(summary["model"], summary["task"]))


def cross_domain_summary(summary: pd.DataFrame, metric: str = "macro_f1") -> pd.DataFrame:
    """Per model: mean of in-domain cells, of off-diagonal cells, and of unseen-magnification cells.

    Off-diagonal = every train/test pair with test domain != train domain (the cross-domain mean);
    unseen = test magnifications that share none with the training magnifications (e.g. 100 -> 400,
    but not 100+400 -> 100).
    """
    rows = []
    for model, task in model_task_pairs(summary):
        matrix = cross_domain_matrix(summary, model, task, metric)
        diagonal, off_diagonal, unseen = [], [], []
        for train_domain in matrix.index:
            for test_domain in matrix.columns:
                value = matrix.at[train_domain, test_domain]
                if np.isnan(value):
                    continue
                if train_domain == test_domain:
                    diagonal.append(value)
                else:
                    off_diagonal.append(value)
                    if not shares_magnification(train_domain, test_domain):
                        unseen.append(value)
        in_mean, cross_mean = _mean(diagonal), _mean(off_diagonal)
        rows.append({
            "model": model, "task": task,
            "in_domain_mean": in_mean, "cross_domain_mean": cross_mean, "unseen_mean": _mean(unseen),
            "drop": in_mean - cross_mean, "n_in_domain": len(diagonal), "n_cross_domain": len(off_diagonal),
        })
    return pd.DataFrame(rows)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def asymmetry_table(summary: pd.DataFrame, metric: str = "macro_f1") -> pd.DataFrame:
    """For each pair of single-magnification domains a < b trained and tested both ways:
    ``value(a -> b)`` next to ``value(b -> a)`` (e.g. 100 -> 400 vs 400 -> 100)."""
    rows = []
    for model, task in model_task_pairs(summary):
        matrix = cross_domain_matrix(summary, model, task, metric)
        singles = [d for d in matrix.index if is_single_magnification(d) and d in matrix.columns]
        for i, low in enumerate(singles):
            for high in singles[i + 1:]:
                forward, backward = matrix.at[low, high], matrix.at[high, low]
                if np.isnan(forward) or np.isnan(backward):
                    continue
                rows.append({
                    "model": model, "task": task, "low": low, "high": high,
                    "low_to_high": forward, "high_to_low": backward, "difference": forward - backward,
                })
    return pd.DataFrame(rows)


def mixed_training_table(summary: pd.DataFrame, metric: str = "macro_f1") -> pd.DataFrame:
    """Each mixed train domain (e.g. ``100+400``) against the single-magnification train domains,
    on every test domain the mixed run was evaluated on.

    Columns: ``model, task, mixed_domain, test_domain, mixed`` (its value), one column
    ``train <d>`` per single-magnification train domain, ``best_single`` and ``mixed_minus_best``.
    """
    all_singles = [d for d in sort_domains(summary["train_domain"]) if is_single_magnification(d)]
    rows = []
    for model, task in model_task_pairs(summary):
        matrix = cross_domain_matrix(summary, model, task, metric)
        for mixed_domain in (d for d in matrix.index if is_mixed(d)):
            for test_domain in matrix.columns:
                value = matrix.at[mixed_domain, test_domain]
                if np.isnan(value):
                    continue
                row: dict[str, Any] = {
                    "model": model, "task": task, "mixed_domain": mixed_domain, "test_domain": test_domain,
                    "mixed": value,
                }
                singles = {
                    d: (matrix.at[d, test_domain] if d in matrix.index else np.nan) for d in all_singles
                }
                row.update({f"train {d}": v for d, v in singles.items()})
                known = [v for v in singles.values() if not np.isnan(v)]
                row["best_single"] = max(known) if known else np.nan
                row["mixed_minus_best"] = value - row["best_single"] if known else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(table: pd.DataFrame, maximize: Sequence[str], minimize: Sequence[str] = ()) -> pd.Series:
    """Boolean Series (aligned with ``table``): True for rows that no other row dominates.

    Row ``q`` dominates row ``p`` when ``q`` is at least as good on every objective and strictly
    better on one (higher for ``maximize`` columns, lower for ``minimize`` columns). Rows with a
    missing objective are never on the front and never dominate.
    """
    objectives = pd.concat(
        [table[list(maximize)].astype(float), -table[list(minimize)].astype(float)], axis=1
    ).to_numpy()
    complete = ~np.isnan(objectives).any(axis=1)
    on_front = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(complete):
        others = objectives[complete]
        dominated = np.any(np.all(others >= objectives[i], axis=1) & np.any(others > objectives[i], axis=1))
        on_front[i] = not dominated
    return pd.Series(on_front, index=table.index, name="pareto")


def accuracy_cost_table(summary: pd.DataFrame, efficiency: pd.DataFrame, task: str) -> pd.DataFrame:
    """Per model: in-domain macro-F1 (mean over train domains and seeds), throughput, GFLOPs and
    whether the model is on the Pareto front of F1 vs throughput and of F1 vs GFLOPs."""
    in_domain = summary[
        (summary["task"] == task) & (summary["metric"] == "macro_f1")
        & (summary["train_domain"] == summary["test_domain"])
    ]
    per_model = (
        in_domain.groupby("model", sort=False)
        .agg(macro_f1=("value", "mean"), n_train_domains=("train_domain", "nunique"))
        .reset_index()
    )
    columns = ["model"] + [c for c in ("throughput_img_s", "gflops") if c in efficiency.columns]
    table = per_model.merge(efficiency[columns].drop_duplicates("model", keep="last"), on="model", how="left")
    for column in ("throughput_img_s", "gflops"):
        if column not in table.columns:
            table[column] = np.nan
    table["pareto_throughput"] = pareto_front(table, maximize=["macro_f1", "throughput_img_s"])
    table["pareto_gflops"] = pareto_front(table, maximize=["macro_f1"], minimize=["gflops"])
    return table


# --------------------------------------------------------------------------- data set tables


def dataset_count_tables(dataset: dict, by_magnification: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images and patients per tumour class (rows) x magnification (columns) from ``dataset.json``.

    The image table has a ``total`` column and row; patients are not summed (one patient has
    images at every magnification). Without ``by_magnification`` (data without magnifications, which
    dataset.json lists as magnification 0) each table has one column, ``images`` or ``patients``.
    """
    counts = pd.DataFrame(dataset.get("counts") or [])
    if counts.empty:
        return pd.DataFrame(), pd.DataFrame()
    if not by_magnification:
        classes = class_order(counts["tumor_class"])
        images = counts.groupby("tumor_class")["n_images"].sum().reindex(classes).fillna(0).astype(int)
        images = images.to_frame("images")
        images.loc["total"] = images["images"].sum()
        patients = pd.DataFrame()
        if "n_patients" in counts.columns:  # one row per class when there is no magnification
            patients = counts.groupby("tumor_class")["n_patients"].max().reindex(classes).fillna(0).astype(int)
            patients = patients.to_frame("patients")
        return images, patients
    counts["magnification"] = counts["magnification"].map(magnification_label)
    classes = class_order(counts["tumor_class"])
    magnifications = sort_domains(counts["magnification"])

    def pivot(value: str) -> pd.DataFrame:
        table = counts.pivot_table(index="tumor_class", columns="magnification", values=value, aggfunc="sum")
        return table.reindex(index=classes, columns=magnifications).fillna(0).astype(int)

    images = pivot("n_images")
    images["total"] = images.sum(axis=1)
    images.loc["total"] = images.sum(axis=0)
    patients = pivot("n_patients") if "n_patients" in counts.columns else pd.DataFrame()
    return images, patients


def split_summary(split_files: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Images and patients per split in each frozen split file, and whether patients are disjoint."""
    rows = []
    for name, frame in split_files.items():
        if not {"split", "patient_id"} <= set(frame.columns):
            continue
        splits_per_patient = frame.groupby("patient_id")["split"].nunique()
        disjoint = bool((splits_per_patient <= 1).all())
        for split in ordered_unique(s for s in ("train", "val", "test") if s in set(frame["split"])):
            part = frame[frame["split"] == split]
            rows.append({
                "file": name, "split": split, "images": len(part), "patients": part["patient_id"].nunique(),
                "patient_disjoint": disjoint,
            })
    return pd.DataFrame(rows)

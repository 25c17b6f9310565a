"""Statistics a reviewer accepts: intervals over patients, across seeds/folds, and paired comparisons.

Pure functions on arrays and frames (the per-image predictions that evaluation writes beside each
``eval/<domain>.json``, see ``docs/formats.md``); no model code, no torch. Metric values equal
scikit-learn's: a point value is ``sklearn.metrics``' own; for resamples, which are unions of whole
patients, each resample's confusion matrix is the sum of its drawn patients' confusion matrices
(``sklearn.metrics.confusion_matrix`` per patient, then one matrix product for all resamples), and
accuracy, balanced accuracy and macro-F1 are read off it exactly as scikit-learn defines them
(:func:`metrics_from_confusion`; the tests check every resample against scikit-learn).

**Resampling** draws test patients with replacement **within each class** (a patient's class is the
label of its images) when every class has at least two test patients: every resample then keeps the
test set's class composition, and macro-F1 and balanced accuracy of the resamples are not pulled
down by classes that drop out. When some class has a single test patient (BreakHis: about 12 test
patients for 8 subtypes), stratifying would freeze that class (no variation at all, and intervals
of zero width), so patients are drawn from the whole test set instead (the plain cluster
bootstrap). Then classes drop out of some resamples and the interval of a single metric can sit
below its point value; paired differences suffer less, as both sides lose the same classes.

Three kinds of numbers, and which one a table shows is always stated:

* **One run on one test domain**: the point value and the 95% patient-bootstrap interval written
  by evaluation (images of one patient are correlated, so whole patients are resampled).
* **Across seeds or folds**: the mean and standard deviation (ddof=1) of the per-seed values
  (:func:`seed_spread`), and a **pooled interval** (:func:`pooled_interval`) from a stratified
  bootstrap: each resample draws patients with replacement *within* each fold/seed, recomputes
  each fold's metric and averages them; the 2.5th and 97.5th percentiles of that average are the
  interval of the mean over folds. (Averaging the per-seed interval bounds is not an interval of
  anything, and is not done.)
* **Paired comparison of A and B** (:func:`paired_difference`): A and B evaluated on the same test
  patients (the same images for two models; or, for a cross-magnification asymmetry, the same
  patients at two magnifications). Each resample draws one set of patients and uses it for both
  A and B, so the patient-to-patient variation that A and B share cancels. Reported: the
  difference A - B (mean over folds), its 95% percentile interval, and the share of resamples in
  which A beats B. For accuracy on the same images, McNemar's exact test (:func:`mcnemar_exact`):
  a two-sided binomial test of the discordant pairs (A right and B wrong vs. the reverse) against
  1/2 (McNemar 1947; the exact form as in Fagerland et al. 2013).

A difference is **resolved** at this sample size when its interval excludes zero
(:func:`is_resolved`); the report states a direction only then.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histotoken.formats import HEADLINE_METRICS, PREDICTION_COLUMNS, PROBABILITY_PREFIX, RunPaths

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One run's predictions on one test domain: class indices per image, and each image's patient."""

    y_true: np.ndarray
    y_pred: np.ndarray
    patients: np.ndarray
    paths: np.ndarray | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.y_true), len(self.y_pred), len(self.patients)}
        if len(sizes) != 1:
            raise ValueError(f"predictions need one target, prediction and patient per image; got sizes {sizes}")

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Predictions:
        """From an ``eval/<domain>.predictions.csv`` frame (columns ``PREDICTION_COLUMNS``)."""
        missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"a predictions table lacks the column(s) {missing} (see docs/formats.md)")
        return cls(
            np.array(frame["target"], dtype=np.int64), np.array(frame["prediction"], dtype=np.int64),
            np.array(frame["patient_id"].astype(str)), np.array(frame["path"].astype(str)),
        )

    @property
    def correct(self) -> np.ndarray:
        return self.y_true == self.y_pred


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean and standard deviation of per-seed (or per-fold) values, and a pooled interval."""

    mean: float
    sd: float
    n: int
    low: float = float("nan")
    high: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Difference:
    """A - B for one metric: point difference (mean over folds), interval, share of resamples A > B."""

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    share_a_better: float
    n_folds: int
    n_patients: int
    mcnemar_p: float | None = None  # accuracy on the same images only
    a_only_correct: int | None = None
    b_only_correct: int | None = None


def read_predictions(run_dir: str | Path, domain: str) -> Predictions | None:
    """A run's ``eval/<domain>.predictions.csv``, or None when it has none."""
    path = RunPaths(Path(run_dir)).predictions_file(domain)
    if not path.is_file():
        return None
    return Predictions.from_frame(pd.read_csv(path, dtype={"patient_id": str, "path": str}))


def num_classes_of(path: str | Path) -> int | None:
    """Number of classes from a predictions file's ``prob/<class>`` columns (None if it has none)."""
    header = pd.read_csv(path, nrows=0).columns
    count = sum(str(column).startswith(PROBABILITY_PREFIX) for column in header)
    return count or None


def metric_values(predictions: Predictions, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of one prediction set, by ``sklearn.metrics``."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y_true, y_pred = predictions.y_true, predictions.y_pred
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": they are left out, as intended
        warnings.simplefilter("ignore", UserWarning)
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        }


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Headline metrics of (..., C, C) confusion matrices (rows true, columns predicted), as scikit-learn:

    accuracy = trace / total; balanced accuracy = mean recall over the classes present in the labels;
    macro-F1 = mean of 2 TP / (2 TP + FP + FN) over the classes present in the labels or predictions.
    """
    confusion = np.asarray(confusion, dtype=float)
    true_positives = np.diagonal(confusion, axis1=-2, axis2=-1)
    support = confusion.sum(-1)  # (..., C) images of each true class
    predicted = confusion.sum(-2)  # (..., C) images predicted as each class
    in_labels = support > 0
    in_either = in_labels | (predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=in_labels)
    denominator = support + predicted  # = 2 TP + FP + FN
    f1 = np.divide(2 * true_positives, denominator, out=np.zeros_like(true_positives), where=in_either)
    total = confusion.sum((-2, -1))
    return {
        "accuracy": true_positives.sum(-1) / np.maximum(total, 1),
        "balanced_accuracy": recall.sum(-1) / np.maximum(in_labels.sum(-1), 1),
        "macro_f1": f1.sum(-1) / np.maximum(in_either.sum(-1), 1),
    }


def seed_spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation (ddof=1; NaN for one value) of per-seed values."""
    array = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if array.size == 0:
        return Spread(float("nan"), float("nan"), 0)
    sd = float(np.std(array, ddof=1)) if array.size > 1 else float("nan")
    return Spread(float(array.mean()), sd, int(array.size))


def is_resolved(low: float, high: float) -> bool:
    """Whether an interval of a difference excludes zero (NaN bounds never do)."""
    return bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))


# --------------------------------------------------------------------------- resampling


def patient_classes(predictions: Sequence[Predictions], unique: np.ndarray) -> np.ndarray:
    """Each patient's class: the most frequent label of its images (over every given prediction set)."""
    patients = np.concatenate([p.patients for p in predictions])
    labels = np.concatenate([p.y_true for p in predictions])
    frame = pd.DataFrame({"patient": patients, "label": labels})
    mode = frame.groupby("patient")["label"].agg(lambda x: x.value_counts().index[0])
    return mode.reindex(unique).to_numpy()


def class_strata(predictions: Sequence[Predictions], unique: np.ndarray) -> np.ndarray | None:
    """Strata for :func:`patient_draws`: each patient's class when every class has two or more
    patients, else None (resample the whole test set; see the module docstring)."""
    classes = patient_classes(predictions, unique)
    _, counts = np.unique(classes, return_counts=True)
    return classes if counts.min() >= 2 else None


def patient_draws(
    patients: Sequence[str], n_resamples: int, rng: np.random.Generator, strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The test set's patients (sorted) and (R, P) indices of P patients drawn with replacement.

    With ``strata`` (one value per sorted patient, e.g. its class), each stratum's patients are drawn
    from that stratum only, as many as it holds.
    """
    unique = np.unique(np.asarray(patients, dtype=str))
    if strata is None:
        return unique, rng.integers(0, len(unique), size=(n_resamples, len(unique)))
    strata = np.asarray(strata)
    draws = np.empty((n_resamples, len(unique)), dtype=np.int64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws[:, members] = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
    return unique, draws


def image_index(patients: np.ndarray, unique: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(R, width) image indices of the drawn patients' images; -1 pads shorter rows (for inspection
    and tests; :func:`resampled_metrics` works from per-patient confusion matrices instead)."""
    rows_of = [np.flatnonzero(patients == patient) for patient in unique]
    samples = [np.concatenate([rows_of[i] for i in draw]) for draw in draws]
    width = max(1, max(len(rows) for rows in samples))
    index = np.full((len(samples), width), -1, dtype=np.int64)
    for row, rows in enumerate(samples):
        index[row, : len(rows)] = rows
    return index


def resampled_metrics(
    predictions: Predictions, unique: np.ndarray, draws: np.ndarray, num_classes: int,
) -> dict[str, np.ndarray]:
    """(R,) values of each headline metric on the resamples ``draws`` of the patients ``unique``.

    A drawn patient without images in ``predictions`` (possible when two arms share patients but not
    images) adds nothing to the resample.
    """
    from sklearn.metrics import confusion_matrix

    labels = np.arange(num_classes)
    per_patient = np.zeros((len(unique), num_classes * num_classes))  # (P, C*C)
    for i, patient in enumerate(unique):
        mine = predictions.patients == patient
        if mine.any():
            per_patient[i] = confusion_matrix(
                predictions.y_true[mine], predictions.y_pred[mine], labels=labels
            ).ravel()
    counts = np.zeros((len(draws), len(unique)))  # (R, P) times each patient was drawn
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1)
    confusion = (counts @ per_patient).reshape(len(draws), num_classes, num_classes)  # (R, C, C)
    return metrics_from_confusion(confusion)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------- across seeds/folds


def pooled_interval(
    folds: Sequence[Predictions], num_classes: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, Spread]:
    """Per metric: mean and SD of the per-fold values, and the stratified-bootstrap interval of the mean.

    Each resample draws patients with replacement within every fold, recomputes every fold's metric
    and averages them over folds.
    """
    if not folds:
        raise ValueError("pooled_interval needs the predictions of at least one seed or fold")
    rng = np.random.default_rng(seed)
    points = [metric_values(fold, num_classes) for fold in folds]
    sums = {name: np.zeros(n_resamples) for name in HEADLINE_METRICS}
    for fold in folds:
        unique = np.unique(fold.patients)
        unique, draws = patient_draws(fold.patients, n_resamples, rng, class_strata([fold], unique))
        values = resampled_metrics(fold, unique, draws, num_classes)
        for name in HEADLINE_METRICS:
            sums[name] += values[name]
    result = {}
    for name in HEADLINE_METRICS:
        spread = seed_spread([point[name] for point in points])
        low, high = _percentiles(sums[name] / len(folds))
        result[name] = dataclasses.replace(spread, low=low, high=high)
    return result


# --------------------------------------------------------------------------- paired comparisons


def paired_difference(
    pairs: Sequence[tuple[Predictions, Predictions]],
    num_classes: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Difference]:
    """A - B per headline metric, over one or more (A, B) pairs (one per seed/fold).

    Within a pair, A and B must share their test patients (not necessarily their images); every
    resample draws one set of patients per pair and uses it for both. The difference is the mean
    over pairs of A's metric minus B's. McNemar's test is added for accuracy when every pair has
    the same images in the same order (``paths``, or equal targets when no paths are known);
    discordant counts are summed over pairs, which assumes independent pairs (true for one run and
    for cross-validation folds, whose test sets are disjoint).
    """
    if not pairs:
        raise ValueError("paired_difference needs at least one (A, B) pair of predictions")
    rng = np.random.default_rng(seed)
    point_a = {name: [] for name in HEADLINE_METRICS}
    point_b = {name: [] for name in HEADLINE_METRICS}
    sums = {name: np.zeros(n_resamples) for name in HEADLINE_METRICS}
    n_patients = 0
    for a, b in pairs:
        shared = np.intersect1d(np.unique(a.patients), np.unique(b.patients))
        if len(shared) == 0:
            raise ValueError("the two sides of a paired comparison share no test patient")
        both = np.concatenate([a.patients, b.patients])
        unique, draws = patient_draws(both, n_resamples, rng, class_strata([a, b], np.unique(both)))
        n_patients += len(unique)
        values_a = resampled_metrics(a, unique, draws, num_classes)
        values_b = resampled_metrics(b, unique, draws, num_classes)
        whole_a, whole_b = metric_values(a, num_classes), metric_values(b, num_classes)
        for name in HEADLINE_METRICS:
            sums[name] += values_a[name] - values_b[name]
            point_a[name].append(whole_a[name])
            point_b[name].append(whole_b[name])
    same_images = all(_same_images(a, b) for a, b in pairs)
    result = {}
    for name in HEADLINE_METRICS:
        differences = sums[name] / len(pairs)
        low, high = _percentiles(differences)
        mean_a, mean_b = float(np.mean(point_a[name])), float(np.mean(point_b[name]))
        test = {}
        if name == "accuracy" and same_images:
            a_only = sum(int(np.sum(a.correct & ~b.correct)) for a, b in pairs)
            b_only = sum(int(np.sum(b.correct & ~a.correct)) for a, b in pairs)
            test = {"mcnemar_p": mcnemar_exact(a_only, b_only), "a_only_correct": a_only, "b_only_correct": b_only}
        result[name] = Difference(
            name, mean_a, mean_b, mean_a - mean_b, low, high, float(np.mean(differences > 0)),
            len(pairs), n_patients, **test,
        )
    return result


def _same_images(a: Predictions, b: Predictions) -> bool:
    if len(a.y_true) != len(b.y_true):
        return False
    if a.paths is not None and b.paths is not None:
        return bool(np.array_equal(a.paths, b.paths))
    return bool(np.array_equal(a.y_true, b.y_true) and np.array_equal(a.patients, b.patients))


def align(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """The two prediction sets restricted to their common images, in one order (by path)."""
    if a.paths is None or b.paths is None:
        raise ValueError("aligning two prediction sets needs image paths")
    common = np.intersect1d(a.paths, b.paths)

    def pick(p: Predictions) -> Predictions:
        order = {path: i for i, path in enumerate(p.paths)}
        rows = np.asarray([order[path] for path in common], dtype=np.int64)
        return Predictions(p.y_true[rows], p.y_pred[rows], p.patients[rows], p.paths[rows])

    return pick(a), pick(b)


def mcnemar_exact(a_only_correct: int, b_only_correct: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs against 1/2."""
    from scipy.stats import binomtest

    discordant = int(a_only_correct) + int(b_only_correct)
    if discordant == 0:
        return 1.0
    return float(binomtest(int(a_only_correct), discordant, 0.5, alternative="two-sided").pvalue)

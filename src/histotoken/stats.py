"""Statistics for every layer: metrics from confusion matrices, resampling of patients, intervals, paired tests.

One module, numpy/scipy (and scikit-learn's ROC AUC) only, so that an interval means the same thing in
``histotoken evaluate`` (``eval/<domain>.json``), in slide prediction (``eval.json``), in explanations
(faithfulness) and in the study report. See ``docs/statistics.md``.

**Metrics** are read off confusion matrices (rows true, columns predicted) exactly as scikit-learn
defines them: accuracy = trace / total (``accuracy_score``); balanced accuracy = mean recall over the
classes present in the labels (``balanced_accuracy_score``); macro-F1 = mean of 2 TP / (2 TP + FP + FN)
over the classes present in the labels *or* the predictions (``f1_score(average="macro")``);
per-class precision, recall, F1 and support as ``precision_recall_fscore_support(zero_division=0)``.

**The resampling unit** is the group: a patient for images, a slide for slides and for the tiles
of slides. Images of one patient are correlated, so whole groups are drawn with replacement. Each
group's confusion matrix is computed once; a resample's confusion matrix is the sum of its drawn
groups' matrices (one matrix product for all resamples), so a bootstrap costs almost nothing.

**Strata**: each group's class is its majority label (ties: the lowest class index). When every
class present has at least two groups, groups are drawn *within* their class, as many as it holds,
so every resample keeps the test set's class composition (``stratified``). When some class has a
single group, stratifying would freeze it (zero variation), so groups are drawn from the whole
set instead (``plain``); classes can then drop out of a resample. Which one was used is recorded.

**Intervals** are 95% percentile intervals of the resampled values (the 2.5th and 97.5th
percentiles). A **paired** interval of A - B draws one set of groups per resample and applies it to
both sides, so what A and B share cancels. McNemar's exact test: a two-sided binomial test of the
discordant pairs against 1/2.

**Notes**: :func:`evaluation_notes` lists what makes a result weak: fewer than
:data:`MIN_GROUPS_PER_CLASS` groups of a class, fewer than :data:`MIN_SLIDES` slides, intervals of
zero width or from fewer than two groups, an AUROC that is undefined (one class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")
MIN_GROUPS_PER_CLASS = 5
MIN_SLIDES = 10
STRATIFIED = "stratified"  # groups drawn within their class
PLAIN = "plain"  # groups drawn from the whole set


# --------------------------------------------------------------------------- metrics from confusion matrices


def group_confusions(
    y_true: Sequence[int], y_pred: Sequence[int], groups: Sequence, num_classes: int,
    unique: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted groups and their (G, C, C) confusion matrices (rows true class, columns predicted).

    With ``unique`` (sorted group names), matrices follow that list; a group without images gets zeros,
    and an image whose group is not listed raises ValueError.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    groups = np.asarray(groups).astype(str)
    if unique is None:
        unique, inverse = np.unique(groups, return_inverse=True)
    else:
        unique = np.asarray(unique).astype(str)
        inverse = np.searchsorted(unique, groups)
        if len(groups) and (inverse.max(initial=0) >= len(unique) or not np.array_equal(unique[inverse], groups)):
            raise ValueError("every image's group must be among the listed groups")
    confusion = np.zeros((len(unique), num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (inverse, y_true, y_pred), 1)
    return unique, confusion


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(C, C) confusion matrix, as ``sklearn.metrics.confusion_matrix(labels=range(C))``."""
    return group_confusions(y_true, y_pred, np.zeros(len(np.asarray(y_true)), dtype=int), num_classes)[1][0]


def metrics_from_confusion(confusion_matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 of (..., C, C) confusion matrices, as scikit-learn.

    An empty matrix (no images) gives NaN.
    """
    matrices = np.asarray(confusion_matrices, dtype=float)
    true_positives = np.diagonal(matrices, axis1=-2, axis2=-1)
    support = matrices.sum(-1)  # (..., C) images of each true class
    predicted = matrices.sum(-2)  # (..., C) images predicted as each class
    in_labels = support > 0
    in_either = in_labels | (predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=in_labels)
    f1 = np.divide(2 * true_positives, support + predicted, out=np.zeros_like(true_positives), where=in_either)
    total = matrices.sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": true_positives.sum(-1) / total,
            "balanced_accuracy": recall.sum(-1) / in_labels.sum(-1),
            "macro_f1": f1.sum(-1) / in_either.sum(-1),
        }


def per_class_scores(confusion_matrix: np.ndarray) -> dict[str, np.ndarray]:
    """(C,) precision, recall, F1 and support of one (C, C) matrix, as scikit-learn with ``zero_division=0``."""
    matrix = np.asarray(confusion_matrix, dtype=float)
    true_positives = np.diagonal(matrix)
    support, predicted = matrix.sum(1), matrix.sum(0)
    zero = np.zeros_like(true_positives)
    return {
        "precision": np.divide(true_positives, predicted, out=zero.copy(), where=predicted > 0),
        "recall": np.divide(true_positives, support, out=zero.copy(), where=support > 0),
        "f1": np.divide(2 * true_positives, support + predicted, out=zero.copy(), where=(support + predicted) > 0),
        "support": support.astype(np.int64),
    }


# --------------------------------------------------------------------------- resampling groups


def group_classes(confusions: np.ndarray) -> np.ndarray:
    """(G,) each group's class from its (G, C, C) confusion matrices: its majority label (ties: lowest index)."""
    return np.asarray(confusions).sum(-1).argmax(-1)


def class_strata(classes: np.ndarray) -> np.ndarray | None:
    """The strata to draw groups within: the groups' classes when every class present has two or more
    groups, else None (draw from the whole set; a class of one group would never vary)."""
    classes = np.asarray(classes)
    if classes.size == 0:
        return None
    _, counts = np.unique(classes, return_counts=True)
    return classes if counts.min() >= 2 else None


def draw_groups(n_groups: int, n_resamples: int, rng: np.random.Generator,
                strata: np.ndarray | None = None) -> np.ndarray:
    """(R, G) indices of G groups drawn with replacement per resample; with ``strata`` (one value per
    group), each stratum's groups are drawn from that stratum only, as many as it holds."""
    if strata is None:
        return rng.integers(0, n_groups, size=(n_resamples, n_groups))
    strata = np.asarray(strata)
    draws = np.empty((n_resamples, n_groups), dtype=np.int64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws[:, members] = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
    return draws


def draw_counts(draws: np.ndarray, n_groups: int) -> np.ndarray:
    """(R, G) how many times each group was drawn in each resample."""
    counts = np.zeros((len(draws), n_groups))
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1)
    return counts


@dataclasses.dataclass(frozen=True)
class Resampling:
    """R resamples of G groups: ``draws`` (R, G) indices, and whether they were drawn within classes."""

    draws: np.ndarray
    scheme: str  # STRATIFIED or PLAIN

    @property
    def counts(self) -> np.ndarray:
        return draw_counts(self.draws, self.draws.shape[1])


def resample_groups(classes: np.ndarray, n_resamples: int, rng: np.random.Generator) -> Resampling:
    """Resamples of groups whose classes are ``classes``: within classes when each has >= 2 groups."""
    strata = class_strata(classes)
    draws = draw_groups(len(classes), n_resamples, rng, strata)
    return Resampling(draws, PLAIN if strata is None else STRATIFIED)


def resampled_metrics(confusions: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """(R,) headline metrics of resamples: ``counts`` (R, G) times each of the (G, C, C) matrices is drawn."""
    confusions = np.asarray(confusions, dtype=float)
    num_classes = confusions.shape[-1]
    summed = counts @ confusions.reshape(len(confusions), -1)  # (R, G) @ (G, C*C) -> (R, C*C)
    return metrics_from_confusion(summed.reshape(len(counts), num_classes, num_classes))


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE,
                        drop_nan: bool = False) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of ``values``.

    NaN values (a resample without images on one side of a pair) are an error unless ``drop_nan``.
    """
    values = np.asarray(values, dtype=float)
    if drop_nan:
        values = values[~np.isnan(values)]
    if values.size == 0 or np.isnan(values).any():
        raise ValueError("a percentile interval needs resampled values without NaN")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class Intervals:
    """95% intervals of the headline metrics over resamples of groups."""

    ci95: dict[str, list[float]]
    scheme: str
    n_groups: int
    n_resamples: int


def metric_intervals(confusions: np.ndarray, n_resamples: int, rng: np.random.Generator) -> Intervals:
    """Percentile intervals of accuracy, balanced accuracy and macro-F1 over resamples of the groups whose
    (G, C, C) confusion matrices are given (drawn within classes when possible)."""
    resampling = resample_groups(group_classes(confusions), n_resamples, rng)
    values = resampled_metrics(confusions, resampling.counts)
    ci95 = {name: list(percentile_interval(values[name])) for name in HEADLINE}
    return Intervals(ci95, resampling.scheme, len(confusions), n_resamples)


def bootstrap_intervals(
    y_true: Sequence[int], y_pred: Sequence[int], groups: Sequence, num_classes: int,
    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> Intervals:
    """95% group-bootstrap intervals of the headline metrics of one prediction set."""
    _, confusions = group_confusions(y_true, y_pred, groups, num_classes)
    return metric_intervals(confusions, n_resamples, np.random.default_rng(seed))


# --------------------------------------------------------------------------- AUROC


@dataclasses.dataclass(frozen=True)
class Auroc:
    """ROC AUC (None when one class is missing), its interval, and every resample's value."""

    value: float | None
    interval: list[float] | None
    values: np.ndarray  # (R,) one value per resample, none left out
    scheme: str | None
    notes: list[str]


def auroc_interval(y_true: Sequence[int], score: Sequence[float], groups: Sequence,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, unit: str = "slides") -> Auroc:
    """scikit-learn's ROC AUC of binary labels and its 95% interval over resamples of ``groups``.

    Groups are drawn within their majority label, so every resample holds both classes and none is
    left out (a group of majority label 1 holds at least one positive, and one of label 0 a negative).
    Only when one label is no group's majority (tiles of mixed slides) are groups drawn from the whole
    set; a resample that then holds one class gets no value, and a note counts them.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    score = np.asarray(score, dtype=float)
    if len(np.unique(y_true)) < 2:
        present = "no" if len(y_true) == 0 else f"only class {int(y_true[0])}"
        return Auroc(None, None, np.zeros(0), None, [
            f"AUROC undefined: the labels hold {present} ({len(y_true)} {unit if len(y_true) != 1 else unit[:-1]}); "
            "it needs both classes"
        ])
    point = float(roc_auc_score(y_true, score))
    if n_resamples <= 0:
        return Auroc(point, None, np.zeros(0), None, [])
    unique, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    _, confusions = group_confusions(y_true, y_true, groups, 2)
    classes = group_classes(confusions)
    stratified = len(np.unique(classes)) == 2
    rng = np.random.default_rng(seed)
    draws = draw_groups(len(unique), n_resamples, rng, classes if stratified else None)
    counts = draw_counts(draws, len(unique))  # (R, G)
    values = np.full(n_resamples, np.nan)
    for row, weights in enumerate(counts[:, inverse]):  # (N,) times each item is drawn
        drawn = weights > 0
        if len(np.unique(y_true[drawn])) == 2:
            values[row] = roc_auc_score(y_true[drawn], score[drawn], sample_weight=weights[drawn])
    notes = []
    valid = ~np.isnan(values)
    if not valid.all():
        notes.append(f"AUROC interval from {int(valid.sum())} of {n_resamples} resamples: the others held one class")
    interval = list(percentile_interval(values[valid])) if valid.any() else None
    return Auroc(point, interval, values, STRATIFIED if stratified else PLAIN, notes)


# --------------------------------------------------------------------------- paired mean differences


@dataclasses.dataclass(frozen=True)
class MeanDifference:
    """Mean of A - B over paired units, its percentile interval over resamples of the units."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def resolved(self) -> bool:
        return is_resolved(self.low, self.high)


def paired_mean_difference(a: Sequence[float], b: Sequence[float], n_resamples: int = DEFAULT_RESAMPLES,
                           seed: int = 0) -> MeanDifference:
    """Mean of a - b over units (e.g. images) and its 95% bootstrap interval: each resample draws units
    with replacement and applies the same draw to both sides. Fewer than two units: NaN bounds."""
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(differences)
    if n == 0:
        return MeanDifference(float("nan"), float("nan"), float("nan"), 0)
    mean = float(differences.mean())
    if n < 2 or n_resamples <= 0:
        return MeanDifference(mean, float("nan"), float("nan"), n)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    low, high = percentile_interval(differences[draws].mean(axis=1))
    return MeanDifference(mean, low, high, n)


def is_resolved(low: float, high: float) -> bool:
    """Whether an interval of a difference excludes zero (NaN bounds never do)."""
    return bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0))


def mcnemar_exact(a_only_correct: int, b_only_correct: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs against 1/2
    (McNemar 1947; exact form as in Fagerland et al. 2013)."""
    from scipy.stats import binomtest

    discordant = int(a_only_correct) + int(b_only_correct)
    if discordant == 0:
        return 1.0
    return float(binomtest(int(a_only_correct), discordant, 0.5, alternative="two-sided").pvalue)


# --------------------------------------------------------------------------- prediction sets, folds and pairs


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

    @property
    def correct(self) -> np.ndarray:
        return self.y_true == self.y_pred

    def confusions(self, num_classes: int, unique: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sorted patients (or ``unique``) and their (P, C, C) confusion matrices."""
        return group_confusions(self.y_true, self.y_pred, self.patients, num_classes, unique)


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


def metric_values(predictions: Predictions, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of one prediction set (scikit-learn's definitions)."""
    classes = int(max(predictions.y_true.max(initial=-1), predictions.y_pred.max(initial=-1)) + 1)
    num_classes = max(num_classes or 0, classes, 1)
    values = metrics_from_confusion(confusion(predictions.y_true, predictions.y_pred, num_classes))
    return {name: float(value) for name, value in values.items()}


def seed_spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation (ddof=1; NaN for one value) of per-seed values."""
    array = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if array.size == 0:
        return Spread(float("nan"), float("nan"), 0)
    sd = float(np.std(array, ddof=1)) if array.size > 1 else float("nan")
    return Spread(float(array.mean()), sd, int(array.size))


def pooled_interval(
    folds: Sequence[Predictions], num_classes: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, Spread]:
    """Per metric: mean and SD of the per-fold values, and the bootstrap interval of the mean over folds.

    Each resample draws patients with replacement within every fold (within classes when possible,
    as :func:`metric_intervals`), recomputes every fold's metric and averages them over folds. With
    one fold and the same seed, the interval equals the evaluation's own (:func:`bootstrap_intervals`).
    """
    if not folds:
        raise ValueError("pooled_interval needs the predictions of at least one seed or fold")
    rng = np.random.default_rng(seed)
    sums = {name: np.zeros(n_resamples) for name in HEADLINE}
    for fold in folds:
        _, confusions = fold.confusions(num_classes)
        resampling = resample_groups(group_classes(confusions), n_resamples, rng)
        values = resampled_metrics(confusions, resampling.counts)
        for name in HEADLINE:
            sums[name] += values[name]
    points = [metric_values(fold, num_classes) for fold in folds]
    result = {}
    for name in HEADLINE:
        spread = seed_spread([point[name] for point in points])
        low, high = percentile_interval(sums[name] / len(folds), drop_nan=True)
        result[name] = dataclasses.replace(spread, low=low, high=high)
    return result


def paired_difference(
    pairs: Sequence[tuple[Predictions, Predictions]], num_classes: int,
    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, Difference]:
    """A - B per headline metric, over one or more (A, B) pairs (one per seed/fold).

    Within a pair, A and B must share their test patients (not necessarily their images); every
    resample draws one set of patients per pair (within classes when possible) and uses it for both.
    A drawn patient without images on one side adds nothing to that side. The difference is the mean
    over pairs of A's metric minus B's. McNemar's test is added for accuracy when every pair has the
    same images in the same order; discordant counts are summed over pairs (independent test sets).
    """
    if not pairs:
        raise ValueError("paired_difference needs at least one (A, B) pair of predictions")
    rng = np.random.default_rng(seed)
    point_a: dict[str, list[float]] = {name: [] for name in HEADLINE}
    point_b: dict[str, list[float]] = {name: [] for name in HEADLINE}
    sums = {name: np.zeros(n_resamples) for name in HEADLINE}
    n_patients = 0
    for a, b in pairs:
        if len(np.intersect1d(a.patients.astype(str), b.patients.astype(str))) == 0:
            raise ValueError("the two sides of a paired comparison share no test patient")
        unique = np.unique(np.concatenate([a.patients, b.patients]).astype(str))
        _, confusions_a = a.confusions(num_classes, unique)
        _, confusions_b = b.confusions(num_classes, unique)
        resampling = resample_groups(group_classes(confusions_a + confusions_b), n_resamples, rng)
        n_patients += len(unique)
        values_a = resampled_metrics(confusions_a, resampling.counts)
        values_b = resampled_metrics(confusions_b, resampling.counts)
        whole_a, whole_b = metric_values(a, num_classes), metric_values(b, num_classes)
        for name in HEADLINE:
            sums[name] += values_a[name] - values_b[name]
            point_a[name].append(whole_a[name])
            point_b[name].append(whole_b[name])
    same_images = all(_same_images(a, b) for a, b in pairs)
    result = {}
    for name in HEADLINE:
        differences = sums[name] / len(pairs)
        low, high = percentile_interval(differences, drop_nan=True)  # NaN: a side had no drawn images
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


# --------------------------------------------------------------------------- notes on weak evaluations


def evaluation_notes(
    confusions: np.ndarray, class_names: Sequence[str], intervals: Intervals | None, unit: str = "patients",
    min_per_class: int = MIN_GROUPS_PER_CLASS,
) -> list[str]:
    """Sentences saying what the numbers of one evaluation cannot support.

    ``confusions``: the (G, C, C) matrices of the test groups (``unit``: patients, slides).
    Flags classes with fewer than ``min_per_class`` groups (none at all included), and intervals
    of zero width or from fewer than two groups.
    """
    notes = []
    present = np.asarray(confusions).sum(-1) > 0  # (G, C) groups holding images of each class
    per_class = present.sum(0) if len(confusions) else np.zeros(len(class_names), dtype=int)
    few = [f"{name} {int(count)}" for name, count in zip(class_names, per_class) if count < min_per_class]
    if few:
        notes.append(f"fewer than {min_per_class} test {unit} per class ({', '.join(few)}): "
                      "the metrics and their intervals rest on very few " + unit)
    if intervals is not None:
        if intervals.n_groups < 2:
            notes.append(f"intervals from fewer than 2 test {unit} ({intervals.n_groups}): "
                         "they show no uncertainty and mean nothing")
        else:
            flat = [name for name, (low, high) in intervals.ci95.items() if high - low == 0]
            if flat:
                notes.append(f"zero-width interval for {', '.join(flat)}: every resample of the "
                             f"{intervals.n_groups} {unit} gives the same value; it shows no uncertainty")
    return notes

"""histotoken.stats: metrics against scikit-learn, resampling with class strata, one interval everywhere,
slide AUROC without dropped resamples, notes on weak evaluations, paired intervals for faithfulness."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from histotoken import stats
from tests.sklearn_reference import random_labels, sklearn_metrics


def random_case(rng: np.random.Generator):
    """2-60 images of 1-8 classes, often with classes missing from the labels or the predictions; 1-6 patients."""
    y_true, y_pred, num_classes = random_labels(rng)
    patients = rng.choice([f"p{i}" for i in range(int(rng.integers(1, 7)))], len(y_true))
    return y_true, y_pred, patients, num_classes


@pytest.mark.parametrize("seed", range(60))
def test_metrics_from_summed_patient_confusions_equal_sklearn(seed):
    y_true, y_pred, patients, num_classes = random_case(np.random.default_rng(seed))
    unique, confusions = stats.group_confusions(y_true, y_pred, patients, num_classes)
    for patient, matrix in zip(unique, confusions):
        mine = patients == patient
        assert np.array_equal(matrix, confusion_matrix(y_true[mine], y_pred[mine], labels=range(num_classes)))
    total = confusions.sum(0)
    assert np.array_equal(total, confusion_matrix(y_true, y_pred, labels=range(num_classes)))
    ours = {name: float(value) for name, value in stats.metrics_from_confusion(total).items()}
    assert ours == pytest.approx(sklearn_metrics(y_true, y_pred), abs=1e-12)
    scores = stats.per_class_scores(total)
    expected = precision_recall_fscore_support(y_true, y_pred, labels=range(num_classes), zero_division=0)
    for ours_values, theirs in zip((scores[k] for k in ("precision", "recall", "f1", "support")), expected):
        assert np.allclose(ours_values, theirs)


def test_each_resample_s_metrics_equal_sklearn_on_the_images_of_its_drawn_patients():
    rng = np.random.default_rng(3)
    y_true, y_pred, patients, num_classes = random_case(rng)
    unique, confusions = stats.group_confusions(y_true, y_pred, patients, num_classes)
    resampling = stats.resample_groups(stats.group_classes(confusions), 30, rng)
    values = stats.resampled_metrics(confusions, resampling.counts)
    for row, draw in enumerate(resampling.draws):
        rows = np.concatenate([np.flatnonzero(patients == unique[i]) for i in draw])  # whole patients, repeated
        expected = sklearn_metrics(y_true[rows], y_pred[rows])
        assert {name: float(v[row]) for name, v in values.items()} == pytest.approx(expected, abs=1e-12)


def test_stratified_resampling_keeps_each_class_s_number_of_patients():
    classes = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    resampling = stats.resample_groups(classes, 200, np.random.default_rng(0))
    assert resampling.scheme == stats.STRATIFIED
    for draw in resampling.draws:
        assert np.array_equal(np.sort(classes[draw]), classes)
    assert len({tuple(draw) for draw in resampling.draws}) > 1  # and it does vary


def test_a_class_with_one_patient_falls_back_to_plain_resampling_and_says_so():
    classes = np.array([0, 0, 1, 2, 2])
    resampling = stats.resample_groups(classes, 300, np.random.default_rng(0))
    assert resampling.scheme == stats.PLAIN
    compositions = {tuple(np.bincount(classes[draw], minlength=3)) for draw in resampling.draws}
    assert len(compositions) > 1  # class counts vary: drawn from the whole set


def test_a_patient_s_class_is_its_majority_label():
    y_true = np.array([1, 1, 0, 2, 2, 2, 0])
    _, confusions = stats.group_confusions(y_true, y_true, ["a", "a", "a", "b", "b", "b", "b"], 3)
    assert list(stats.group_classes(confusions)) == [1, 2]


def test_evaluation_and_report_give_the_same_interval_on_the_issue_example():
    """8 classes, 2 patients each: the evaluation used to resample without strata ([0.485, 0.796] in the
    issue) while the report kept class shares ([0.637, 0.794]); both now come from one function."""
    from histotoken.engine.evaluate import compute_metrics
    from histotoken.reporting import statistics as report_statistics

    rng = np.random.default_rng(14)
    y_true = np.repeat(np.arange(8), 10)  # 2 patients x 5 images per class
    patients = np.repeat([f"p{i}" for i in range(16)], 5)
    y_pred = np.where(rng.random(80) < 0.7, y_true, rng.integers(0, 8, 80))
    names = [f"class{i}" for i in range(8)]
    evaluation = compute_metrics(y_true, y_pred, patients, names, n_bootstrap=400, seed=7)
    report = report_statistics.pooled_interval([report_statistics.Predictions(y_true, y_pred, patients)], 8, 400, 7)
    assert evaluation["resampling"] == stats.STRATIFIED
    for name in stats.HEADLINE:
        assert evaluation["ci95"][name] == [report[name].low, report[name].high]
        assert evaluation["ci95"][name][0] <= evaluation[name] <= evaluation["ci95"][name][1]


def test_slide_auroc_interval_uses_every_resample_and_each_holds_both_classes():
    rng = np.random.default_rng(5)
    y_true = np.array([0, 0, 0, 1, 1, 1])  # one score per slide; 3 slides per label
    score = np.array([0.1, 0.6, 0.3, 0.5, 0.9, 0.4])
    result = stats.auroc_interval(y_true, score, [f"s{i}" for i in range(6)], n_resamples=500, seed=int(rng.integers(9)))
    assert result.value == pytest.approx(roc_auc_score(y_true, score))
    assert len(result.values) == 500 and np.isfinite(result.values).all()  # none dropped
    assert result.scheme == stats.STRATIFIED and result.notes == []
    assert result.interval == pytest.approx(list(np.percentile(result.values, [2.5, 97.5])))


def test_tile_auroc_with_weights_equals_sklearn_on_the_drawn_tiles():
    # tiles of 4 slides, two mostly normal and two mostly tumour; groups are slides
    y_true = np.array([0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1])
    score = np.linspace(0, 1, 12)[::-1] * 0.3 + y_true * 0.5
    groups = np.repeat(["a", "b", "c", "d"], 3)
    result = stats.auroc_interval(y_true, score, groups, n_resamples=50, seed=1)
    # reproduce the draws: the same generator and strata (each slide's majority label)
    draws = stats.draw_groups(4, 50, np.random.default_rng(1), np.array([0, 0, 1, 1]))
    for value, draw in zip(result.values, draws):
        rows = np.concatenate([np.flatnonzero(groups == "abcd"[i]) for i in draw])
        assert value == pytest.approx(roc_auc_score(y_true[rows], score[rows]))


def test_auroc_of_one_class_is_undefined_with_a_note_not_one():
    result = stats.auroc_interval([1, 1], [0.9, 0.8], ["s1", "s2"], n_resamples=100)
    assert result.value is None and result.interval is None
    assert "AUROC undefined" in result.notes[0]
    with warnings.catch_warnings():  # scikit-learn agrees it is undefined (NaN with a warning, or an error)
        warnings.simplefilter("ignore")
        try:
            assert np.isnan(roc_auc_score([1, 1], [0.9, 0.8]))
        except ValueError:
            pass


def test_a_slide_test_set_of_one_normal_slide_carries_notes_and_no_auroc():
    from histotoken.engine.slides import binary_metrics, slide_count_notes

    result = binary_metrics(np.array([0]), np.array([0.2]), np.array(["s1"]), 0.5, 100, 0)
    assert result["macro_f1"] == 1.0  # what the old output printed, now with its notes
    assert result["auroc"] is None
    text = " ".join(result["notes"])
    assert "tumor 0" in text and "fewer than 2 test slides" in text and "AUROC undefined" in text
    assert "fewer than 10 test slides (1)" in slide_count_notes(1)[0]
    assert slide_count_notes(10) == []


def test_slide_auroc_from_two_slides_carries_a_zero_width_note():
    from histotoken.engine.slides import binary_metrics

    result = binary_metrics(np.array([0, 1]), np.array([0.2, 0.9]), np.array(["s1", "s2"]), 0.5, 100, 0)
    assert result["auroc"] == 1.0 and result["ci95"]["auroc"] == [1.0, 1.0]
    assert any("zero-width AUROC interval" in note for note in result["notes"])
    assert any("zero-width interval for accuracy" in note for note in result["notes"])


def test_an_evaluation_with_enough_patients_has_no_notes():
    from histotoken.engine.evaluate import compute_metrics

    rng = np.random.default_rng(2)
    y_true = np.repeat(np.arange(2), 30)
    patients = np.repeat([f"p{i}" for i in range(12)], 5)
    y_pred = np.where(rng.random(60) < 0.8, y_true, 1 - y_true)
    result = compute_metrics(y_true, y_pred, patients, ["a", "b"], n_bootstrap=200)
    assert result["notes"] == []
    few = compute_metrics(y_true[:20], y_pred[:20], patients[:20], ["a", "b"], n_bootstrap=200)
    assert few["notes"] and "a 4, b 0" in few["notes"][0]


def test_paired_mean_difference_resamples_units_once_for_both_sides():
    rng = np.random.default_rng(0)
    shared = rng.normal(0.5, 0.2, 40)  # large variation that both sides share
    a, b = shared + 0.02, shared
    difference = stats.paired_mean_difference(a, b, n_resamples=300)
    assert difference.mean == pytest.approx(0.02)
    assert difference.low == pytest.approx(0.02) and difference.high == pytest.approx(0.02)  # shared part cancels
    assert difference.resolved and difference.n == 40
    assert not stats.paired_mean_difference([0.1], [0.2]).resolved  # one unit: no interval


# --------------------------------------------------------------------------- faithfulness verdicts


def test_flat_faithfulness_curves_are_not_resolved_and_say_so_with_the_interval():
    from histotoken.explain.faithfulness import faithfulness_score

    rng = np.random.default_rng(1)  # flat curves: map and random AUCs near 0.132-0.133, image noise larger
    deletion = 0.132 + rng.normal(0, 0.01, 16)
    random_deletion = 0.133 + rng.normal(0, 0.01, 16)
    insertion = 0.529 + rng.normal(0, 0.05, 16)
    random_insertion = 0.531 + rng.normal(0, 0.05, 16)
    score = faithfulness_score(deletion, random_deletion, insertion, random_insertion)
    assert score["no_better_than_random"] and not score["better_than_random_deletion"]
    assert score["verdict"].startswith("not resolved") and "16 images" in score["verdict"]
    low, high = score["deletion_difference"][1:]
    assert low < 0 < high and f"[{low:+.3f}, {high:+.3f}]" in score["verdict"]


def test_a_clearly_faithful_map_is_better_than_random_on_both_curves():
    from histotoken.explain.faithfulness import faithfulness_score

    rng = np.random.default_rng(2)
    random_deletion = 0.5 + rng.normal(0, 0.05, 16)
    random_insertion = 0.5 + rng.normal(0, 0.05, 16)
    score = faithfulness_score(random_deletion - 0.2, random_deletion, random_insertion + 0.2, random_insertion)
    assert score["better_than_random_deletion"] and score["better_than_random_insertion"]
    assert score["verdict"].startswith("better than random on deletion and insertion (16 images")
    worse = faithfulness_score(random_deletion + 0.2, random_deletion, random_insertion, random_insertion)
    assert worse["verdict"].startswith("worse than random on deletion") and worse["no_better_than_random"]
